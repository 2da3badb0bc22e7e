"""Tests of the CDS buffer: round trips, blocking retrieval, atomicity, checksums, scans and eviction."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import threading
import time

import h5py
import numpy as np
import pytest

import lsstpipe.cds.buffer as buffer_module
from lsstpipe.camera import get_camera
from lsstpipe.cds import (
    BufferEntry,
    CDSBuffer,
    CDSChecksumError,
    CDSClient,
    CDSError,
    CDSFormatError,
    CDSNotFound,
    CDSTimeout,
    ImageKind,
    compute_checksum,
    image_day_obs,
    image_path,
)

CAMERA = get_camera("mini")
RAFT = "R10"
IMAGE = "MC_O_20240101_000012"
RAW, XTC = ImageKind.RAW, ImageKind.CROSSTALK_CORRECTED


def make_ccds(seed: int, raft: str = RAFT, n: int | None = 2) -> dict[str, np.ndarray]:
    """Random int32 segments for the first ``n`` detectors of a mini-camera raft (all when None)."""
    rng = np.random.default_rng(seed)
    detectors = CAMERA.raft_detectors(raft)[:n]
    return {
        d.name: rng.integers(-(2**31), 2**31 - 1, size=(16, *d.raw_shape), dtype=np.int32, endpoint=True)
        for d in detectors
    }


def make_headers(ccds: dict[str, np.ndarray]) -> dict[str, dict]:
    return {
        name: {"DETNAME": name, "EXPTIME": 30.0, "CCD_MANU": "ITL", "DARKTIME": 30.25, "TESTTYPE": None}
        for name in ccds
    }


TELEMETRY = {"FILTER": "r", "AIRMASS": 1.21, "DOMETEMP": [11.5, 11.7], "SHUTTER": {"open": True}}


def read_only(ccds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Copies of the arrays that cannot be written, to prove the buffer never modifies its input."""
    out = {}
    for name, a in ccds.items():
        b = a.copy()
        b.setflags(write=False)
        out[name] = b
    return out


@pytest.fixture
def buffer(tmp_path) -> CDSBuffer:
    return CDSBuffer(tmp_path / "cds")


@pytest.fixture
def client(buffer) -> CDSClient:
    return CDSClient(buffer.root)


def assert_same(image, ccds, headers, telemetry):
    assert sorted(image.ccds) == sorted(ccds)
    for name, pixels in ccds.items():
        assert image.ccds[name].dtype == np.int32
        np.testing.assert_array_equal(image.ccds[name], pixels)
    assert image.headers == headers
    assert image.telemetry == telemetry


# --- round trips ---------------------------------------------------------------------------------------


def test_write_then_retrieve_full_raft_is_identical(buffer, client):
    ccds = make_ccds(1, n=None)
    headers = make_headers(ccds)
    originals = {k: v.copy() for k, v in ccds.items()}
    assert buffer.write(IMAGE, RAFT, XTC, read_only(ccds), headers, TELEMETRY, mjd=60310.5) == []
    image = client.retrieve(IMAGE, RAFT, "crosstalk_corrected", timeout=1)
    assert (image.image_id, image.raft, image.kind, image.written_mjd) == (IMAGE, RAFT, XTC, 60310.5)
    assert len(image.ccds) == 9 and image.detectors == tuple(sorted(ccds))
    assert_same(image, originals, headers, TELEMETRY)
    assert all(not a.flags.writeable for a in image.ccds.values())
    image.verify()
    path = client.path(IMAGE, RAFT, XTC)
    assert path == buffer.root / "20240101" / IMAGE / "R10_crosstalk_corrected.h5"
    assert path.with_name(path.name + ".sha256").read_text() == image.checksum + "\n"
    assert image.checksum == compute_checksum(IMAGE, RAFT, XTC, originals, headers, TELEMETRY)


