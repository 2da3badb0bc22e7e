"""CCD assembly and disassembly: exact round trips, amplifier orientation, real-camera sections, errors."""

import numpy as np
import pytest
from astropy.io import fits

from lsstpipe.camera import SEGMENT_ORDER, get_camera
from lsstpipe.io import RawExposure, RawFormatError, read_raw, write_raw
from lsstpipe.isr import AmpRegions, assemble_ccd, disassemble_ccd, overscan_regions, parse_section

MINI = get_camera("mini")
LSSTCAM = get_camera("lsstcam")


def _header():
    return {
        "OBSID": "MC_O_20250101_000007", "DAYOBS": 20250101, "SEQNUM": 7, "IMGTYPE": "OBJECT",
        "EXPTIME": 30.0, "MJD-OBS": 60676.2, "FILTER": "i", "RA": 10.0, "DEC": -45.0, "ROTPA": 0.0,
    }  # fmt: skip


def _image(det, seed=0):
    image = np.random.default_rng(seed).integers(-1000, 2**20, det.shape).astype(np.int32)
    image.flags.writeable = False
    return image


def _round_trip(tmp_path, det):
    image = _image(det)
    segs = disassemble_ccd(image, det)
    segs.flags.writeable = False
    raw = read_raw(write_raw(tmp_path / f"{det.name}.fits", det, segs, _header()))
    out = assemble_ccd(raw)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, image)
    return raw


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        ("[1:512,1:2002]", (0, 512, 0, 2002, False, False)),
        ("[512:1,4004:2003]", (0, 512, 2002, 4004, True, True)),
        ("[4072:3564,4000:2001]", (3563, 4072, 2000, 4000, True, True)),
        (" [ 4:512 , 1:2000 ] ", (3, 512, 0, 2000, False, False)),
        ("[7:7,3:1]", (6, 7, 0, 3, False, True)),
    ],
)
def test_parse_section(s, expected):
    assert parse_section(s) == expected


@pytest.mark.parametrize("s", ["", "1:2,3:4", "[1:2,3]", "[0:5,1:2]", "[a:2,1:2]", "[1:2,1:2,1:2]", None, 5])
def test_parse_section_rejects(s):
    with pytest.raises(ValueError, match="section"):
        parse_section(s)


@pytest.mark.parametrize("name", ["R10_S00", "R11_S00", "R11_S22", "R00_SW"])
def test_mini_round_trip_exact(tmp_path, name):
    _round_trip(tmp_path, MINI[name])


@pytest.mark.parametrize(
    ("name", "vendor", "seg10", "seg17", "datasec"),
    [
        ("R01_S00", "ITL", "[509:1,4000:2001]", "[4072:3564,4000:2001]", "[4:512,1:2000]"),
        ("R22_S11", "E2V", "[512:1,4004:2003]", "[4096:3585,4004:2003]", "[11:522,1:2002]"),
    ],
)
def test_lsstcam_round_trip_and_real_sections(tmp_path, name, vendor, seg10, seg17, datasec):
    det = LSSTCAM[name]
    assert det.vendor.name == vendor
    raw = _round_trip(tmp_path, det)
    assert raw.header["INSTRUME"] == "LSSTCam" and raw.header["CCD_MANU"] == vendor
    assert raw.segments["Segment10"].shape == (2048, 576)
    assert raw.segment_headers["Segment10"]["DETSEC"] == seg10
    assert raw.segment_headers["Segment17"]["DETSEC"] == seg17
    for seg in SEGMENT_ORDER:
        assert raw.segment_headers[seg]["DATASEC"] == datasec
    assert overscan_regions(raw) == overscan_regions(det)


