"""kernels/astrometry.py against brute-force references and a known TAN-SIP sky; lsstpipe/io/refcat.py."""

import numpy as np
import pytest

from kernels import astrometry as A
from lsstpipe.camera import get_camera
from lsstpipe.io.refcat import read_refcat
from lsstpipe.sim.wcs import DetectorSkyModel, angular_separation_mas
from tests import naive_psf as naive


def _points(n, seed, nan=0):
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(0, 500, n), rng.uniform(0, 500, n)
    if nan:
        x[rng.choice(n, nan, replace=False)] = np.nan
    return x, y


@pytest.mark.parametrize("ns, nr, nan, shift, bin_size", [(80, 120, 0, 30.0, 2.0), (50, 60, 5, 12.5, 1.5),
                                                          (0, 10, 0, 10.0, 2.0), (30, 0, 0, 10.0, 2.0)])  # fmt: skip
def test_offset_histogram_matches_naive(ns, nr, nan, shift, bin_size):
    sx, sy = _points(ns, 1, nan)
    rx, ry = _points(nr, 2, nan and 3)
    for a in (sx, sy, rx, ry):
        a.flags.writeable = False
    got = A.offset_histogram(sx, sy, rx, ry, shift, bin_size)
    np.testing.assert_array_equal(got, naive.offset_histogram(sx, sy, rx, ry, shift, bin_size))


def test_offset_histogram_rejects_bad_arguments():
    with pytest.raises(ValueError):
        A.offset_histogram([1.0], [1.0], [1.0], [1.0], 0.0, 1.0)
    with pytest.raises(ValueError):
        A.offset_histogram([1.0, 2.0], [1.0], [1.0], [1.0], 5.0, 1.0)


@pytest.mark.parametrize("nan", [0, 7])
def test_match_sources_matches_naive(nan):
    sx, sy = _points(150, 3, nan)
    rng = np.random.default_rng(4)
    rx, ry = sx[:100] + rng.normal(0, 1.0, 100), sy[:100] + rng.normal(0, 1.0, 100)
    rx, ry = np.concatenate([rx, _points(40, 5)[0]]), np.concatenate([ry, _points(40, 5)[1]])
    got = A.match_sources(sx, sy, rx, ry, 3.0)
    want = naive.match_sources(sx, sy, rx, ry, 3.0)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w)
    assert len(A.match_sources([], [], rx, ry, 3.0)[0]) == 0


def test_find_offset_recovers_shift_and_rotation():
    rng = np.random.default_rng(6)
    rx, ry = rng.uniform(0, 4000, 400), rng.uniform(0, 4000, 400)
    rot, dx, dy = np.radians(0.05), 37.3, -21.8
    c, s = np.cos(rot), np.sin(rot)
    sx = 2000 + c * (rx - 2000) - s * (ry - 2000) + dx + rng.normal(0, 0.2, 400)
    sy = 2000 + s * (rx - 2000) + c * (ry - 2000) + dy + rng.normal(0, 0.2, 400)
    keep = rng.random(400) < 0.6  # 60 % detected, plus 200 sources without a reference
    sx, sy = (
        np.concatenate([sx[keep], rng.uniform(0, 4000, 200)]),
        np.concatenate([sy[keep], rng.uniform(0, 4000, 200)]),
    )
    rots = np.arange(-4, 5) * 0.025
    off = A.find_offset(sx, sy, rx, ry, (2000.0, 2000.0), 100.0, 2.0, rots)
    assert off is not None and off["rotation_deg"] == pytest.approx(0.05)
    assert off["dx"] == pytest.approx(dx, abs=0.5) and off["dy"] == pytest.approx(dy, abs=0.5), off
    assert A.find_offset(rng.uniform(0, 4000, 50), rng.uniform(0, 4000, 50), rx, ry, (2000.0, 2000.0), 100.0) is None


def test_gnomonic_round_trip():
    rng = np.random.default_rng(7)
    ra, dec = 10 + rng.uniform(-1, 1, 50), -89.0 + rng.uniform(0, 0.9, 50)
    xi, eta = A.gnomonic(ra, dec, 10.0, -88.5)
    ra2, dec2 = A.inverse_gnomonic(xi, eta, 10.0, -88.5)
    assert angular_separation_mas(ra, dec, ra2, dec2).max() < 1e-3


@pytest.mark.parametrize("detector, order", [("R22_S11", 3), ("R03_S02", 4)])
def test_fit_tan_sip_recovers_the_optical_model(detector, order):
    """Exact positions of stars on an LSSTCam CCD: the fitted WCS matches the optical model to < 1 mas."""
    cam = get_camera("lsstcam")
    model = DetectorSkyModel.build(cam, detector, 150.0, -30.0, 33.0)
    ny, nx = model.detector.shape
    rng = np.random.default_rng(8)
    x, y = rng.uniform(0, nx - 1, 400), rng.uniform(0, ny - 1, 400)
    ra, dec = model.pixel_to_sky(x, y)
    x[:10] += 20.0  # ten wrong matches, to be clipped
    ra[10:13] = np.nan  # and unusable ones, ignored
    for a in (x, y, ra, dec):
        a.flags.writeable = False
    wcs, stats = A.fit_tan_sip(x, y, ra, dec, (ny, nx), order)
    assert stats["n_used"] >= 377 and not stats["used"][:13].any(), stats["n_used"]
    fwd, inv = model.max_wcs_error_mas(wcs)
    assert fwd < 1.0 and inv < 1.0, (fwd, inv, stats["rms_mas"])
    with pytest.raises(ValueError, match="usable pairs"):
        A.fit_tan_sip(x[:5], y[:5], ra[:5], dec[:5], (ny, nx), order)


def test_read_refcat(tmp_path):
    path = tmp_path / "refcat.csv"
    rows = ["id,ra,dec,r_mag,r_flux_nJy", "1,10.0,-5.0,18.0,229086.7", "2,10.5,-5.0,19.0,91201.08",
            "3,10.0,-4.8,20.0,36307.8", "9007199254740991,359.99,-5.0,17.0,575439.9"]  # fmt: skip
    path.write_text("\n".join(rows) + "\n")
    cat = read_refcat(path, 10.0, -5.0, 0.3)
    assert list(cat["id"]) == [1, 3] and cat.dtype["id"] == np.int64 and cat["r_mag"][1] == 20.0
    assert len(read_refcat(path, 0.0, -5.0, 0.5)) == 1  # across ra = 0
    assert len(read_refcat(path, 100.0, 50.0, 1.0)) == 0
    with pytest.raises(FileNotFoundError):
        read_refcat(tmp_path / "missing.csv", 10.0, -5.0, 0.3)
    with pytest.raises(ValueError):
        read_refcat(path, 10.0, -95.0, 0.3)
    (tmp_path / "bad.csv").write_text("id,x,y\n1,2,3\n")
    with pytest.raises(ValueError, match="'ra' and 'dec'"):
        read_refcat(tmp_path / "bad.csv", 10.0, -5.0, 0.3)