@pytest.mark.parametrize("compression", ["blosc-lz4", "lzf", "gzip"])
def test_compressed_raft_images_read_back_identical_and_smaller(tmp_path, compression):
    """Each compression stores raw-like counts (a bias level, sky noise, a few bright pixels) in well under
    half their size and gives back the same pixels; a buffer written with one is read by any client, so
    images written with lzf before blosc-lz4 became the simulator's choice still read."""
    rng = np.random.default_rng(5)
    ccds = {}
    for d in CAMERA.raft_detectors(RAFT)[:2]:
        counts = 15000 + rng.poisson(900, size=(16, *d.raw_shape)) + rng.normal(0, 5, (16, *d.raw_shape)).round()
        counts[:, 7, 9] = 2**18 - 1
        ccds[d.name] = counts.astype(np.int32)
    headers = make_headers(ccds)
    plain, packed = CDSBuffer(tmp_path / "plain"), CDSBuffer(tmp_path / "packed", compression=compression)
    for buf in (plain, packed):
        assert buf.write(IMAGE, RAFT, RAW, read_only({k: v.copy() for k, v in ccds.items()}), headers, TELEMETRY) == []
    sizes = [CDSClient(b.root).path(IMAGE, RAFT, RAW).stat().st_size for b in (plain, packed)]
    assert sizes[1] < 0.5 * sizes[0]
    image = CDSClient(packed.root).retrieve(IMAGE, RAFT, "raw", timeout=1)
    assert_same(image, ccds, headers, TELEMETRY)
    image.verify()


def test_other_integer_types_are_stored_as_int32(buffer, client):
    ccds = make_ccds(2, n=3)
    small = {k: (v % 60000).astype(np.uint16) for k, v in ccds.items()}
    small["R10_S02"] = small["R10_S02"].astype(">i4")  # big-endian, as read from FITS
    buffer.write(IMAGE, RAFT, RAW, small)
    image = client.read(IMAGE, RAFT, RAW)
    for name, pixels in small.items():
        assert image.ccds[name].dtype == np.int32
        np.testing.assert_array_equal(image.ccds[name], pixels.astype(np.int64))
    assert image.headers == {name: {} for name in small} and image.telemetry == {}


def test_numpy_scalars_in_headers_become_plain_values(buffer, client):
    ccds = make_ccds(3, n=1)
    headers = {"R10_S00": {"EXPTIME": np.float64(15.0), "SEQNUM": np.int64(12), "DARK": np.bool_(False)}}
    buffer.write(IMAGE, RAFT, RAW, ccds, headers)
    header, segments = client.retrieve_ccd(IMAGE, "R10_S00", RAW, timeout=1)
    assert header == {"EXPTIME": 15.0, "SEQNUM": 12, "DARK": False}
    assert type(header["SEQNUM"]) is int
    np.testing.assert_array_equal(segments, ccds["R10_S00"])


def test_both_kinds_of_one_raft_coexist(buffer, client):
    raw, xtc = make_ccds(4), make_ccds(5)
    buffer.write(IMAGE, RAFT, RAW, raw, mjd=60310.1)
    buffer.write(IMAGE, RAFT, XTC, xtc, mjd=60310.2)
    assert_same(client.retrieve(IMAGE, RAFT, RAW, timeout=1), raw, {k: {} for k in raw}, {})
    assert_same(client.retrieve(IMAGE, RAFT, XTC, timeout=1), xtc, {k: {} for k in xtc}, {})
    assert [(e.raft, e.kind) for e in client.scan()] == [(RAFT, RAW), (RAFT, XTC)]


def test_retrieve_ccd_and_missing_detector(buffer, client):
    ccds = make_ccds(6, n=2)
    buffer.write(IMAGE, RAFT, XTC, ccds, make_headers(ccds))
    header, segments = client.retrieve_ccd(IMAGE, "R10_S01", XTC, timeout=1)
    assert header["DETNAME"] == "R10_S01"
    np.testing.assert_array_equal(segments, ccds["R10_S01"])
    with pytest.raises(CDSNotFound, match="has no detector R10_S22; it holds R10_S00, R10_S01") as info:
        client.retrieve_ccd(IMAGE, "R10_S22", XTC, timeout=1)
    assert not info.value.retriable
    with pytest.raises(ValueError, match="not of the form R22_S11"):
        client.retrieve_ccd(IMAGE, "R10S01", XTC)


