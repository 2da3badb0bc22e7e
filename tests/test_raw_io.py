"""Raw file format: writing, reading, determinism, real-camera variants and every bad-input path."""

import gzip
import os
import re
import shutil
import warnings

import numpy as np
import pytest
from astropy.io import fits

import lsstpipe.io.raw as raw_io
from lsstpipe.camera import SEGMENT_ORDER, get_camera
from lsstpipe.io import REQUIRED_KEYWORDS, RawExposure, RawFormatError, read_raw, write_raw
from lsstpipe.isr import assemble_ccd, disassemble_ccd

MINI = get_camera("mini")
DETECTORS = ("R10_S00", "R11_S00")  # ITL, e2v


def _header(**extra):
    hdr = {
        "OBSID": "MC_O_20250101_000042", "DAYOBS": 20250101, "SEQNUM": 42, "IMGTYPE": "OBJECT",
        "EXPTIME": 30.0, "MJD-OBS": 60676.25, "FILTER": "r", "RA": 150.1, "DEC": -30.2, "ROTPA": 12.5,
    }  # fmt: skip
    hdr.update(extra)
    return hdr


def _segments(det, seed=1, dtype=np.int32, high=2**18):
    segs = np.random.default_rng(seed).integers(0, high, (16, *det.raw_shape)).astype(dtype)
    segs.flags.writeable = False
    return segs


@pytest.fixture(params=DETECTORS)
def det(request):
    return MINI[request.param]


@pytest.fixture
def raw_file(tmp_path, det):
    segs = _segments(det)
    return write_raw(tmp_path / "raw.fits", det, segs, _header()), det, segs


def _rewrite(src, dst, edit):
    """Copy a raw with astropy after ``edit(hdul)``, with fresh checksums so only the edit is wrong."""
    with fits.open(src) as hdul:
        edit(hdul)
        hdul.writeto(dst, checksum=True)
    return dst


def test_round_trip_exact(raw_file):
    path, det, segs = raw_file
    raw = read_raw(path)
    assert list(raw.segments) == list(SEGMENT_ORDER)
    np.testing.assert_array_equal(raw.stack(), segs)
    assert raw.stack().dtype == np.int32 and raw.stack().dtype.isnative
    assert raw.detector_name == det.name and raw.obsid == "MC_O_20250101_000042"
    for key in REQUIRED_KEYWORDS:
        assert raw.header[key] == _header()[key]
    ny, nx = det.shape
    assert raw.header["INSTRUME"] == "LSSTCam-mini"
    assert raw.header["CCD_MANU"] == det.vendor.manufacturer and raw.header["LSST_NUM"] == det.serial
    assert raw.header["DETSIZE"] == f"[1:{nx},1:{ny}]"
    for amp in det.amps:
        h = raw.segment_headers[amp.segment]
        assert h["EXTNAME"] == amp.segment and h["CHANNEL"] == amp.hdu
        assert (h["DATASEC"], h["DETSEC"]) == (amp.datasec, amp.detsec)
        assert (h["DTV1"], h["DTV2"], h["DTM1_1"], h["DTM2_2"]) == (*amp.dtv, *amp.dtm)
        assert h["DTM1_2"] == 0 and h["DTM2_1"] == 0
        rows, cols = amp.raw_serial_overscan
        assert h["BIASSEC"] == f"[{cols.start + 1}:{cols.stop},{rows.start + 1}:{rows.stop}]"
    with pytest.raises(ValueError, match="read-only"):
        raw.segments["Segment10"][0, 0] = 1


def test_file_is_standard_fits_with_valid_checksums(raw_file):
    path, _, _ = raw_file
    with fits.open(path, checksum=True) as hdul:
        assert len(hdul) == 17 and hdul[0].data is None
        for hdu in hdul:
            assert hdu.verify_checksum() == 1 and hdu.verify_datasum() == 1
        for hdu in hdul[1:]:
            assert hdu.header["BITPIX"] == 32 and "BZERO" not in hdu.header


