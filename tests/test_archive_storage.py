"""Tests of the archive storage: image blobs, the network outage buffer, the raw image cache and tape."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from lsstpipe.archive import (
    ArchiveConflict,
    ArchiveError,
    ArchiveNotFound,
    ArchiverMode,
    ImageKey,
    ItemMeta,
    OutageBuffer,
    OutageBufferFull,
    RawImageCache,
    TapeArchive,
    TapeLibrary,
    blob_meta,
    decode_image,
    encode_image,
)
from lsstpipe.cds.image import CDSChecksumError, CDSFormatError, ImageKind, PreparedImage, prepare_image

REPO = Path(__file__).resolve().parents[1]
DAY = "20261125"


def make_image(seq: int = 1, raft: str = "R11", kind: str = "raw", seed: int = 0) -> PreparedImage:
    """A tiny raft image: two detectors of 16 segments of 3×4 int32 pixels, headers and telemetry."""
    rng = np.random.default_rng(seed)
    ccds = {f"{raft}_S{s}": rng.integers(-(2**31), 2**31 - 1, (16, 3, 4), dtype=np.int32) for s in ("00", "01")}
    headers = {name: {"DETNAME": name, "EXPTIME": 30.0, "NOTE": None} for name in ccds}
    return prepare_image(f"MC_O_{DAY}_{seq:06d}", raft, kind, ccds, headers, {"FILTER": "r", "AIRMASS": 1.2})


def blob_of(seq: int = 1, raft: str = "R11", kind: str = "raw", seed: int = 0, mode: str = "science"):
    image = make_image(seq, raft, kind, seed)
    key = ImageKey.of(image)
    data = encode_image(image)
    return key, data, blob_meta(key, data, mode)


def flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def pixel_offset(data: bytes, image: PreparedImage) -> int:
    """Where the first detector's pixels start in an uncompressed blob."""
    at = data.find(next(iter(image.ccds.values())).tobytes())
    assert at > 0
    return at


# ---------------------------------------------------------------- keys, metadata, blobs


def test_image_key_forms_and_errors():
    key = ImageKey(f"MC_O_{DAY}_000001", "R11", ImageKind.CROSSTALK_CORRECTED)
    assert key.kind == "crosstalk_corrected" and key.image_kind is ImageKind.CROSSTALK_CORRECTED
    assert str(key) == f"MC_O_{DAY}_000001/R11/crosstalk_corrected"
    assert ImageKey.parse(str(key)) == key and hash(ImageKey.parse(str(key))) == hash(key)
    assert key.day_obs == DAY
    with pytest.raises(ValueError, match="OBSID"):
        ImageKey("visit-1", "R11", "raw")
    with pytest.raises(ValueError, match="raft name"):
        ImageKey(f"MC_O_{DAY}_000001", "R1", "raw")
    with pytest.raises(ValueError, match="unknown image kind"):
        ImageKey(f"MC_O_{DAY}_000001", "R11", "flat")
    with pytest.raises(ValueError, match="form"):
        ImageKey.parse("MC_O_20261125_000001/R11")


def test_item_meta_validates():
    checksum = "ab" * 32
    meta = ItemMeta(checksum, 10, "calibration")
    assert meta.mode is ArchiverMode.CALIBRATION and meta.stored_mjd is None
    with pytest.raises(ValueError, match="SHA-256"):
        ItemMeta("xyz", 10, "science")
    with pytest.raises(ValueError, match="positive int"):
        ItemMeta(checksum, -1, "science")
    with pytest.raises(ValueError, match="Archiver mode"):
        ItemMeta(checksum, 10, "night")
    with pytest.raises(ValueError, match="finite"):
        ItemMeta(checksum, 10, "science", float("nan"))