def test_overwrite_requires_consent_and_replaces(buffer, client):
    buffer.write(IMAGE, RAFT, RAW, make_ccds(7))
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        buffer.write(IMAGE, RAFT, RAW, make_ccds(8))
    new = make_ccds(8)
    buffer.write(IMAGE, RAFT, RAW, new, overwrite=True)
    assert_same(client.read(IMAGE, RAFT, RAW), new, {k: {} for k in new}, {})
    assert len(client.scan()) == 1
    assert [p.name for p in client.path(IMAGE, RAFT, RAW).parent.iterdir() if p.name.startswith(".")] == []


# --- blocking retrieval and atomicity ------------------------------------------------------------------


def test_blocked_client_receives_image_written_later_by_another_thread(buffer, client):
    ccds = make_ccds(9)
    result = {}
    reader = threading.Thread(target=lambda: result.setdefault("image", client.retrieve(IMAGE, RAFT, XTC, 10)))
    reader.start()
    time.sleep(0.2)
    assert reader.is_alive(), "retrieve returned before the image was written"
    buffer.write(IMAGE, RAFT, XTC, ccds, telemetry=TELEMETRY)
    reader.join(10)
    assert not reader.is_alive()
    assert_same(result["image"], ccds, {k: {} for k in ccds}, TELEMETRY)


def _write_in_child(root: str, seed: int, delay: float) -> None:
    time.sleep(delay)
    CDSBuffer(root).write(IMAGE, RAFT, RAW, make_ccds(seed), telemetry=TELEMETRY)


def test_blocked_client_receives_image_written_by_another_process(buffer, client):
    process = multiprocessing.get_context("spawn").Process(target=_write_in_child, args=(str(buffer.root), 10, 0.3))
    process.start()
    try:
        assert not client.available(IMAGE, RAFT, RAW)
        image = client.retrieve(IMAGE, RAFT, RAW, timeout=60)
    finally:
        process.join(60)
    assert process.exitcode == 0
    expected = make_ccds(10)
    assert_same(image, expected, {k: {} for k in expected}, TELEMETRY)


def test_reader_never_sees_an_image_before_it_is_published(buffer, client, monkeypatch):
    """Pause the writer between writing its temporary file and the rename; readers must see nothing."""
    paused, go = threading.Event(), threading.Event()
    real_publish = buffer_module.publish

    def slow_publish(tmp, final):
        if final.suffix == ".h5":
            paused.set()
            assert go.wait(10)
        real_publish(tmp, final)

    monkeypatch.setattr(buffer_module, "publish", slow_publish)
    ccds = make_ccds(11)
    writer = threading.Thread(target=buffer.write, args=(IMAGE, RAFT, XTC, ccds))
    writer.start()
    final = client.path(IMAGE, RAFT, XTC)
    try:
        assert paused.wait(10)
        temporaries = [p for p in final.parent.iterdir() if p.name.startswith(f".{final.name}.")]
        assert len(temporaries) == 1 and temporaries[0].stat().st_size > sum(a.nbytes for a in ccds.values())
        assert not final.exists() and not client.available(IMAGE, RAFT, XTC)
        assert client.scan() == []
        with pytest.raises(CDSTimeout):
            client.retrieve(IMAGE, RAFT, XTC, timeout=0.1, poll_interval=0.01)
    finally:
        go.set()
        writer.join(10)
    assert_same(client.retrieve(IMAGE, RAFT, XTC, timeout=1), ccds, {k: {} for k in ccds}, {})
    assert not any(p.name.startswith(".") for p in final.parent.iterdir())