@pytest.mark.parametrize("name", ["R10_S00", "R11_S00"])
def test_amp_index_lands_in_bbox(name):
    det = MINI[name]
    segs = np.full((16, *det.raw_shape), -1, dtype=np.int32)
    for amp in det.amps:
        segs[amp.hdu - 1][amp.raw_data] = amp.hdu
    out = assemble_ccd(_raw_from_segments(det, segs))
    expected = np.zeros(det.shape, dtype=np.int32)
    for amp in det.amps:
        expected[amp.data_slices] = amp.hdu
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("name", ["R10_S00", "R11_S00"])
def test_every_pixel_follows_dtv_dtm(name):
    """Independent of DETSEC: detector (1-based) = DTM · raw (1-based) + DTV, then the final y flip."""
    det = MINI[name]
    ny = det.shape[0]
    rows, cols = det.raw_shape
    r, c = np.mgrid[0:rows, 0:cols]
    segs = np.stack([(k * rows + r) * cols + c for k in range(16)]).astype(np.int32)
    out = assemble_ccd(_raw_from_segments(det, segs))
    for amp in det.amps:
        rr, cc = r[amp.raw_data], c[amp.raw_data]
        det_x = amp.dtm[0] * (cc + 1) + amp.dtv[0]
        det_y = amp.dtm[1] * (rr + 1) + amp.dtv[1]
        fy, fx = (ny - det_y).astype(int), (det_x - 1).astype(int)
        np.testing.assert_array_equal(out[fy, fx], segs[amp.hdu - 1][amp.raw_data])
        y0, y1, x0, x1 = amp.bbox
        assert (fy.min(), fy.max() + 1, fx.min(), fx.max() + 1) == (y0, y1, x0, x1)


def _raw_from_segments(det, segs, path="memory.fits"):
    headers = {}
    for amp in det.amps:
        headers[amp.segment] = fits.Header([("DATASEC", amp.datasec), ("DETSEC", amp.detsec)])
    ny, nx = det.shape
    primary = fits.Header([("DETSIZE", f"[1:{nx},1:{ny}]")])
    segments = {amp.segment: segs[amp.hdu - 1] for amp in det.amps}
    return RawExposure(path=path, header=primary, segments=segments, segment_headers=headers)


def test_assemble_accepts_path_dtype_and_no_detsize(tmp_path):
    det = MINI["R11_S00"]
    image = _image(det)
    path = write_raw(tmp_path / "x.fits", det, disassemble_ccd(image, det), _header())
    np.testing.assert_array_equal(assemble_ccd(str(path)), image)
    as_float = assemble_ccd(path, dtype=np.float64)
    assert as_float.dtype == np.float64
    np.testing.assert_array_equal(as_float, image)
    raw = read_raw(path)
    del raw.header["DETSIZE"]
    for hdr in raw.segment_headers.values():
        del hdr["DETSIZE"]
    np.testing.assert_array_equal(assemble_ccd(raw), image)  # size from the union of DETSECs
    with pytest.raises(TypeError, match="RawExposure or a path"):
        assemble_ccd(image)


def test_disassemble_into_out_keeps_overscan():
    det = MINI["R10_S00"]
    image = _image(det)
    out = np.full((16, *det.raw_shape), 7, dtype=np.int64)
    result = disassemble_ccd(image, det, out=out)
    assert result is out
    for amp in det.amps:
        for region in (amp.raw_serial_overscan, amp.raw_parallel_overscan, amp.raw_prescan):
            assert (out[amp.hdu - 1][region] == 7).all()
    np.testing.assert_array_equal(assemble_ccd(_raw_from_segments(det, out)), image)
    fresh = disassemble_ccd(image, det)
    assert fresh.dtype == image.dtype
    for amp in det.amps:
        assert (fresh[amp.hdu - 1][amp.raw_serial_overscan] == 0).all()


def test_disassemble_validates():
    det = MINI["R10_S00"]
    with pytest.raises(ValueError, match="assembles to"):
        disassemble_ccd(np.zeros((10, 10)), det)
    with pytest.raises(ValueError, match="needs"):
        disassemble_ccd(_image(det), det, out=np.zeros((16, 3, 3), np.int32))
    with pytest.raises(ValueError, match="convert the image"):
        disassemble_ccd(_image(det).astype(float), det, out=np.zeros((16, *det.raw_shape), np.int32))