@pytest.mark.parametrize("compression", [None, "lzf", "gzip", "blosc-lz4"])
def test_blob_round_trip_is_exact_and_deterministic(compression):
    image = make_image(kind="crosstalk_corrected")
    key = ImageKey.of(image)
    data = encode_image(image, compression)
    assert encode_image(image, compression) == data
    decoded = decode_image(data, key)
    assert decoded.checksum == image.checksum and decoded.kind is ImageKind.CROSSTALK_CORRECTED
    for name, pixels in image.ccds.items():
        np.testing.assert_array_equal(decoded.ccds[name], pixels)
        assert decoded.headers[name] == json.loads(image.headers_json[name])
    assert decoded.telemetry == {"FILTER": "r", "AIRMASS": 1.2}
    # A decoded RaftImage re-encodes to the same bytes (its write time, 0.0, travels with it).
    assert encode_image(decoded, compression) == data
    assert encode_image(decoded, compression, mjd=61000.5) != data
    assert decode_image(encode_image(decoded, compression, mjd=61000.5), str(key)).written_mjd == 61000.5
    assert blob_meta(key, data, "science") == ItemMeta(image.checksum, len(data), ArchiverMode.SCIENCE)


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown compression"):
        encode_image(make_image(), "zstd")
    with pytest.raises(TypeError, match="RaftImage or PreparedImage"):
        encode_image({"R11_S00": np.zeros((16, 3, 4), np.int32)})
    image = make_image()
    decoded = decode_image(encode_image(image), ImageKey.of(image))
    with pytest.raises(ValueError, match="exactly one header"):
        encode_image(dataclasses.replace(decoded, headers={}))
    with pytest.raises(ValueError, match="int32 segments"):
        encode_image(dataclasses.replace(decoded, ccds={n: a.astype(np.int64) for n, a in decoded.ccds.items()}))