def test_poller_only_ever_sees_complete_files(tmp_path):
    """While images are being written, every size seen at a final path is the complete file's size."""
    buffer = CDSBuffer(tmp_path / "cds", fsync=False)
    ids = [f"MC_O_20240101_{i:06d}" for i in range(1, 9)]
    paths = [buffer.path(i, RAFT, RAW) for i in ids]
    seen: dict = {p: set() for p in paths}
    done = threading.Event()

    def poll():
        while not done.is_set():
            for p in paths:
                try:
                    seen[p].add(os.stat(p).st_size)
                except FileNotFoundError:
                    pass

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for k, image_id in enumerate(ids):
            buffer.write(image_id, RAFT, RAW, make_ccds(k, n=3))
    finally:
        done.set()
        poller.join()
    assert any(seen.values()), "the poller saw no file at all"
    for p in paths:
        assert seen[p] <= {p.stat().st_size}


# --- errors ----------------------------------------------------------------------------------------------


def test_timeout_raises_retriable_cds_timeout(client):
    start = time.monotonic()
    with pytest.raises(CDSTimeout, match=r"did not appear .* within 0.15 s.*Catch-Up Archiver") as info:
        client.retrieve(IMAGE, RAFT, XTC, timeout=0.15)
    assert 0.15 <= time.monotonic() - start < 2.0
    assert info.value.retriable and isinstance(info.value, CDSError)
    assert info.value.path == str(client.path(IMAGE, RAFT, XTC))


def test_flipped_pixel_byte_raises_checksum_error_after_one_reread(buffer, client, caplog):
    buffer.write(IMAGE, RAFT, XTC, make_ccds(12))
    path = client.path(IMAGE, RAFT, XTC)
    with h5py.File(path, "r") as f:
        offset = f["ccds/R10_S01"].id.get_offset()
    assert offset is not None
    with open(path, "r+b") as f:
        f.seek(offset + 1001)
        byte = f.read(1)
        f.seek(offset + 1001)
        f.write(bytes([byte[0] ^ 0x10]))
    with (
        caplog.at_level(logging.WARNING, logger="lsstpipe.cds.buffer"),
        pytest.raises(CDSChecksumError, match="twice; the stored copy is damaged") as info,
    ):
        client.retrieve(IMAGE, RAFT, XTC, timeout=1, poll_interval=0.01)
    assert not info.value.retriable
    assert sum("reading it again" in r.getMessage() for r in caplog.records) == 1


def test_sidecar_mismatch_raises_checksum_error(buffer, client):
    buffer.write(IMAGE, RAFT, RAW, make_ccds(13))
    path = client.path(IMAGE, RAFT, RAW)
    path.with_name(path.name + ".sha256").write_text("0" * 64 + "\n")
    with pytest.raises(CDSChecksumError, match="sidecar checksum"):
        client.read(IMAGE, RAFT, RAW)


def test_a_transient_mismatch_is_cured_by_the_reread(buffer, client, monkeypatch, caplog):
    """A camera re-write can make one read inconsistent; the client reads once more and succeeds."""
    ccds = make_ccds(14)
    buffer.write(IMAGE, RAFT, RAW, ccds)
    real_read = buffer_module.read_file
    calls = []

    def flaky_read(*args):
        image = real_read(*args)
        calls.append(1)
        return dataclasses.replace(image, checksum="f" * 64) if len(calls) == 1 else image

    monkeypatch.setattr(buffer_module, "read_file", flaky_read)
    with caplog.at_level(logging.WARNING, logger="lsstpipe.cds.buffer"):
        image = client.retrieve(IMAGE, RAFT, RAW, timeout=1, poll_interval=0.01)
    assert len(calls) == 2
    assert_same(image, ccds, {k: {} for k in ccds}, {})
    assert any("reading it again" in r.getMessage() for r in caplog.records)


