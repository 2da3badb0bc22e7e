"""LSSTCam geometry: detectors, numbering, vendors, amplifier layout, focal-plane placement."""

from pathlib import Path

import numpy as np
import pytest

from lsstpipe.camera import E2V, ITL, SEGMENT_ORDER, DetectorType, get_camera
from lsstpipe.camera.geometry import FOCAL_LENGTH_MM

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def lsstcam():
    return get_camera("lsstcam")


def test_detector_counts_ids_and_names(lsstcam):
    assert len(lsstcam.science) == 189
    assert len(lsstcam.wavefront) == 4
    ids = [d.id for d in lsstcam]
    names = [d.name for d in lsstcam]
    assert len(set(ids)) == len(ids) == 193
    assert len(set(names)) == len(names) == 193
    assert sorted(d.id for d in lsstcam.science) == list(range(189))
    # Rubin's numbering.
    assert lsstcam["R01_S00"].id == 0
    assert lsstcam["R22_S11"].id == 94
    assert lsstcam["R43_S22"].id == 188
    assert [d.id for d in lsstcam.wavefront] == [191, 195, 199, 203]
    assert {d.raft for d in lsstcam.wavefront} == {"R00", "R04", "R40", "R44"}
    assert all(d.type is DetectorType.WAVEFRONT for d in lsstcam.wavefront)
    assert len(lsstcam.science_rafts) == 21
    assert lsstcam[94] is lsstcam["R22_S11"]


def test_vendors(lsstcam):
    itl = [d for d in lsstcam.science if d.vendor is ITL]
    e2v = [d for d in lsstcam.science if d.vendor is E2V]
    assert len(itl) == 72 and len(e2v) == 117
    assert lsstcam["R22_S11"].shape == (4004, 4096)
    assert lsstcam["R01_S00"].shape == (4000, 4072)
    for raft in lsstcam.science_rafts:
        assert len({d.vendor.name for d in lsstcam.raft_detectors(raft)}) == 1


@pytest.mark.parametrize("vendor", [ITL, E2V], ids=["ITL", "E2V"])
def test_raw_segment_geometry(vendor):
    assert (vendor.raw_height, vendor.raw_width) == (2048, 576)
    assert (vendor.data_width * 8, vendor.data_height * 2) == vendor.ccd_shape[::-1]


@pytest.mark.parametrize("name,datasec,seg10,seg17", [
    ("R01_S00", "[4:512,1:2000]", "[509:1,4000:2001]", "[4072:3564,4000:2001]"),
    ("R22_S11", "[11:522,1:2002]", "[512:1,4004:2003]", "[4096:3585,4004:2003]"),
])  # fmt: skip
def test_amp_sections_match_the_real_camera(lsstcam, name, datasec, seg10, seg17):
    det = lsstcam[name]
    assert [a.segment for a in det.amps] == list(SEGMENT_ORDER)
    assert [a.hdu for a in det.amps] == list(range(1, 17))
    assert all(a.datasec == datasec for a in det.amps)
    assert det.amp("Segment10").detsec == seg10
    assert det.amp("C17").detsec == seg17


@pytest.mark.parametrize("camera_name", ["lsstcam", "mini"])
def test_amplifiers_tile_each_ccd_once(camera_name):
    cam = get_camera(camera_name)
    for det in cam:
        cover = np.zeros(det.shape, np.int8)
        for a in det.amps:
            cover[a.data_slices] += 1
            y0, y1, x0, x1 = a.bbox
            assert (y1 - y0, x1 - x0) == (det.vendor.data_height, det.vendor.data_width)
            assert 0 < a.gain < 3 and 3 < a.read_noise < 10 and a.saturation > a.bias_level
            rows, cols = a.raw_serial_overscan
            assert cols.stop - cols.start == det.vendor.serial_overscan
            rows, cols = a.raw_parallel_overscan
            assert rows.stop - rows.start == det.vendor.parallel_overscan
        assert cover.min() == 1 and cover.max() == 1


def test_electronics_are_stable():
    a = get_camera("lsstcam")["R10_S21"].amps
    get_camera.cache_clear()
    b = get_camera("lsstcam")["R10_S21"].amps
    assert [x.gain for x in a] == [x.gain for x in b]
    assert len({x.gain for x in a}) == 16


def test_focal_plane_matches_rubin_detector_corners(lsstcam):
    """Detector centres agree with Rubin's detector-corner table (field angles in radians, Sorcha test
    data) within 0.6 mm, i.e. a few tens of pixels out of a 400 mm focal plane."""
    table = np.genfromtxt(DATA / "LSST_detector_corners_100123.csv", delimiter=",", names=True)
    for det in lsstcam.science:
        rows = table[table["detector"] == det.id]
        assert len(rows) == 4
        cx = rows["x"].mean() * FOCAL_LENGTH_MM
        cy = rows["y"].mean() * FOCAL_LENGTH_MM
        assert abs(cx - det.center_mm[0]) < 0.6 and abs(cy - det.center_mm[1]) < 0.6, det.name


def test_pixel_focal_plane_round_trip(lsstcam):
    det = lsstcam["R03_S12"]
    x = np.array([0.0, 100.5, 4071.0])
    y = np.array([0.0, 2000.0, 3999.0])
    fx, fy = det.pixel_to_focal_plane(x, y)
    x2, y2 = det.focal_plane_to_pixel(fx, fy)
    np.testing.assert_allclose(x2, x, atol=1e-9)
    np.testing.assert_allclose(y2, y, atol=1e-9)


def test_mini_camera_has_the_same_structure():
    mini = get_camera("mini")
    assert len(mini.science) == 18 and len(mini.wavefront) == 1
    assert {d.vendor.name for d in mini.science} == {"ITL", "E2V"}
    for det in mini:
        assert len(det.amps) == 16
        assert det.shape[0] <= 512 and det.shape[1] == 512


def test_unknown_names_give_clear_errors(lsstcam):
    with pytest.raises(KeyError, match="R99_S00"):
        lsstcam["R99_S00"]
    with pytest.raises(ValueError, match="lsstcam, mini"):
        get_camera("hsc")
    with pytest.raises(KeyError, match="amplifiers are"):
        lsstcam["R22_S11"].amp("C99")