def test_decode_detects_damage():
    image = make_image()
    key = ImageKey.of(image)
    data = encode_image(image)
    with pytest.raises(CDSChecksumError, match="does not match its checksum"):
        decode_image(flip_byte(data, pixel_offset(data, image) + 5), key)
    with pytest.raises(CDSFormatError, match="damaged"):
        decode_image(flip_byte(data, 0), key)  # the HDF5 signature
    with pytest.raises(CDSFormatError, match="damaged"):
        decode_image(data[: len(data) // 2], key)
    with pytest.raises(CDSFormatError, match="empty"):
        decode_image(b"", key)
    with pytest.raises(TypeError, match="bytes"):
        decode_image("not bytes", key)
    other = ImageKey(key.image_id, "R12", "raw")
    with pytest.raises(CDSFormatError, match="not"):
        decode_image(data, other)
    with pytest.raises(CDSFormatError, match="holds image"):
        blob_meta(other, data, "science")


# ---------------------------------------------------------------- network outage buffer


def test_outage_buffer_put_get_and_idempotence(tmp_path):
    buf = OutageBuffer(tmp_path / "ob", 10**6, fsync=False)
    key, data, meta = blob_of()
    stored = buf.put(key, data, meta)
    assert stored.stored_mjd is not None and stored.checksum == meta.checksum
    assert key in buf and str(key) in buf and len(buf) == 1 and buf.nbytes == len(data)
    assert buf.get(key) == data and buf.meta(key) == stored
    assert buf.put(key, data, meta) == stored and len(buf) == 1
    # the blob is a readable HDF5 file on disk
    with h5py.File(buf.path(key), "r") as f:
        assert f.attrs["checksum"] == meta.checksum
    _, other, other_meta = blob_of(seed=9)
    with pytest.raises(ArchiveConflict, match="never overwritten"):
        buf.put(key, other, other_meta)
    assert buf.get(key) == data
    with pytest.raises(ArchiveNotFound, match="not in the network outage buffer"):
        buf.get(ImageKey(key.image_id, "R22", "raw"))


def test_outage_buffer_rejects_mismatched_meta(tmp_path):
    buf = OutageBuffer(tmp_path, 10**6, fsync=False)
    key, data, meta = blob_of()
    _, _, other_meta = blob_of(seed=3)
    with pytest.raises(ValueError, match="checksum"):
        buf.put(key, data, ItemMeta(other_meta.checksum, len(data), "science"))
    with pytest.raises(ValueError, match="bytes"):
        buf.put(key, data, ItemMeta(meta.checksum, len(data) + 1, "science"))
    with pytest.raises(TypeError, match="ItemMeta"):
        buf.put(key, data, {"checksum": meta.checksum})
    with pytest.raises(CDSFormatError, match="holds image"):
        buf.put(ImageKey(key.image_id, "R12", "raw"), data, meta)
    assert len(buf) == 0


def test_outage_buffer_full_keeps_everything_until_confirmed(tmp_path):
    items = [blob_of(seq) for seq in (1, 2, 3)]
    size = len(items[0][1])
    buf = OutageBuffer(tmp_path, 2 * size + size // 2, fsync=False)
    buf.put(*items[0])
    buf.put(*items[1])
    with pytest.raises(OutageBufferFull, match="Catch-Up Archiver") as info:
        buf.put(*items[2])
    assert info.value.retriable and "is full" in str(info.value)
    assert [i.key for i in buf.pending()] == [items[0][0], items[1][0]]
    assert buf.confirm(items[0][0]) is True
    assert buf.confirm(items[0][0]) is False  # idempotent
    assert items[0][0] not in buf and not buf.path(items[0][0]).exists()
    buf.put(*items[2])
    assert [i.key for i in buf.pending()] == [items[1][0], items[2][0]]
    with pytest.raises(ArchiveNotFound, match="never in"):
        buf.confirm(ImageKey(f"MC_O_{DAY}_000099", "R11", "raw"))


def test_outage_buffer_pending_is_oldest_first(tmp_path):
    buf = OutageBuffer(tmp_path, 10**6, fsync=False)
    order = [(5, "R11"), (2, "R22"), (9, "R11"), (1, "R01")]
    for seq, raft in order:
        buf.put(*blob_of(seq, raft))
    pending = buf.pending()
    assert [(i.key.image_id[-1], i.key.raft) for i in pending] == [(str(s), r) for s, r in order]
    assert [i.sequence for i in pending] == [1, 2, 3, 4]


def test_outage_buffer_is_durable_and_cleans_crash_leftovers(tmp_path):
    root = tmp_path / "ob"
    buf = OutageBuffer(root, 10**6, fsync=True)
    keys = []
    for seq in (3, 1, 2):
        key, data, meta = blob_of(seq)
        buf.put(key, data, meta)
        keys.append(key)
    buf.confirm(keys[1])
    # a temporary file of a dead writer, and a blob whose sidecar never appeared
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = os.uname().nodename.replace(".", "_")
    tmp = buf.path(keys[0]).with_name(f".R11_raw.h5.{host}.{dead.pid}.abc.tmp")
    tmp.write_bytes(b"partial")
    foreign_tmp = buf.path(keys[0]).with_name(".R11_raw.h5.otherhost.1.abc.tmp")
    foreign_tmp.write_bytes(b"someone else's")
    orphan_key, orphan, _ = blob_of(7)
    buf.path(orphan_key).parent.mkdir(parents=True)
    buf.path(orphan_key).write_bytes(orphan)

    again = OutageBuffer(root)
    assert again.capacity_bytes == 10**6
    assert [i.key for i in again.pending()] == [keys[0], keys[2]]
    assert again.get(keys[2]) == buf.get(keys[2])
    assert again.confirm(keys[1]) is False  # remembered across reopening
    assert not tmp.exists() and foreign_tmp.exists() and not buf.path(orphan_key).exists()
    assert orphan_key not in again


def test_outage_buffer_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="positive int"):
        OutageBuffer(tmp_path / "a", -5)
    with pytest.raises(ValueError, match="positive int"):
        OutageBuffer(tmp_path / "a", True)
    with pytest.raises(ValueError, match="pass capacity_bytes"):
        OutageBuffer(tmp_path / "b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        OutageBuffer(tmp_path / "file", 100)
    buf = OutageBuffer(tmp_path / "c", 100, fsync=False)
    with pytest.raises(TypeError, match="ImageKey"):
        buf.get(42)
    assert 42 not in buf


# ---------------------------------------------------------------- raw image cache


def test_raw_image_cache(tmp_path):
    cache = RawImageCache(tmp_path / "cache", fsync=False)
    key, data, meta = blob_of(kind="crosstalk_corrected", mode="catchup")
    stored = cache.put(key, data, meta)
    assert cache.has(key) and cache.get(key) == data and stored.mode is ArchiverMode.CATCHUP
    assert cache.verify(key) == meta.checksum
    assert cache.put(key, data, meta) == stored  # same content: nothing happens
    # the same content compressed otherwise is the same image
    lzf = encode_image(make_image(kind="crosstalk_corrected"), "lzf")
    assert cache.put(key, lzf, blob_meta(key, lzf, "catchup")) == stored and cache.get(key) == data
    _, other, other_meta = blob_of(kind="crosstalk_corrected", seed=5)
    with pytest.raises(ArchiveConflict):
        cache.put(key, other, other_meta)
    key2, data2, meta2 = blob_of(2)
    cache.put(key2, data2, meta2)
    assert [e.key for e in cache.entries()] == [key, key2]
    assert [e.key for e in RawImageCache(tmp_path / "cache").entries()] == [key, key2]
    with pytest.raises(ArchiveNotFound):
        cache.verify(ImageKey(key.image_id, "R11", "raw"))


def test_raw_image_cache_verify_detects_damage_on_disk(tmp_path):
    cache = RawImageCache(tmp_path, fsync=False)
    image = make_image()
    key = ImageKey.of(image)
    data = encode_image(image)
    cache.put(key, data, blob_meta(key, data, "science"))
    assert cache.verify(key, received=data) == blob_meta(key, data, "science").checksum
    damaged = flip_byte(data, pixel_offset(data, image))
    cache.path(key).write_bytes(damaged)
    with pytest.raises(CDSChecksumError):
        cache.verify(key)
    # compared with the bytes received (the distributor's read-back check): the same damage, no decoding
    with pytest.raises(CDSChecksumError, match="differs from the .* bytes stored"):
        cache.verify(key, received=data)
    cache.path(key).write_bytes(data[:-1])
    with pytest.raises(CDSChecksumError, match="differs"):
        cache.verify(key, received=data)


# ---------------------------------------------------------------- tape


def test_tape_append_index_read_verify(tmp_path):
    items = [blob_of(seq, kind=kind) for seq, kind in ((2, "raw"), (1, "raw"), (1, "crosstalk_corrected"))]
    with TapeArchive(tmp_path, "003", fsync=False) as tape:
        assert tape.path == tmp_path / "volume-003.h5"
        records = [tape.append(*item) for item in items]
        assert [r.sequence for r in records] == [1, 2, 3]
        assert [r.key for r in tape.index()] == [item[0] for item in items]
        assert all(a.written_mjd <= b.written_mjd for a, b in zip(records, records[1:]))
        for (key, data, meta), record in zip(items, records):
            assert tape.read(key) == data
            assert record.sha256 == hashlib.sha256(data).hexdigest() and record.nbytes == len(data)
            assert record.checksum == meta.checksum == tape.verify(key)
            assert record.meta == ItemMeta(meta.checksum, len(data), "science", record.written_mjd)
        assert tape.append(*items[0]) == records[0]  # idempotent
        assert len(tape.index()) == 3
        _, other, other_meta = blob_of(2, seed=4)
        with pytest.raises(ArchiveConflict, match="never overwritten"):
            tape.append(items[0][0], other, other_meta)
        with pytest.raises(ArchiveNotFound, match="TapeLibrary"):
            tape.read(ImageKey(f"MC_O_{DAY}_000042", "R11", "raw"))
    with h5py.File(tmp_path / "volume-003.h5", "r") as f:
        rows = f["index"][()]
        assert list(rows["sequence"]) == [1, 2, 3] and rows["kind"][2] == b"crosstalk_corrected"
        assert list(f["blobs"]) == ["000000001", "000000002", "000000003"]
    with pytest.raises(ArchiveError, match="closed"):
        tape.append(*items[0])


def test_tape_reopen_continues_and_one_writer_per_volume(tmp_path):
    first = TapeArchive(tmp_path, "a", fsync=False)
    first.append(*blob_of(1))
    with pytest.raises(ArchiveError, match="another writer"):
        TapeArchive(tmp_path, "a")
    first.close()
    again = TapeArchive(tmp_path, "a", fsync=False)
    assert [r.sequence for r in again.index()] == [1]
    record = again.append(*blob_of(2))
    assert record.sequence == 2 and again.verify(record.key) == record.checksum
    again.close()


def test_tape_library_across_volumes(tmp_path):
    with TapeArchive(tmp_path, "000", fsync=False) as t0, TapeArchive(tmp_path, "001", fsync=False) as t1:
        written = []
        for seq, tape in ((1, t0), (2, t1), (3, t0), (4, t1)):
            item = blob_of(seq)
            written.append(tape.append(*item))
        duplicate = t1.append(*blob_of(1))  # a catch-up copy of image 1 on another volume
    library = TapeLibrary(tmp_path)
    assert library.volumes() == ["000", "001"]
    merged = library.index()
    assert merged == sorted(written + [duplicate], key=lambda r: (r.written_mjd, r.volume, r.sequence))
    assert library.find(written[0].key) == written[0]  # the earliest copy
    assert library.find(str(written[1].key)).volume == "001"
    assert library.verify(written[3].key) == written[3].checksum
    assert library.read(written[2].key) == blob_of(3)[1]
    with pytest.raises(ArchiveNotFound, match="Catch-Up Archiver"):
        library.find(ImageKey(f"MC_O_{DAY}_000077", "R11", "raw"))


def test_tape_verify_detects_damage(tmp_path):
    image = make_image()
    key = ImageKey.of(image)
    data = encode_image(image)
    with TapeArchive(tmp_path, "x", fsync=False) as tape:
        tape.append(key, data, blob_meta(key, data, "engineering"))
    with h5py.File(tmp_path / "volume-x.h5", "r+") as f:
        blob = f["blobs/000000001"]
        at = pixel_offset(data, image)
        blob[at] = blob[at] ^ 0xFF
    with pytest.raises(CDSChecksumError, match="damaged"):
        TapeLibrary(tmp_path).verify(key)
    with TapeArchive(tmp_path, "x", fsync=False) as tape, pytest.raises(CDSChecksumError):
        tape.verify(key)
    with TapeArchive(tmp_path, "x", fsync=False) as tape, pytest.raises(CDSChecksumError, match="index says"):
        tape.verify(key, received=data)  # the index's SHA-256 is checked first


def test_tape_verify_against_received_bytes(tmp_path):
    image = make_image()
    key = ImageKey.of(image)
    data = encode_image(image)
    meta = blob_meta(key, data, "science")
    with TapeArchive(tmp_path, "x", fsync=False) as tape:
        tape.append(key, data, meta)
        assert tape.verify(key, received=data) == meta.checksum == tape.verify(key)
        # a copy that matches its index but not what the distributor received (stored the wrong bytes)
        with pytest.raises(CDSChecksumError, match="differs from the .* bytes stored"):
            tape.verify(key, received=flip_byte(data, pixel_offset(data, image)))


def test_tape_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="volume name"):
        TapeArchive(tmp_path, "../escape")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TapeLibrary(tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        TapeLibrary(tmp_path / "f")
    with pytest.raises(NotADirectoryError):
        TapeArchive(tmp_path / "f", "1")
    (tmp_path / "volume-bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(CDSFormatError, match="unreadable"):
        TapeArchive(tmp_path, "bad")
    with pytest.raises(CDSFormatError, match="unreadable"):
        TapeLibrary(tmp_path).index()


def test_tape_survives_a_writer_dying_between_appends(tmp_path):
    body = """
        import os
        from lsstpipe.archive import TapeArchive
        from test_archive_storage import blob_of
        tape = TapeArchive(sys.argv[1], "007")
        tape.append(*blob_of(1))
        tape.append(*blob_of(2, kind="crosstalk_corrected"))
        os._exit(0)  # no close, no interpreter shutdown
        """
    proc = run_script(body, str(tmp_path))
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    library = TapeLibrary(tmp_path)
    assert [r.sequence for r in library.index()] == [1, 2]
    for record in library.index():
        assert library.verify(record.key) == record.checksum
    with TapeArchive(tmp_path, "007", fsync=False) as tape:  # the dead writer's lock is gone
        assert tape.append(*blob_of(3)).sequence == 3
        assert [r.key.image_id[-1] for r in tape.index()] == ["1", "2", "3"]


def run_script(body: str, *args: str) -> subprocess.Popen:
    """Start ``python -c body args…`` in the repository, with this test module importable."""
    script = f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n" + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def test_outage_buffer_shared_by_processes_never_overfills(tmp_path):
    size = len(blob_of(1)[1])
    OutageBuffer(tmp_path, 5 * size, fsync=False)
    body = """
        from lsstpipe.archive import OutageBuffer, OutageBufferFull
        from test_archive_storage import blob_of
        buf = OutageBuffer(sys.argv[1], fsync=False)
        stored = 0
        for seq in range(int(sys.argv[2]), int(sys.argv[2]) + 4):
            try:
                buf.put(*blob_of(seq))
                stored += 1
            except OutageBufferFull:
                pass
        print(stored)
        """
    procs = [run_script(body, str(tmp_path), str(first)) for first in (1, 11)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    buf = OutageBuffer(tmp_path)
    assert sum(int(out) for out in outs) == len(buf) == 5 and buf.nbytes <= buf.capacity_bytes
    pending = buf.pending()
    assert len({i.sequence for i in pending}) == 5
    assert all(buf.verify(i.key) == i.meta.checksum for i in pending)


# ---------------------------------------------------------------- the distributor's read-back check


class _Post:
    """A postman that keeps what is sent (the distributor's reports, the replicator's images)."""

    rank = 3

    def __init__(self):
        self.sent = []
        self.dead = set()

    def send(self, payload, dest, data=None):
        self.sent.append(payload)


@pytest.mark.parametrize("kind", ["raw", "crosstalk_corrected"])
def test_distributor_verifies_the_stored_copy_against_the_bytes_it_received(tmp_path, monkeypatch, kind):
    """The image received is decoded once (its pixels' checksum not checked again: the bytes' SHA-256 matched
    those the replicator verified); the Archive's copy read back is compared with those bytes (not decoded
    again), and a copy the store damaged is reported, not confirmed."""
    from lsstpipe.archive import storage
    from lsstpipe.runtime.archiving import ArchiveSettings, StoragePaths
    from lsstpipe.runtime.distributor import Distributor
    from lsstpipe.runtime.messages import Archived, ImageData

    decodes = []
    real_decode = storage.decode_image

    def counting_decode(data, key, verify=True):
        decodes.append((key, verify))
        return real_decode(data, key, verify)

    monkeypatch.setattr(storage, "decode_image", counting_decode)
    monkeypatch.setattr("lsstpipe.runtime.distributor.decode_image", counting_decode)
    monkeypatch.setattr("lsstpipe.archive.tape.decode_image", counting_decode)

    def receive(dist, seq, damage_at=None):
        key, data, meta = blob_of(seq, kind=kind)
        sha = hashlib.sha256(data).hexdigest()
        header = ImageData(7, seq, 0, key.image_id, key.raft, kind, meta.checksum, sha, len(data), False, "science")
        sent = data if damage_at is None else flip_byte(data, damage_at)
        dist._receive(header, np.frombuffer(sent, np.uint8), source=1)
        return key, meta, [p for p in dist.post.sent if isinstance(p, Archived)][-1]

    dist = Distributor(_Post(), StoragePaths(tmp_path), ArchiveSettings())
    key, meta, report = receive(dist, 1)
    assert report.ok and report.checksum == meta.checksum and report.error is None
    # decoded once, on receipt, when workers need it; a raw image was verified by the replicator and its
    # bytes arrived unchanged (SHA-256): it is not decoded at all
    assert decodes == ([(key, False)] if kind == "crosstalk_corrected" else [])
    store = dist.tape if kind == "raw" else dist.raw_cache
    assert store.verify(key) == meta.checksum  # the stored copy decodes and verifies
    # damaged in transit (a pixel byte: the header still reads): refused, the replicator is asked again
    key3, _, report = receive(dist, 3, damage_at=pixel_offset(blob_of(3, kind=kind)[1], make_image(3, kind=kind)))
    assert not report.ok and "damaged in transit" in report.error and "resend" in report.error
    assert "SHA-256" in report.error and key3 not in [r.key for r in dist.tape.index()] and not dist.raw_cache.has(key3)

    # a store that hands back other bytes than those written: reported, the Base keeps its copy
    if kind == "raw":
        from lsstpipe.archive import tape as tape_module

        real = tape_module._read_blob
        monkeypatch.setattr(tape_module, "_read_blob", lambda path, record: flip_byte(real(path, record), 100))
    else:
        real = RawImageCache.get
        monkeypatch.setattr(RawImageCache, "get", lambda self, k: flip_byte(real(self, k), 100))
    _, _, report = receive(dist, 2)
    assert not report.ok and "storing at the Archive failed" in report.error
    assert ("index says" if kind == "raw" else "differs from the") in report.error


def test_replicator_resends_only_a_verified_copy(tmp_path):
    """After the distributor refused an image, the replicator sends it again from a copy whose content it
    verified: the outage buffer's, else the CDS buffer's; with neither, it reports why and sends nothing."""
    from lsstpipe.db.records import ImageTransfer
    from lsstpipe.runtime.archiving import ArchiveSettings, Replicator, StoragePaths
    from lsstpipe.runtime.messages import ImageData

    paths = StoragePaths(tmp_path)
    image = make_image(kind="crosstalk_corrected")
    key, data, meta = blob_of(kind="crosstalk_corrected")
    rep = Replicator(_Post(), 9, paths, ArchiveSettings())
    rep.outage.put(key, data, meta)
    damaged = flip_byte(data, pixel_offset(data, image))
    rep.outage.path(key).write_bytes(damaged)  # damaged on the Base's disk since it was stored
    cds = rep._cds_path(key)
    cds.parent.mkdir(parents=True)
    cds.write_bytes(data)

    rep.resend(key, 5)
    sent = [p for p in rep.post.sent if isinstance(p, ImageData)]
    assert len(sent) == 1 and sent[0].checksum == meta.checksum
    assert sent[0].sha256 == hashlib.sha256(data).hexdigest()  # the CDS copy, not the damaged one

    cds.write_bytes(damaged)
    rep.post.sent.clear()
    rep.resend(key, 6)
    assert not [p for p in rep.post.sent if isinstance(p, ImageData)]
    (report,) = [p for p in rep.post.sent if isinstance(p, ImageTransfer)]
    assert not report.ok and "cannot resend" in report.error and "left to catch-up" in report.error


class _SlowPost(_Post):
    """A postman whose image sends take ``seconds`` (a distributor still busy with the image before)."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def send(self, payload, dest, data=None):
        from lsstpipe.runtime.messages import ImageData

        if isinstance(payload, ImageData):
            time.sleep(self.seconds)
        super().send(payload, dest, data)


@pytest.mark.parametrize(
    ("rate_mb_s", "injected", "slow"),
    [
        (None, False, False),  # the image's bytes at the slowest acceptable rate leave room for the 0.2 s send
        (1e9, False, True),  # at a rate that makes its bytes free, 0.2 s is over the 0.1 s allowance
        (None, True, True),  # an injected slow link is reported whatever the image's size
    ],
)
def test_replicator_reports_a_slow_link_by_the_transfer_size(tmp_path, rate_mb_s, injected, slow):
    """A transfer is slow when it takes longer than ``slow_transfer_s`` plus its bytes at ``slow_link_mb_s``:
    a full-size raft may take seconds without its link being slow, a small image may not."""
    from lsstpipe.runtime.archiving import ArchiveSettings, Replicator, StoragePaths, _RepJob
    from lsstpipe.runtime.messages import JobAssignment, JobKind, LinkStatus

    defaults = ArchiveSettings()
    assert defaults.slow_after(190_000_000) == pytest.approx(2.4) and defaults.slow_after(0) == 0.5
    key, data, meta = blob_of(kind="crosstalk_corrected")
    rate = rate_mb_s or len(data) / 3.0 / 1e6  # the image's bytes: 3 s at the slowest acceptable rate
    settings = ArchiveSettings(slow_transfer_s=0.1, slow_link_mb_s=rate, slow_link_delay_s=0.05)
    rep = Replicator(_SlowPost(0.2), 9, StoragePaths(tmp_path), settings)
    rep.slow = injected
    job = JobAssignment(1, JobKind.SCIENCE_RAFT, 1, raft=key.raft, image_ids=(key.image_id,), mode="science")
    rep._ship(_RepJob(job), key, data, meta.checksum, job)
    reports = [p for p in rep.post.sent if isinstance(p, LinkStatus)]
    if slow:
        (report,) = reports
        assert not report.up and "slow link" in report.reason and not rep.link_up
    else:
        assert reports == [] and rep.link_up
    with pytest.raises(ValueError, match="slow_link_mb_s must be a number of MB/s > 0"):
        ArchiveSettings(slow_link_mb_s=0)


def test_a_wavefront_job_moves_every_corner_rafts_images(tmp_path):
    """One replicator job for the wavefront sensors (LDM-230's 21 + 1): it waits for, fetches and sends the
    images of each corner raft it names, both kinds."""
    from lsstpipe.runtime.archiving import ArchiveSettings, Replicator, StoragePaths, _RepJob
    from lsstpipe.runtime.messages import Expect, ImageData, JobAssignment, JobKind, JobResult

    rep = Replicator(_Post(), 9, StoragePaths(tmp_path), ArchiveSettings())
    keys = []
    for raft in ("R00", "R44"):
        for kind in ("raw", "crosstalk_corrected"):
            key, data, _ = blob_of(raft=raft, kind=kind)
            path = rep._cds_path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            keys.append(key)
    job = JobAssignment(3, JobKind.WAVEFRONT, 1, image_ids=(keys[0].image_id,), rafts=("R00", "R44"))
    rep._start(job)
    assert sorted(e.raft for e in rep.post.sent if isinstance(e, Expect)) == ["R00", "R44"]
    assert rep._arrived(_RepJob(job))
    rep.jobs[3].readout = True
    rep.tick()
    sent = {(p.raft, p.kind) for p in rep.post.sent if isinstance(p, ImageData)}
    assert sent == {(k.raft, k.kind) for k in keys}
    (result,) = [p for p in rep.post.sent if isinstance(p, JobResult)]
    assert result.ok and dict(result.counts)["sent"] == 4