def test_unreadable_file_raises_format_error_naming_it(buffer, client):
    path = client.path(IMAGE, RAFT, RAW)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an HDF5 file at all")
    with pytest.raises(CDSFormatError, match="not a readable CDS raft image") as info:
        client.retrieve(IMAGE, RAFT, RAW, timeout=1)
    assert str(path) in str(info.value) and not info.value.retriable
    path.unlink()
    with h5py.File(path, "w") as f:
        f.attrs["hello"] = 1
    with pytest.raises(CDSFormatError, match="format marker"):
        client.read(IMAGE, RAFT, RAW)


def test_mislabelled_file_raises_format_error(buffer, client):
    buffer.write(IMAGE, RAFT, RAW, make_ccds(15))
    os.replace(client.path(IMAGE, RAFT, RAW), client.path(IMAGE, RAFT, XTC))
    with pytest.raises(CDSFormatError, match="it holds image"):
        client.read(IMAGE, RAFT, XTC)


def test_image_evicted_while_reading_raises_not_found(buffer, client, monkeypatch):
    buffer.write(IMAGE, RAFT, RAW, make_ccds(16))

    def gone(*args):
        raise FileNotFoundError

    monkeypatch.setattr(buffer_module, "read_file", gone)
    with pytest.raises(CDSNotFound, match="was evicted .* raw image cache"):
        client.retrieve(IMAGE, RAFT, RAW, timeout=1)


def test_non_blocking_read_of_missing_image_raises_not_found(client):
    with pytest.raises(CDSNotFound, match=r"not in the CDS buffer .* use retrieve\(\) to wait") as info:
        client.read(IMAGE, RAFT, RAW)
    assert not info.value.retriable


def test_client_refuses_a_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; check the path"):
        CDSClient(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: a.update(image_id="MC_O_2024_12"), ValueError, "is not an exposure OBSID"),
        (lambda a: a.update(image_id="../etc"), ValueError, "is not an exposure OBSID"),
        (lambda a: a.update(raft="R1"), ValueError, "is not a raft name"),
        (lambda a: a.update(kind="calexp"), ValueError, "unknown image kind 'calexp'"),
        (lambda a: a.update(ccds={}), ValueError, "non-empty dict"),
        (lambda a: a["ccds"].update(R11_S00=a["ccds"]["R10_S00"]), ValueError, "R11_S00' does not belong"),
        (lambda a: a["ccds"].update(R10_S00=a["ccds"]["R10_S00"][0]), ValueError, r"expected \(16, raw_h"),
        (lambda a: a["ccds"].update(R10_S00=a["ccds"]["R10_S00"][:15]), ValueError, "have shape"),
        (lambda a: a["ccds"].update(R10_S00=a["ccds"]["R10_S00"] * 1.0), ValueError, "dtype float64"),
        (lambda a: a["ccds"].update(R10_S00=a["ccds"]["R10_S00"].tolist()), TypeError, "numpy array"),
        (
            lambda a: a["ccds"].update(R10_S00=a["ccds"]["R10_S00"].astype(np.int64) * 4),
            ValueError,
            "outside the int32 range",
        ),
        (
            lambda a: a["ccds"].update(R10_S01=a["ccds"]["R10_S01"][:, 1:]),
            ValueError,
            "all detectors of a raft",
        ),
        (lambda a: a.update(headers={"R10_S00": {}}), ValueError, "one entry per detector"),
        (
            lambda a: a.update(headers={"R10_S00": {}, "R10_S01": {"X": object()}}),
            ValueError,
            "header of R10_S01",
        ),
        (lambda a: a.update(headers={"R10_S00": {}, "R10_S01": [1]}), TypeError, "must be a dict"),
        (lambda a: a.update(telemetry={"seeing": float("nan")}), ValueError, r"telemetry .* as None"),
        (lambda a: a.update(telemetry=[1, 2]), TypeError, "telemetry must be a dict"),
        (lambda a: a.update(mjd=float("inf")), ValueError, "finite modified Julian date"),
    ],
)
def test_bad_inputs_are_rejected_with_clear_messages(buffer, change, error, match):
    args = {"image_id": IMAGE, "raft": RAFT, "kind": RAW, "ccds": make_ccds(17), "headers": None}
    change(args)
    with pytest.raises(error, match=match):
        buffer.write(**args)
    assert buffer.scan() == [] and list(buffer.root.iterdir()) == []