def _broken(det, edit):
    raw = _raw_from_segments(det, disassemble_ccd(_image(det), det), path="broken.fits")
    edit(raw)
    return raw


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda raw: raw.segment_headers["Segment11"].set("DETSEC", "[1:64,1:250]"),
            "Segment11 and Segment00 overlap",
        ),
        (lambda raw: raw.segment_headers["Segment11"].set("DETSEC", "[1:64,501:750]"), "outside"),
        (lambda raw: raw.segment_headers["Segment11"].set("DATASEC", "[4:60,1:250]"), "same size"),
        (lambda raw: raw.header.set("DETSIZE", "[1:600,1:500]"), "gaps"),
        (lambda raw: raw.header.set("DETSIZE", "[2:512,1:500]"), "must start"),
        (lambda raw: raw.header.set("DETSIZE", "huge"), "DETSIZE"),
        (lambda raw: raw.segment_headers["Segment04"].set("DETSEC", "[x]"), "Segment04 DETSEC"),
        (lambda raw: raw.segment_headers["Segment04"].remove("DATASEC"), "Segment04 has no DATASEC"),
        (lambda raw: raw.segments.pop("Segment05"), "missing segment"),
    ],
)
def test_assemble_rejects_bad_sections(edit, match):
    with pytest.raises(RawFormatError, match=match) as info:
        assemble_ccd(_broken(MINI["R10_S00"], edit))
    assert "broken.fits" in str(info.value)


@pytest.mark.parametrize("name", ["R10_S00", "R11_S00"])
def test_overscan_regions_from_raw_without_biassec(tmp_path, name):
    det = MINI[name]
    segs = disassemble_ccd(_image(det), det)
    path = write_raw(tmp_path / "x.fits", det, segs, _header(), biassec=False)
    raw = read_raw(path)
    assert "BIASSEC" not in raw.segment_headers["Segment10"]
    regions = overscan_regions(raw)
    assert list(regions) == list(SEGMENT_ORDER)
    assert regions == overscan_regions(det) == overscan_regions(path)
    for amp in det.amps:
        r = regions[amp.segment]
        assert isinstance(r, AmpRegions)
        assert (r.data, r.serial_overscan, r.parallel_overscan, r.prescan) == (
            amp.raw_data, amp.raw_serial_overscan, amp.raw_parallel_overscan, amp.raw_prescan,
        )  # fmt: skip
    rows, cols = regions["Segment10"].serial_overscan
    with_bias = read_raw(write_raw(tmp_path / "b.fits", det, segs, _header()))
    assert with_bias.segment_headers["Segment10"]["BIASSEC"] == f"[{cols.start + 1}:{cols.stop},1:{rows.stop}]"


def test_overscan_regions_vendor_identification():
    itl, e2v = LSSTCAM["R01_S00"], LSSTCAM["R22_S11"]
    assert itl.raw_shape == e2v.raw_shape  # full-size segments alone cannot tell the vendors apart
    segs = np.zeros((16, *itl.raw_shape), np.int32)
    raw = _raw_from_segments(itl, segs)
    raw.header["CCD_MANU"] = "ITL"
    assert overscan_regions(raw) == overscan_regions(itl)
    del raw.header["CCD_MANU"]
    with pytest.raises(RawFormatError, match="ambiguous; set CCD_MANU"):
        overscan_regions(raw)
    raw.header["CCD_MANU"] = "E2V"
    with pytest.raises(RawFormatError, match="DATASEC .* does not match the E2V layout"):
        overscan_regions(raw)
    mini = _raw_from_segments(MINI["R11_S00"], np.zeros((16, *MINI["R11_S00"].raw_shape), np.int32))
    assert overscan_regions(mini) == overscan_regions(MINI["R11_S00"])  # shape alone decides for mini
    mini.header["CCD_MANU"] = "ITL"
    with pytest.raises(RawFormatError, match="matches none"):
        overscan_regions(mini)
