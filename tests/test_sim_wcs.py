"""The exact sky ↔ pixel model of the simulator and its fitted TAN-SIP WCS."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from lsstpipe.camera import get_camera
from lsstpipe.camera.geometry import FOCAL_LENGTH_MM, PIXEL_SCALE_ARCSEC
from lsstpipe.sim.wcs import (
    LSST_DISTORTION,
    DetectorSkyModel,
    FocalPlaneSkyModel,
    OpticalDistortion,
    angular_separation_mas,
    sip_world2pix,
)

CAM = get_camera("lsstcam")


def _grid(det, n=25):
    ny, nx = det.shape
    gx, gy = np.meshgrid(np.linspace(-0.5, nx - 0.5, n), np.linspace(-0.5, ny - 0.5, n))
    return gx.ravel(), gy.ravel()


def test_distortion_size_and_inverse():
    d = LSST_DISTORTION
    edge = np.deg2rad(1.75)
    assert 0.001 < d.fraction(edge) < 0.005, "LSST-like distortion is 0.1–0.5 % at the field edge"
    assert abs(d.fraction(np.deg2rad(0.01))) < 1e-6
    theta = np.random.default_rng(1).uniform(0.0, np.deg2rad(2.5), 1000)
    theta[0] = 0.0
    np.testing.assert_allclose(d.field_angle_rad(d.radius_mm(theta)), theta, rtol=0, atol=1e-15)
    r = d.radius_mm(np.linspace(0.0, np.deg2rad(3.0), 500))
    assert np.all(np.diff(r) > 0)


def test_distortion_rejects_non_monotonic_coefficients():
    with pytest.raises(ValueError, match="non-monotonic"):
        OpticalDistortion(k3=0.0, k5=-1e6)


def test_boresight_scale_and_orientation():
    """rot_sky_pos = 0: +y north, +x west; 90: +y east, +x north; 0.2″/pixel at the centre."""
    px_mm = 0.010
    m0 = FocalPlaneSkyModel(150.0, -30.0, 0.0)
    ra, dec = m0.focal_plane_to_sky(0.0, 0.0)
    assert angular_separation_mas(ra, dec, 150.0, -30.0) < 1e-6
    ra, dec = m0.focal_plane_to_sky([0.0, px_mm], [px_mm, 0.0])
    assert dec[0] > -30.0 and abs(ra[0] - 150.0) < 1e-9  # +y → north
    assert ra[1] < 150.0 and abs(dec[1] + 30.0) < 1e-9  # +x → west (RA decreases)
    step = angular_separation_mas(150.0, -30.0, ra, dec) / 1000.0
    np.testing.assert_allclose(step, PIXEL_SCALE_ARCSEC, rtol=1e-6)
    m90 = FocalPlaneSkyModel(150.0, -30.0, 90.0)
    ra, dec = m90.focal_plane_to_sky([0.0, px_mm], [px_mm, 0.0])
    assert ra[0] > 150.0 and abs(dec[0] + 30.0) < 1e-9  # +y → east
    assert dec[1] > -30.0 and abs(ra[1] - 150.0) < 1e-9  # +x → north


def test_focal_length_consistent_with_camera():
    assert LSST_DISTORTION.focal_length_mm == FOCAL_LENGTH_MM == CAM.focal_length_mm


@pytest.mark.parametrize(
    "ra, dec, rot",
    [
        (150.0, -30.0, 30.0),
        (0.02, -10.0, 200.0),
        (359.98, 45.0, 315.0),
        (80.0, -89.0, 10.0),
        (0.0, 90.0, 0.0),
    ],
)
def test_pixel_sky_round_trip(ra, dec, rot):
    rng = np.random.default_rng(2)
    for name in ("R01_S00", "R22_S11", "R43_S22", "R00_SW"):
        m = DetectorSkyModel.build(CAM, name, ra, dec, rot)
        x, y = rng.uniform(-0.5, 4071.5, (2, 500))
        sra, sdec = m.pixel_to_sky(x, y)
        assert np.all((sra >= 0.0) & (sra < 360.0)) and np.all(np.abs(sdec) <= 90.0)
        bx, by = m.sky_to_pixel(sra, sdec)
        assert np.abs(bx - x).max() < 1e-6 and np.abs(by - y).max() < 1e-6


def test_shapes_preserved_and_inputs_unmodified():
    m = DetectorSkyModel.build(CAM, 94, 10.0, -20.0, 45.0)
    x = np.arange(12.0).reshape(3, 4)
    x.setflags(write=False)
    ra, dec = m.pixel_to_sky(x, x)
    assert ra.shape == (3, 4) and dec.shape == (3, 4)
    bx, by = m.sky_to_pixel(ra, dec)
    assert bx.shape == by.shape == (3, 4)
    assert np.ndim(m.pixel_to_sky(0.0, 0.0)[0]) == 0  # scalars in, scalars out


@pytest.mark.parametrize(
    "name, ra, dec, rot",
    [("R01_S00", 150.0, -30.0, 30.0), ("R22_S11", 150.0, -30.0, 30.0), ("R01_S00", 0.01, -40.0, 123.0),
     ("R22_S11", 0.0, -89.0, 250.0), ("R41_S22", 200.0, -89.0, 300.0)],
)  # fmt: skip
def test_tan_sip_matches_exact_model_to_1_mas(name, ra, dec, rot):
    """Full-size LSSTCam CCDs at the field centre and edge, across RA = 0/360 and near the pole."""
    m = DetectorSkyModel.build(CAM, name, ra, dec, rot)
    wcs = m.fit_tan_sip(order=4)
    x, y = _grid(m.detector, 37)
    x = x + 0.37  # off the fit grid
    y = y + 0.41
    sra, sdec = m.pixel_to_sky(x, y)
    wra, wdec = wcs.all_pix2world(x, y, 0)
    assert angular_separation_mas(sra, sdec, wra, wdec).max() < 1.0
    px_mas = PIXEL_SCALE_ARCSEC * 1000.0
    ix, iy = sip_world2pix(wcs, sra, sdec)  # AP/BP polynomials alone
    assert np.hypot(ix - x, iy - y).max() * px_mas < 1.0
    ax, ay = wcs.all_world2pix(sra, sdec, 0, tolerance=1e-8)
    assert np.hypot(ax - x, ay - y).max() * px_mas < 1.0
    assert max(m.max_wcs_error_mas(wcs)) < 1.0


def test_low_order_sip_is_worse_at_the_edge():
    """A test that can fail: order 2 misses the distortion at the field edge by far more than 1 mas."""
    m = DetectorSkyModel.build(CAM, "R01_S00", 150.0, -30.0, 0.0)
    assert m.max_wcs_error_mas(m.fit_tan_sip(order=2, inverse_order=2))[0] > 1.0


def test_wcs_header_cards():
    m = DetectorSkyModel.build(CAM, "R01_S00", 359.99, -30.0, 10.0)
    hdr = m.wcs_header()
    assert (hdr["CTYPE1"], hdr["CTYPE2"]) == ("RA---TAN-SIP", "DEC--TAN-SIP")
    ny, nx = m.detector.shape
    assert (hdr["CRPIX1"], hdr["CRPIX2"]) == ((nx + 1) / 2.0, (ny + 1) / 2.0)
    assert 0.0 <= hdr["CRVAL1"] < 360.0
    assert hdr["A_ORDER"] == hdr["B_ORDER"] == 4 and hdr["AP_ORDER"] == hdr["BP_ORDER"] == 5
    assert "A_1_0" not in hdr and "A_2_0" in hdr and "AP_1_0" in hdr
    cd = np.array([[hdr["CD1_1"], hdr["CD1_2"]], [hdr["CD2_1"], hdr["CD2_2"]]])
    assert np.linalg.det(cd) < 0, "sky parity: east left when north is up"
    np.testing.assert_allclose(np.sqrt(abs(np.linalg.det(cd))) * 3600, PIXEL_SCALE_ARCSEC, rtol=0.01)
    # The header survives a round trip through FITS text and gives the same WCS.
    again = WCS(fits.Header.fromstring(hdr.tostring()))
    a = m.fit_tan_sip().all_pix2world([0.0, 4000.0], [0.0, 3000.0], 0)
    b = again.all_pix2world([0.0, 4000.0], [0.0, 3000.0], 0)
    assert angular_separation_mas(*a, *b).max() < 1e-3


def test_mini_camera_model():
    mini = get_camera("mini")
    m = DetectorSkyModel.build(mini, "R11_S11", 30.0, -5.0, 60.0)
    assert max(m.max_wcs_error_mas(m.fit_tan_sip(order=3))) < 1.0


def test_clear_errors():
    with pytest.raises(KeyError, match="no detector"):
        DetectorSkyModel.build(CAM, "R99_S99", 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="not a detector of camera"):
        DetectorSkyModel.build(get_camera("mini"), CAM["R10_S00"], 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"dec must be within \[-90, 90\]"):
        FocalPlaneSkyModel(0.0, 95.0, 0.0)
    m = DetectorSkyModel.build(CAM, "R22_S11", 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="too coarse"):
        m.wcs_header(order=4, grid=4)