def test_camera_checks_detectors_and_shapes(tmp_path):
    buffer = CDSBuffer(tmp_path / "cds", camera=CAMERA)
    itl = make_ccds(18, raft="R10", n=1)["R10_S00"]
    with pytest.raises(ValueError, match="R10_SW is not in raft R10 of camera mini"):
        buffer.write(IMAGE, "R10", RAW, {"R10_SW": itl})
    with pytest.raises(ValueError, match=r"camera mini expects \(16, 258, 88\)"):
        buffer.write(IMAGE, "R11", RAW, {"R11_S00": itl})  # ITL shape on an e2v raft
    with pytest.raises(ValueError, match="camera mini has no raft 'R22'"):
        buffer.write(IMAGE, "R22", RAW, {"R22_S11": itl})
    assert buffer.write(IMAGE, "R11", RAW, make_ccds(18, raft="R11", n=9)) == []


def test_buffer_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="capacity_bytes must be a positive"):
        CDSBuffer(tmp_path, capacity_bytes=0)
    with pytest.raises(ValueError, match="unknown compression 'zstd'; use one of"):
        CDSBuffer(tmp_path, compression="zstd")


def test_retrieve_arguments_are_validated(client):
    with pytest.raises(ValueError, match="poll_interval must be a positive"):
        client.retrieve(IMAGE, RAFT, RAW, timeout=1, poll_interval=0)
    with pytest.raises(ValueError, match="timeout must be None or"):
        client.retrieve(IMAGE, RAFT, RAW, timeout=-1)


# --- checksum --------------------------------------------------------------------------------------------


def test_checksum_covers_pixels_headers_telemetry_and_identity():
    ccds = make_ccds(19)
    headers = make_headers(ccds)
    base = compute_checksum(IMAGE, RAFT, RAW, ccds, headers, TELEMETRY)
    assert len(base) == 64
    reordered = {k: ccds[k] for k in reversed(list(ccds))}
    assert compute_checksum(IMAGE, RAFT, "raw", reordered, headers, dict(reversed(TELEMETRY.items()))) == base
    changed = {k: v.copy() for k, v in ccds.items()}
    changed["R10_S01"][7, 3, 2] ^= 1
    assert compute_checksum(IMAGE, RAFT, RAW, changed, headers, TELEMETRY) != base
    other_headers = json.loads(json.dumps(headers))
    other_headers["R10_S00"]["EXPTIME"] = 30.5
    assert compute_checksum(IMAGE, RAFT, RAW, ccds, other_headers, TELEMETRY) != base
    assert compute_checksum(IMAGE, RAFT, RAW, ccds, headers, {**TELEMETRY, "FILTER": "g"}) != base
    assert compute_checksum(IMAGE, RAFT, XTC, ccds, headers, TELEMETRY) != base
    assert compute_checksum("MC_O_20240101_000013", RAFT, RAW, ccds, headers, TELEMETRY) != base


def test_layout_and_day_obs(tmp_path):
    assert image_day_obs("MC_O_20240101_000012") == "20240101"
    assert image_path(tmp_path, "MC_C_20231231_000001", "R22", XTC) == (
        tmp_path / "20231231" / "MC_C_20231231_000001" / "R22_crosstalk_corrected.h5"
    )


# --- scan and eviction -----------------------------------------------------------------------------------