def test_same_inputs_give_identical_bytes(tmp_path, det):
    segs = _segments(det)
    a = write_raw(tmp_path / "a.fits", det, segs, _header())
    b = write_raw(tmp_path / "b.fits", det, segs.copy(), _header())
    assert a.read_bytes() == b.read_bytes()
    assert not re.search(rb"\d{4}-\d\d-\d\dT\d\d:\d\d", a.read_bytes()), "a timestamp makes files differ"
    c = write_raw(tmp_path / "c.fits", det, segs, _header(SEQNUM=43))
    assert a.read_bytes() != c.read_bytes()


def test_uint32_stored_exactly_and_range_checked(tmp_path, det):
    segs = _segments(det, dtype=np.uint32, high=2**31)
    raw = read_raw(write_raw(tmp_path / "u.fits", det, segs, _header()))
    np.testing.assert_array_equal(raw.stack(), segs.astype(np.int64))
    too_big = segs.copy()
    too_big[3, 0, 0] = 2**31
    with pytest.raises(ValueError, match="signed 32-bit"):
        write_raw(tmp_path / "big.fits", det, too_big, _header())
    with pytest.raises(ValueError, match="integers"):
        write_raw(tmp_path / "f.fits", det, segs.astype(np.float32), _header())


def test_write_validates_header_and_shape(tmp_path, det):
    segs = _segments(det)
    hdr = _header()
    del hdr["FILTER"], hdr["ROTPA"]
    with pytest.raises(ValueError, match="FILTER, ROTPA"):
        write_raw(tmp_path / "x.fits", det, segs, hdr)
    with pytest.raises(ValueError, match="RAFTBAY"):
        write_raw(tmp_path / "x.fits", det, segs, _header(RAFTBAY="R99"))
    with pytest.raises(ValueError, match="BITPIX"):
        write_raw(tmp_path / "x.fits", det, segs, _header(BITPIX=16))
    with pytest.raises(ValueError, match="expected"):
        write_raw(tmp_path / "x.fits", det, segs[:15], _header())
    assert not (tmp_path / "x.fits").exists()


def test_header_overrides_and_comments(tmp_path, det):
    hdr = _header(INSTRUME="LSSTCam", EXPTIME=(15.0, "shutter open time"), RAFTBAY=det.raft)
    raw = read_raw(write_raw(tmp_path / "x.fits", det, _segments(det), hdr))
    assert raw.header["INSTRUME"] == "LSSTCam"
    assert raw.header["EXPTIME"] == 15.0 and raw.header.comments["EXPTIME"] == "shutter open time"
    as_header = fits.Header([(k, v, f"the {k}") for k, v in _header(RA=None, DEC=None).items()])
    as_header["HISTORY"] = "simulated"
    raw = read_raw(write_raw(tmp_path / "y.fits", det, _segments(det), as_header))
    assert raw.header["RA"] in (None, fits.card.UNDEFINED)
    assert raw.header.comments["OBSID"] == "the OBSID" and list(raw.header["HISTORY"]) == ["simulated"]