def test_scan_lists_oldest_first_and_filters(buffer, client):
    ccds = make_ccds(20, n=1)
    writes = [
        ("MC_O_20240102_000003", RAW, 60311.3),
        ("MC_O_20240101_000001", RAW, 60311.1),
        ("MC_O_20240102_000002", XTC, 60311.2),
        ("MC_O_20240102_000002", RAW, 60311.2),
        ("MC_O_20240101_000009", XTC, 60311.05),
    ]
    for image_id, kind, mjd in writes:
        buffer.write(image_id, RAFT, kind, ccds, mjd=mjd)
    (buffer.root / "20240102" / "MC_O_20240102_000003" / ".R10_raw.h5.123.abc.tmp").write_bytes(b"partial")
    (buffer.root / "notes").mkdir()
    expected = [
        BufferEntry("MC_O_20240101_000009", RAFT, XTC, 60311.05),
        BufferEntry("MC_O_20240101_000001", RAFT, RAW, 60311.1),
        BufferEntry("MC_O_20240102_000002", RAFT, XTC, 60311.2),
        BufferEntry("MC_O_20240102_000002", RAFT, RAW, 60311.2),
        BufferEntry("MC_O_20240102_000003", RAFT, RAW, 60311.3),
    ]
    assert buffer.scan() == expected
    assert client.scan() == expected
    assert client.scan(older_than=60311.2) == expected[:2]
    image_id, raft, kind, mjd = client.scan()[0]
    assert (image_id, raft, kind, mjd) == expected[0]


def test_capacity_evicts_oldest_whole_images_and_keeps_the_newest(tmp_path, caplog):
    probe = CDSBuffer(tmp_path / "probe", fsync=False)
    ccds = make_ccds(21, n=1)
    probe.write(IMAGE, RAFT, RAW, ccds)
    one_file = probe.nbytes()
    # Each image has two raft images (both kinds): room for two and a half images.
    buffer = CDSBuffer(tmp_path / "cds", capacity_bytes=int(5.2 * one_file), fsync=False)
    ids = [f"MC_O_20240103_{i:06d}" for i in range(1, 7)]
    evicted_by_write = []
    with caplog.at_level(logging.INFO, logger="lsstpipe.cds.buffer"):
        for k, image_id in enumerate(ids):
            evicted_by_write.append(buffer.write(image_id, RAFT, RAW, ccds, mjd=60312.0 + k))
            evicted_by_write.append(buffer.write(image_id, RAFT, XTC, ccds, mjd=60312.0 + k + 0.5))
    assert buffer.nbytes() <= buffer.capacity_bytes
    assert sorted({e.image_id for e in buffer.scan()}) == ids[-2:]
    assert len(buffer.scan()) == 4, "an image was evicted only in part"
    evicted = [e for batch in evicted_by_write for e in batch]
    assert [e.image_id for e in evicted] == [i for i in ids[:-2] for _ in range(2)]
    assert all(isinstance(e, BufferEntry) for e in evicted)
    assert not (buffer.root / "20240103" / ids[0]).exists()
    assert sum("evicted image" in r.getMessage() for r in caplog.records) == 4


def test_image_being_written_is_never_evicted_even_when_over_capacity(tmp_path, caplog):
    buffer = CDSBuffer(tmp_path / "cds", capacity_bytes=1000, fsync=False)
    ccds = make_ccds(22, n=1)
    assert buffer.write("MC_O_20240104_000001", RAFT, RAW, ccds, mjd=60313.0) == []
    with caplog.at_level(logging.WARNING, logger="lsstpipe.cds.buffer"):
        evicted = buffer.write("MC_O_20240104_000002", RAFT, RAW, ccds, mjd=60313.1)
    assert [e.image_id for e in evicted] == ["MC_O_20240104_000001"]
    assert [e.image_id for e in buffer.scan()] == ["MC_O_20240104_000002"]
    assert any("raise capacity_bytes" in r.getMessage() for r in caplog.records)
    assert not (buffer.root / "20240104" / "MC_O_20240104_000001").exists()