def test_overwrite_and_atomic_write(tmp_path, det, monkeypatch):
    segs = _segments(det)
    path = write_raw(tmp_path / "x.fits", det, segs, _header())
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_raw(path, det, segs, _header(SEQNUM=7))

    real_chunks = raw_io.raw_chunks

    def crash(*args, **kwargs):
        yield real_chunks(*args, **kwargs)[0]  # a partial file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(raw_io, "raw_chunks", crash)
    with pytest.raises(OSError, match="disk full"):
        write_raw(path, det, segs, _header(SEQNUM=7), overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        write_raw(tmp_path / "new.fits", det, segs, _header())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.fits"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_raw(tmp_path / "nodir" / "x.fits", det, segs, _header())


def _camera_style(path, det, segs, *, compress):
    """A file shaped like a real LSSTCam raw: no BIASSEC/DETSIZE, extra non-segment HDUs, maybe RICE."""
    primary = fits.PrimaryHDU()
    primary.header.update(_header(RAFTBAY=det.raft, CCDSLOT=det.slot, CCD_MANU=det.vendor.manufacturer))
    hdus = [primary]
    for amp in det.amps:
        hdr = fits.Header([("EXTNAME", amp.segment), ("DATASEC", amp.datasec), ("DETSEC", amp.detsec)])
        data = segs[amp.hdu - 1]
        hdu = fits.CompImageHDU(data, hdr, compression_type="RICE_1") if compress else fits.ImageHDU(data, hdr)
        hdus.append(hdu)
        if amp.hdu == 8:
            hdus.append(fits.ImageHDU(header=fits.Header([("EXTNAME", "WREB")])))
    cols = [fits.Column(name="TEMP", format="E", array=np.array([-100.0, -99.5]))]
    hdus += [fits.BinTableHDU.from_columns(cols, name="REB_COND"), fits.ImageHDU(name="TEST_COND")]
    fits.HDUList(hdus).writeto(path, checksum=True)
    return path


@pytest.mark.parametrize("compress", [True, False])
def test_reads_camera_style_files(tmp_path, det, compress):
    segs = _segments(det)
    path = _camera_style(tmp_path / "cam.fits", det, segs, compress=compress)
    with fits.open(path) as hdul:
        assert isinstance(hdul["Segment10"], fits.CompImageHDU) == compress
        assert hdul[1].header["EXTNAME"] == "Segment10"
    raw = read_raw(path)
    assert list(raw.segments) == list(SEGMENT_ORDER) and "BIASSEC" not in raw.segment_headers["Segment00"]
    np.testing.assert_array_equal(raw.stack(), segs)
    image = np.random.default_rng(3).integers(0, 2**18, det.shape).astype(np.int32)
    segs = disassemble_ccd(image, det)
    path = _camera_style(tmp_path / "cam2.fits", det, segs, compress=compress)
    np.testing.assert_array_equal(assemble_ccd(path), image)


def test_reads_gzipped_file(raw_file, tmp_path):
    path, _, segs = raw_file
    gz = tmp_path / "raw.fits.gz"
    gz.write_bytes(gzip.compress(path.read_bytes(), mtime=0))
    np.testing.assert_array_equal(read_raw(gz).stack(), segs)


def _expect_error(path, match):
    with pytest.raises(RawFormatError, match=match) as info:
        read_raw(path)
    assert str(path) in str(info.value)
    return info.value


def test_missing_garbage_empty_and_directory(tmp_path):
    _expect_error(tmp_path / "nope.fits", "no such raw file")
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(np.random.default_rng(0).bytes(5760))
    _expect_error(garbage, "not a FITS file")
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    _expect_error(empty, "not a FITS file")
    _expect_error(tmp_path, "not a regular file")
    fake = tmp_path / "fake.fits"
    fake.write_bytes(b"SIMPLE  =" + b"\x00" * 2871)
    _expect_error(fake, "FITS")


@pytest.mark.parametrize("cut", [100, 2880, 5 * 2880])
def test_truncated_file(raw_file, tmp_path, cut):
    path, _, _ = raw_file
    bad = tmp_path / "cut.fits"
    bad.write_bytes(path.read_bytes()[:-cut])
    _expect_error(bad, "truncated")


def test_truncated_at_hdu_boundary_names_missing_segment(raw_file, tmp_path):
    path, _, _ = raw_file
    with fits.open(path) as hdul:
        end = hdul.fileinfo(15)["datLoc"] + hdul.fileinfo(15)["datSpan"]
    bad = tmp_path / "cut.fits"
    bad.write_bytes(path.read_bytes()[:end])
    _expect_error(bad, r"missing segment\(s\) Segment00;.*truncated")


def test_truncated_gzip(raw_file, tmp_path):
    path, _, _ = raw_file
    gz = gzip.compress(path.read_bytes(), mtime=0)
    bad = tmp_path / "cut.fits.gz"
    bad.write_bytes(gz[: len(gz) // 2])
    _expect_error(bad, "truncated")


def test_corrupted_data_fails_checksum(raw_file, tmp_path):
    path, _, _ = raw_file
    with fits.open(path) as hdul:
        offset = hdul.fileinfo(5)["datLoc"] + 1000
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    bad = tmp_path / "flip.fits"
    bad.write_bytes(bytes(data))
    _expect_error(bad, "corrupt: CHECKSUM/DATASUM mismatch in Segment14;")


def test_corrupted_compressed_data_fails_checksum(tmp_path, det):
    path = _camera_style(tmp_path / "cam.fits", det, _segments(det), compress=True)
    with fits.open(path, disable_image_compression=True) as hdul:
        offset = hdul.fileinfo(3)["datLoc"] + hdul.fileinfo(3)["datSpan"] // 2
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    _expect_error(path, "CHECKSUM/DATASUM mismatch in Segment12;")


def test_missing_segment(raw_file, tmp_path):
    path, _, _ = raw_file

    def drop(hdul):
        del hdul["Segment03"]
        del hdul["Segment14"]

    _expect_error(_rewrite(path, tmp_path / "bad.fits", drop), r"Segment14, Segment03")


def test_inconsistent_segment_shapes(raw_file, tmp_path):
    path, _, _ = raw_file

    def shrink(hdul):
        hdul["Segment05"].data = hdul["Segment05"].data[:-2].copy()

    _expect_error(_rewrite(path, tmp_path / "bad.fits", shrink), "different shapes.*Segment05")


def test_datasec_outside_segment(raw_file, tmp_path):
    path, _, _ = raw_file

    def shrink_all(hdul):
        for name in SEGMENT_ORDER:
            hdul[name].data = hdul[name].data[:, :50].copy()

    _expect_error(_rewrite(path, tmp_path / "bad.fits", shrink_all), "DATASEC .* outside")


@pytest.mark.parametrize("key", ["DATASEC", "DETSEC"])
def test_unparsable_or_missing_sections(raw_file, tmp_path, key):
    path, _, _ = raw_file

    def garble(hdul):
        hdul["Segment12"].header[key] = "[1:10;1:20]"

    _expect_error(_rewrite(path, tmp_path / "bad.fits", garble), f"Segment12 {key}.*cannot parse")

    def remove(hdul):
        del hdul["Segment12"].header[key]

    _expect_error(_rewrite(path, tmp_path / "bad2.fits", remove), f"Segment12 has no {key}")


def test_nan_float_data(raw_file, tmp_path):
    path, _, _ = raw_file

    def to_float(hdul):
        for name in SEGMENT_ORDER:
            hdul[name].data = hdul[name].data.astype(np.float32)
        hdul["Segment07"].data[3, 4] = np.nan

    _expect_error(_rewrite(path, tmp_path / "bad.fits", to_float), "Segment07 contains NaN")


def test_unknown_and_duplicate_segments(raw_file, tmp_path):
    path, _, _ = raw_file

    def extra(hdul):
        hdul.append(fits.ImageHDU(hdul["Segment00"].data, fits.Header([("EXTNAME", "Segment18")])))

    _expect_error(_rewrite(path, tmp_path / "bad.fits", extra), "unexpected segment HDU Segment18")

    def dup(hdul):
        hdul.append(fits.ImageHDU(hdul["Segment00"].data, hdul["Segment00"].header.copy()))

    _expect_error(_rewrite(path, tmp_path / "bad2.fits", dup), "Segment00 appears twice")


def test_raw_exposure_missing_keyword_message(raw_file):
    path, _, _ = raw_file
    raw = read_raw(path)
    header = raw.header.copy()
    del header["RAFTBAY"]
    bare = RawExposure(path=raw.path, header=header, segments=raw.segments, segment_headers=raw.segment_headers)
    with pytest.raises(RawFormatError, match="no RAFTBAY"):
        _ = bare.detector_name


def test_file_is_closed_after_read(raw_file, tmp_path):
    path, _, _ = raw_file
    moved = tmp_path / "moved.fits"
    shutil.copy(path, moved)
    read_raw(moved)
    if os.path.isdir("/proc/self/fd"):
        open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
        assert str(moved.resolve()) not in open_files


def test_rice_compressed_raws_round_trip_exactly_and_deterministically(tmp_path):
    """write_raw(compress=True): lossless RICE tiles, byte-identical for the same input, truncation caught."""
    import hashlib

    from lsstpipe.camera import get_camera
    from lsstpipe.io import RawFormatError, read_raw, write_raw
    from lsstpipe.isr import assemble_ccd

    det = get_camera("mini")["R11_S01"]
    rng = np.random.default_rng(5)
    segs = (23000 + rng.normal(0, 5, (16, *det.raw_shape))).astype(np.int32)
    hdr = {"OBSID": "MC_O_20240101_000001", "DAYOBS": "20240101", "SEQNUM": 1, "IMGTYPE": "BIAS", "EXPTIME": 0.0,
           "MJD-OBS": 60310.0, "FILTER": "r", "RA": 1.0, "DEC": -30.0, "ROTPA": 0.0}  # fmt: skip
    a = write_raw(tmp_path / "a.fits", det, segs, hdr, compress=True)
    b = write_raw(tmp_path / "b.fits", det, segs, hdr, compress=True)
    plain = write_raw(tmp_path / "p.fits", det, segs, hdr)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    assert a.stat().st_size < plain.stat().st_size / 2
    np.testing.assert_array_equal(read_raw(a).stack(), segs)
    np.testing.assert_array_equal(assemble_ccd(a), assemble_ccd(plain))
    data = a.read_bytes()
    cut = tmp_path / "cut.fits"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(RawFormatError, match="cut.fits"):
        read_raw(cut)


@pytest.mark.parametrize("compress", [False, True])
def test_written_by_blocks_read_the_same_by_astropy(tmp_path, det, compress):
    """The block writer's files are FITS as astropy (cfitsio's conventions) reads them: the same pixels and
    keywords, every CHECKSUM/DATASUM verified; and the block reader agrees with the astropy reader."""
    segs = _segments(det, high=2**31 - 1)
    header = fits.Header([(k, v, f"the {k}") for k, v in _header().items()])
    header["HISTORY"] = "simulated"
    header["LONGSTR"] = "x" * 100  # a CONTINUE card
    path = write_raw(tmp_path / "r.fits", det, segs, header, compress=compress)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # astropy reports checksum failures as warnings
        with fits.open(path, checksum=True) as hdul:
            hdul.verify("exception")
            assert [h.name for h in hdul[1:]] == list(SEGMENT_ORDER)
            for i, hdu in enumerate(hdul[1:]):
                np.testing.assert_array_equal(hdu.data, segs[i])
            assert hdul[0].header["LONGSTR"] == "x" * 100 and list(hdul[0].header["HISTORY"]) == ["simulated"]
    fast = read_raw(path)
    primary, found = raw_io._read_astropy(path, gzipped=False)
    assert fast.header["LONGSTR"] == primary["LONGSTR"] and fast.header["OBSID"] == primary["OBSID"]
    for name, hdr, data in found:
        np.testing.assert_array_equal(fast.segments[name], data)
        for key in ("EXTNAME", "DATASEC", "DETSEC", "BIASSEC", "DTV1", "CHANNEL", "NAXIS1", "NAXIS2", "BITPIX"):
            assert fast.segment_headers[name][key] == hdr[key], key


def test_corrupt_compressed_tile_is_a_clear_error(tmp_path, det):
    path = write_raw(tmp_path / "r.fits", det, _segments(det), _header(), compress=True)
    data = bytearray(path.read_bytes())
    heap = data.index(b"END" + b" " * 77, 2880) // 2880 * 2880 + 2880  # Segment10's data
    data[heap : heap + 4] = (10**6).to_bytes(4, "big")  # its tile claims a million bytes
    bad = tmp_path / "bad.fits"
    bad.write_bytes(bytes(data))
    with pytest.raises(RawFormatError, match="CHECKSUM/DATASUM mismatch in Segment10"):
        read_raw(bad)


def test_zero_blocks_after_the_last_segment_are_ignored(raw_file, tmp_path):
    path, det, segs = raw_file
    padded = tmp_path / "padded.fits"
    padded.write_bytes(path.read_bytes() + b"\0" * 2 * 2880)  # as some copy tools and writers leave
    np.testing.assert_array_equal(read_raw(padded).stack(), segs)
