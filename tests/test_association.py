"""Association: the kernel against its naive reference, edge cases, and the per-CCD stage's policy."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from astropy.wcs import WCS
from lsst.sdm import schemas as sdm_schemas
from naive_associate import naive_associate, separation_arcsec

from kernels import measure as M
from kernels.associate import associate
from lsstpipe.alerts.packet import SourceContext, alert_dia_source, dia_source_record, load_schema, make_alert
from lsstpipe.camera import PIXEL_SCALE_ARCSEC
from lsstpipe.db.apdb import Level1Database, write_apdb_config
from lsstpipe.pipelines import association as A
from lsstpipe.pipelines.diasources import DIA_DTYPE, dia_sources
from lsstpipe.pipelines.exposure import Exposure, MaskBit

MJD = 60300.2


def _ro(*arrays):
    out = []
    for a in arrays:
        a = np.array(a, float)
        a.setflags(write=False)
        out.append(a)
    return out


def _field(rng, n, ra0, dec0, spread_arcsec):
    cosd = max(np.cos(np.deg2rad(dec0)), 1e-4)
    ra = (ra0 + rng.normal(0, spread_arcsec / 3600 / cosd, n)) % 360
    dec = np.clip(dec0 + rng.normal(0, spread_arcsec / 3600, n), -90, 90)
    return ra, dec


@pytest.mark.parametrize("ra0,dec0", [(120.0, 10.0), (0.0, -30.0), (359.9999, 0.0), (45.0, 89.9995),
                                      (200.0, -89.9998), (10.0, 60.0)])  # fmt: skip
def test_kernel_matches_naive_on_random_fields(ra0, dec0):
    rng = np.random.default_rng(int(ra0 * 7 + dec0 * 3) % 2**32)
    for _ in range(8):
        n, m = rng.integers(0, 40, 2)
        sra, sdec = _field(rng, n, ra0, dec0, 4.0)
        tra, tdec = _field(rng, m, ra0, dec0, 4.0)
        snr = rng.uniform(5, 50, n)
        radius = rng.uniform(0.5, 2.5, m) if rng.random() < 0.5 else 1.5
        args = _ro(sra, sdec, snr, tra, tdec)
        got = associate(*args, radius)
        want = naive_associate(*args, radius)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], atol=1e-6, equal_nan=True)
        matched = got[0][got[0] >= 0]
        assert len(np.unique(matched)) == len(matched)  # one-to-one


def test_empty_inputs():
    for n, m in ((0, 0), (0, 3), (3, 0)):
        match, sep = associate(np.zeros(n), np.zeros(n), np.zeros(n), np.ones(m), np.ones(m), 1.0)
        assert match.shape == (n,) and np.all(match == -1) and np.all(np.isnan(sep))


def test_two_sources_for_one_object_nearest_wins_then_snr():
    obj_ra, obj_dec = [50.0], [20.0]
    d = 0.3 / 3600
    match, sep = associate([50.0, 50.0], [20.0 + 2 * d, 20.0 - d], [100.0, 5.0], obj_ra, obj_dec, 1.0)
    assert list(match) == [-1, 0]  # the nearer one, whatever its S/N
    assert sep[1] == pytest.approx(0.3, abs=1e-6)
    # Exact tie in separation (two sources at one position): the higher S/N wins, then the lower index.
    match, _ = associate([50.0, 50.0], [20.0 + d, 20.0 + d], [5.0, 50.0], obj_ra, obj_dec, 1.0)
    assert list(match) == [-1, 0]
    match, _ = associate([50.0, 50.0], [20.0 + d, 20.0 + d], [50.0, 5.0], obj_ra, obj_dec, 1.0)
    assert list(match) == [0, -1]
    match, _ = associate([50.0, 50.0], [20.0 + d, 20.0 + d], [7.0, 7.0], obj_ra, obj_dec, 1.0)
    assert list(match) == [0, -1]


def test_loser_takes_its_second_choice():
    d = 0.4 / 3600
    # Source 0 is nearest to object 0; source 1 is a bit farther from object 0 but can fall back on object 1.
    match, _ = associate([0.0, 0.0], [0.0, d], [10.0, 10.0], [0.0, 0.0], [0.1 * d, 2.2 * d], 1.0)
    assert list(match) == [0, 1]


def test_ra_wrap_and_pole():
    match, sep = associate([0.00001], [0.0], [10.0], [359.99999], [0.0], 1.0)
    assert match[0] == 0 and sep[0] == pytest.approx(0.072, abs=1e-4)
    # 0.36" from the pole on opposite meridians: 0.72" apart although their RAs differ by 180°.
    dec = 90 - 0.36 / 3600
    match, sep = associate([180.0], [dec], [10.0], [0.0], [dec], 1.0)
    assert match[0] == 0 and sep[0] == pytest.approx(0.72, abs=1e-4)
    match, _ = associate([180.0], [dec], [10.0], [0.0], [dec], 0.5)
    assert match[0] == -1


def test_radius_is_inclusive_and_per_target():
    d = 1.0 / 3600
    match, _ = associate([10.0, 20.0], [0.0, 0.0], [5.0, 5.0], [10.0, 20.0], [d, d], [1.0 + 1e-9, 0.9])
    assert list(match) == [0, -1]
    assert separation_arcsec(10.0, 0.0, 10.0, d) == pytest.approx(1.0)


def test_bad_inputs_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="NaN"):
        associate([np.nan], [0.0], [1.0], [0.0], [0.0], 1.0)
    with pytest.raises(ValueError, match="swapped"):
        associate([0.0], [95.0], [1.0], [0.0], [0.0], 1.0)
    with pytest.raises(ValueError, match="radius"):
        associate([0.0], [0.0], [1.0], [0.0], [0.0], 0.0)
    with pytest.raises(ValueError, match="one length"):
        associate([0.0, 1.0], [0.0], [1.0], [0.0], [0.0], 1.0)
    with pytest.raises(ValueError, match="one per target"):
        associate([0.0], [0.0], [1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0, 1.0])


# --- the per-CCD stage -------------------------------------------------------------------------------------


def _dia(ra, dec, flux, snr=20.0, negative=None, dipole=None):
    n = len(ra)
    s = np.zeros(n, DIA_DTYPE)
    s["ra"], s["dec"], s["psf_flux"], s["snr"] = ra, dec, flux, snr
    s["psf_flux_err"] = np.abs(np.asarray(flux, float)) / np.asarray(snr, float)
    s["science_flux"], s["science_flux_err"], s["npix"] = 1000.0, 10.0, 25
    s["is_negative"] = np.asarray(flux) < 0 if negative is None else negative
    s["is_dipole"] = False if dipole is None else dipole
    return s


def _rows(sources, *args, **kwargs):
    """DiaSource rows with a 15-px PSF stamp (what the chain's fit uses for a ~2.5-px FWHM)."""
    return A.dia_source_rows(sources, *args, **{"psf_stamp_size": 15, **kwargs})


def _no_objects():
    return np.zeros(0, A.DIA_OBJECT_ROW), np.zeros(0, A.DIA_SOURCE_ROW)


def test_new_objects_for_every_unmatched_source():
    src = _dia([10, 10.01, 10.02, 10.03], [0, 0, 0, 0], [100.0, -80.0, 50.0, 70.0], dipole=[False, False, True, False])
    src["bbox_size"] = [5, 5, 12, 6]  # a dipole's footprint spans both lobes
    rows = _rows(src, 7, 3, "r", MJD, MJD + 0.001)
    assert list(rows["bboxSize"]) == [5, 5, 12, 6] and list(rows["psfNdata"]) == [225] * 4
    # rows without the column (older DIASource files) get the square of the footprint's area
    legacy = np.zeros(4, [(n, t) for n, t in DIA_DTYPE.descr if n != "bbox_size"])
    for name in legacy.dtype.names:
        legacy[name] = src[name]
    assert list(_rows(legacy, 7, 3, "r", MJD, MJD + 0.001)["bboxSize"]) == [5] * 4
    res = A.associate_ccd(rows, *_no_objects(), None)
    assert res.n_new == 4 and res.n_unassociated == 0 and res.n_updated == 0
    ids = res.dia_sources["diaObjectId"]
    assert np.array_equal(ids, rows["diaSourceId"])  # each new object takes the id of the source creating it
    assert sorted(res.dia_objects["diaObjectId"]) == sorted(ids)
    obj = res.dia_objects[res.dia_objects["diaObjectId"] == ids[0]][0]
    assert obj["nDiaSources"] == 1 and obj["r_psfFluxNdata"] == 1 and obj["g_psfFluxNdata"] == 0
    assert obj["r_psfFluxMean"] == pytest.approx(100.0) and np.isnan(obj["r_psfFluxSigma"])
    assert obj["firstDiaSourceMjdTai"] == obj["lastDiaSourceMjdTai"] == MJD


def test_dia_source_mapping_units_and_counts():
    """The one measurement → DiaSource mapping (the APDB row; the alert is made from it): Rubin's units."""
    src = _dia([10.0, 10.01, 10.02], [0.0, 0.0, 0.0], [100.0, np.nan, -50.0], dipole=[False, False, True])
    src["ixx"], src["iyy"], src["ixy"] = [2.0, 3.0, 4.0], [1.0, 1.5, 2.0], [0.5, -0.5, 0.0]
    src["trail_length"], src["trail_angle"], src["npix"] = [10.0, 1.0, np.nan], 0.0, [40, 30, 20]
    src["is_trailed"] = [True, False, False]
    src["flags"] = [M.APERTURE_TRUNCATED | M.EDGE, M.PSF_FLUX_FAILED, M.BAD_PIXELS]
    rows = A.dia_source_rows(src, 7, 3, "r", MJD, MJD + 0.001, 0.25, psf_stamp_size=21, exposure_time=30.0,
                             ids=[5, 6, 7])  # fmt: skip
    assert list(rows["diaSourceId"]) == [5, 6, 7] and np.all(rows["exposureTime"] == 30.0)
    np.testing.assert_allclose(rows["ixx"], [0.125, 0.1875, 0.25])  # px² × (0.25″)² = arcsec²
    np.testing.assert_allclose(rows["ixy"], [0.03125, -0.03125, 0.0])
    # every measured trail, in arcsec, from the moments (SDSSShape) over the footprint's pixels
    np.testing.assert_allclose(rows["trailLength"], [2.5, 0.25, np.nan])
    assert list(rows["trailNdata"]) == [40, 30, 0] and list(rows["trail_flag"]) == [False, False, True]
    assert np.all(rows["trailAlgorithm"] == A.TRAIL_ALGORITHM_SDSS_SHAPE) and np.all(np.isnan(rows["trailAngle"]))
    assert np.all(rows["psfNdata"] == 21 * 21) and np.all(rows["dipoleNdata"] == 0)
    assert rows["isDipole"][2] and not rows["dipoleFitAttempted"].any()
    assert list(rows["psfFlux_flag_edge"]) == list(rows["apFlux_flag_apertureTruncated"]) == [True, False, False]
    assert list(rows["psfFlux_flag"]) == [False, True, False]  # PSF_FLUX_FAILED (and the NaN flux)
    assert list(rows["psfFlux_flag_noGoodPixels"]) == [False, True, False]
    assert list(rows["pixelFlags_edge"]) == [True, False, False]
    assert list(rows["pixelFlags_bad"]) == [False, False, True]
    src["flags"] = 0
    no_flags = A.dia_source_rows(src, 7, 3, "r", MJD, MJD, 0.25, psf_stamp_size=21)
    assert list(no_flags["psfFlux_flag"]) == [False, True, False]  # a NaN PSF flux is a failed fit anyway
    with pytest.raises(ValueError, match="psf_stamp_size"):  # psfNdata has no meaning without it
        A.dia_source_rows(src, 7, 3, "r", MJD, MJD)
    # The default pixel scale is the camera's (LSSTCam's nominal), not a number of this module.
    assert A.AssociationConfig().pixel_scale_arcsec == PIXEL_SCALE_ARCSEC
    np.testing.assert_allclose(_rows(src, 7, 3, "r", MJD, MJD)["ixx"], src["ixx"] * PIXEL_SCALE_ARCSEC**2, rtol=1e-6)


def test_trail_angle_is_a_position_angle_through_the_wcs():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval, w.wcs.crpix = [150.0, -30.0], [50.5, 50.5]
    s, th = 0.2 / 3600, np.deg2rad(30.0)
    w.wcs.cd = [[-s * np.cos(th), s * np.sin(th)], [s * np.sin(th), s * np.cos(th)]]  # +y is 30° east of north
    src = _dia([150.0] * 3, [-30.0] * 3, [100.0] * 3)
    src["x"], src["y"], src["trail_length"] = 50.0, 50.0, [8.0, 8.0, np.nan]
    src["trail_angle"] = [np.pi / 2, -np.pi / 2, 0.0]  # along +y, along -y (the same trail), not measured
    rows = _rows(src, 1, 1, "r", MJD, MJD, 0.2, wcs=w)
    np.testing.assert_allclose(rows["trailAngle"][:2], [30.0, 30.0], atol=1e-3)
    assert np.isnan(rows["trailAngle"][2])


def test_solar_system_matches_take_precedence_and_create_nothing():
    src = _dia([30.0, 30.1], [5.0, 5.0], [100.0, 100.0])
    rows = _rows(src, 1, 0, "g", MJD, MJD)
    ss = np.array([(9001, 30.0 + 1.5 / 3600, 5.0, 2.0), (9002, 31.0, 5.0, 2.0)], A.SS_PREDICTION_DTYPE)
    # A DIAObject sits exactly on source 0 too: the SS match still wins.
    objects = np.zeros(1, A.DIA_OBJECT_ROW)
    objects[0] = (555, 30.0, 5.0, 3, MJD - 10, MJD - 1) + (0,) * 6 + (np.nan,) * 48
    res = A.associate_ccd(rows, objects, np.zeros(0, A.DIA_SOURCE_ROW), ss)
    assert res.n_ss_matched == 1
    assert res.dia_sources["ssObjectId"][0] == 9001 and res.dia_sources["diaObjectId"][0] == 0
    assert res.dia_sources["ssObjectId"][1] == 0 and res.n_new == 1 and res.n_updated == 0


def test_updated_summary_combines_history_and_new_sources():
    # Visit 1 creates the object; visit 2 (another band) and visit 3 (a fading negative) update it.
    rows1 = _rows(_dia([359.99995], [-20.0], [100.0], snr=10.0), 1, 4, "r", MJD, MJD)
    res1 = A.associate_ccd(rows1, *_no_objects(), None)
    hist = res1.dia_sources
    rows2 = _rows(_dia([0.00005], [-20.0], [300.0], snr=30.0), 2, 4, "g", MJD + 1, MJD + 1)
    res2 = A.associate_ccd(rows2, res1.dia_objects, hist, None)
    assert res2.n_new == 0 and res2.n_updated == 1
    obj = res2.dia_objects[0]
    assert obj["diaObjectId"] == hist["diaObjectId"][0] and obj["nDiaSources"] == 2
    # S/N²-weighted mean across the RA seam: 100/1000 of the way from 0.00005 to 359.99995.
    expected_ra = (0.00005 - 0.0001 * 100 / 1000) % 360
    assert separation_arcsec(obj["ra"], obj["dec"], expected_ra, -20.0) < 1e-3
    assert obj["r_psfFluxNdata"] == 1 and obj["g_psfFluxNdata"] == 1
    assert obj["firstDiaSourceMjdTai"] == MJD and obj["lastDiaSourceMjdTai"] == MJD + 1
    rows3 = _rows(_dia([0.0], [-20.0], [-40.0], snr=8.0), 3, 4, "r", MJD + 2, MJD + 2)
    res3 = A.associate_ccd(rows3, res2.dia_objects, np.concatenate([hist, res2.dia_sources]), None)
    obj = res3.dia_objects[0]
    assert res3.dia_sources["diaObjectId"][0] == obj["diaObjectId"] and obj["nDiaSources"] == 3
    f, e = np.array([100.0, -40.0]), np.array([10.0, 5.0])
    w = 1 / e**2
    assert obj["r_psfFluxNdata"] == 2
    assert obj["r_psfFluxMean"] == pytest.approx(np.sum(w * f) / np.sum(w), rel=1e-6)
    assert obj["r_psfFluxMeanErr"] == pytest.approx(1 / np.sqrt(np.sum(w)), rel=1e-6)
    assert obj["r_psfFluxSigma"] == pytest.approx(np.std(f, ddof=1), rel=1e-6)
    assert (obj["r_psfFluxMin"], obj["r_psfFluxMax"]) == (-40.0, 100.0)


def test_variables_stay_on_one_object_over_many_visits():
    """20 variables, 0.1″ centroid noise, 10 visits: every DIASource lands on its variable's DIAObject."""
    rng = np.random.default_rng(5)
    ra0, dec0 = rng.uniform(150, 150.05, 20), rng.uniform(2, 2.05, 20)
    objects, history = _no_objects()
    owner: dict[int, int] = {}
    for visit in range(10):
        ra, dec = _field(rng, 20, 0, 0, 0.1)
        ra, dec = (ra0 + np.where(ra > 180, ra - 360, ra)) % 360, dec0 + dec
        flux = rng.uniform(50, 500, 20)
        rows = _rows(_dia(ra, dec, flux), visit + 1, 1, "ri"[visit % 2], MJD + visit, MJD + visit)
        res = A.associate_ccd(rows, objects, history, None)
        for k, oid in enumerate(res.dia_sources["diaObjectId"]):
            assert owner.setdefault(k, int(oid)) == oid
        current = {int(o["diaObjectId"]): o for o in objects}
        current.update({int(o["diaObjectId"]): o for o in res.dia_objects})
        objects = np.array(list(current.values()), A.DIA_OBJECT_ROW)
        history = np.concatenate([history, res.dia_sources])
    assert len(objects) == 20 and np.all(objects["nDiaSources"] == 10)


def test_stage_inputs_are_validated():
    src = _dia([1.0], [1.0], [10.0])
    with pytest.raises(ValueError, match="dia_source_rows"):
        A.associate_ccd(src, *_no_objects(), None)
    with pytest.raises(ValueError, match="band"):
        _rows(src, 1, 1, "x", MJD, MJD)
    with pytest.raises(ValueError, match="MJD"):
        _rows(src, 1, 1, "r", 2.46e6, MJD)
    with pytest.raises(ValueError, match="detector"):
        A.dia_source_id(1, 300, 0)
    with pytest.raises(ValueError, match="2\\^20"):
        A.dia_source_id(1, 3, 1 << 20)
    with pytest.raises(ValueError, match="radius_arcsec"):
        A.AssociationConfig(radius_arcsec=0)
    with pytest.raises(ValueError, match="pixel_scale_arcsec"):
        _rows(src, 1, 1, "r", MJD, MJD, 0.0)
    with pytest.raises(ValueError, match="psf_stamp_size"):
        A.dia_source_rows(src, 1, 1, "r", MJD, MJD, psf_stamp_size=14)
    with pytest.raises(ValueError, match="one id per source"):
        _rows(src, 1, 1, "r", MJD, MJD, ids=[1, 2])


def test_ids_are_unique_across_ccds_and_visits():
    ids = np.concatenate([A.dia_source_id(v, d, np.arange(50)) for v in (1, 2, 2**34) for d in (0, 188)])
    assert len(np.unique(ids)) == len(ids) and ids.min() > 0


def test_nan_snr_ranks_lowest_and_inputs_stay_unmodified():
    d = 0.3 / 3600
    ra, dec, snr, tra, tdec = _ro([5.0, 5.0], [d, d], [np.nan, 3.0], [5.0], [0.0])
    match, _ = associate(ra, dec, snr, tra, tdec, 1.0)
    assert list(match) == [-1, 0]
    assert list(naive_associate(ra, dec, snr, tra, tdec, 1.0)[0]) == [-1, 0]


def test_solar_system_detections_find_their_own_object():
    """60 asteroids with 0.4″ ephemeris errors among 200 static sources: ≥ 95 % matched to the right one."""
    rng = np.random.default_rng(11)
    n_ss, n_static = 60, 200
    true_ra, true_dec = rng.uniform(20, 20.3, n_ss), rng.uniform(-10, -9.7, n_ss)
    ra = np.concatenate([true_ra, rng.uniform(20, 20.3, n_static)])
    dec = np.concatenate([true_dec, rng.uniform(-10, -9.7, n_static)])
    rows = _rows(_dia(ra, dec, rng.uniform(100, 900, ra.size)), 4, 9, "z", MJD, MJD)
    err = rng.normal(0, 0.4 / 3600, (2, n_ss))
    pred = np.zeros(n_ss, A.SS_PREDICTION_DTYPE)
    pred["ssObjectId"] = 10_000 + np.arange(n_ss)
    pred["ra"] = true_ra + err[0] / np.cos(np.deg2rad(true_dec))
    pred["dec"], pred["radius_arcsec"] = true_dec + err[1], 2.0
    res = A.associate_ccd(rows, *_no_objects(), pred[::-1].copy())
    right = res.dia_sources["ssObjectId"][:n_ss] == pred["ssObjectId"]
    assert right.mean() >= 0.95
    assert res.n_new == int(np.sum(res.dia_sources["ssObjectId"] == 0))
    assert np.all(res.dia_sources["diaObjectId"][res.dia_sources["ssObjectId"] != 0] == 0)


# --- the DiaSource record: one mapping for the APDB and the alert ------------------------------------------

from test_alerts import NX, NY, SCALE, rotated_sip_wcs  # noqa: E402 — the same CCD as the alerts' tests


@pytest.fixture(scope="module")
def schema():
    return load_schema()


@pytest.fixture(scope="module")
def wcs():
    return rotated_sip_wcs()  # the CCD of tests/test_alerts.py


@pytest.fixture(scope="module")
def measured(wcs):
    """DIASources measured by the chain's stage on a small difference image: a point source on a BAD pixel, one
    cut by the CCD edge, a trail (a fast mover), a negative source and a dipole pair."""
    yy, xx = np.mgrid[0:NY, 0:NX]
    sigma = 1.5

    def g(x0, y0, flux):
        return flux / (2 * np.pi * sigma**2) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2))

    img = g(60.3, 80.6, 3000.0) + g(1.2, 150.0, 3000.0) - g(300.0, 60.0, 2500.0)
    img += g(200.0, 240.0, 2500.0) - g(204.0, 240.0, 2500.0)
    for t in np.linspace(-8.0, 8.0, 33):
        img += g(150.0 + 0.8 * t, 160.0 + 0.6 * t, 5000.0 / 33)
    img = (img + np.random.default_rng(3).normal(0.0, 1.0, img.shape)).astype(np.float32)
    var = np.ones_like(img)
    mask = np.zeros(img.shape, np.int32)
    mask[80, 62] = int(MaskBit.BAD)
    dia = dia_sources(img, var, mask, Exposure(img + 5.0, var, mask), psf_fwhm=sigma * 2.3548, zero_point=27.0,
                      wcs=wcs)  # fmt: skip
    kinds = (dia["is_trailed"], dia["is_dipole"], dia["is_negative"], (dia["flags"] & M.EDGE) != 0,
             (dia["flags"] & M.BAD_PIXELS) != 0)  # fmt: skip
    assert len(dia) == 6 and all(k.any() for k in kinds), dia  # the example holds every case
    return dia


def _apdb_units() -> dict[str, str | None]:
    spec = yaml.safe_load((Path(sdm_schemas.__file__).parent / "apdb.yaml").read_text())
    table = next(t for t in spec["tables"] if t["name"] == "DiaSource")
    return {c["name"]: c.get("fits:tunit") for c in table["columns"]}


def _avro_units(schema) -> dict[str, str | None]:
    """The unit the alert schema gives each diaSource field (its doc's trailing ``[unit]``)."""
    named = schema.definition["__named_schemas"]
    fields = named[schema.definition["name"].replace(".alert", ".diaSource")]["fields"]
    units = {}
    for f in fields:
        m = re.search(r"\[([^\]]+)\]\.?\s*$", f.get("doc", ""))
        units[f["name"]] = m.group(1) if m else None
    return units


def test_alert_dia_source_is_the_apdb_row_field_by_field(schema, wcs, measured, tmp_path):
    """One measured CCD: its DiaSources stored in the APDB and its alerts agree field by field, so a later alert's
    ``prvDiaSources`` (read back from the APDB) equal the earlier alerts' ``diaSource`` (before, the moments
    differed by scale² = 25×, and psfNdata, trailNdata, dipoleNdata, trailLength and psfFlux_flag_edge too)."""
    visit, det = 2026112500042, 94
    ctx = SourceContext(visit, det, MJD, MJD + 0.0005, "r", pixel_scale_arcsec=SCALE, psf_stamp_size=15,
                        exposure_time=30.0, wcs=wcs)  # fmt: skip
    ids = A.dia_source_id(42, det, np.arange(len(measured)))
    rows = A.dia_source_rows(measured, visit, det, ctx.band, ctx.midpoint_mjd_tai, ctx.time_processed_mjd_tai,
                             ctx.pixel_scale_arcsec, psf_stamp_size=ctx.psf_stamp_size,
                             exposure_time=ctx.exposure_time, wcs=wcs, ids=ids)  # fmt: skip
    res = A.associate_ccd(rows, np.zeros(0, A.DIA_OBJECT_ROW), np.zeros(0, A.DIA_SOURCE_ROW), None)
    apdb_rows = res.dia_sources
    db = Level1Database(write_apdb_config(tmp_path))
    assert db.store_ccd(visit, det, MJD, res.dia_objects, apdb_rows)
    ra, dec = float(np.mean(apdb_rows["ra"])), float(np.mean(apdb_rows["dec"]))
    stored = db.dia_sources(ra, dec, 0.1, MJD + 1.0, object_ids=apdb_rows["diaObjectId"])
    assert len(stored) == len(measured)
    # The current diaSource, from the APDB row and from the measurement (the chain's path), is one record.
    current = {}
    for k, row in enumerate(measured):
        rec = dia_source_record(row, ctx, schema, dia_source_id=int(ids[k]),
                                dia_object_id=int(apdb_rows["diaObjectId"][k]))  # fmt: skip
        assert rec == alert_dia_source(schema, apdb_rows[k])
        current[rec["diaSourceId"]] = rec
    # Every field both schemas have, with its unit: the same unit in apdb.yaml and the alert schema, and the
    # same value in the stored row (read back with Rubin's client) as in the alert.
    apdb_units, avro_units = _apdb_units(), _avro_units(schema)
    shared = [n for n in stored.columns if n in avro_units]
    assert set(A.DIA_SOURCE_ROW.names) <= set(shared)
    for name in A.DIA_SOURCE_ROW.names:
        assert apdb_units[name] == avro_units[name], name
    for back in stored.to_dict("records"):
        rec = current[int(back["diaSourceId"])]
        for name in shared:
            got, want = back[name], rec[name]
            if want is None:
                assert got is None or pd.isna(got), (name, got)
            elif isinstance(want, float):
                assert float(got) == pytest.approx(want, rel=1e-6, abs=1e-12), (name, got, want)
            else:
                assert got == want, (name, got, want)
    # The units the mapping converts to, from the measurement in pixels.
    scale = ctx.pixel_scale_arcsec
    for k, row in enumerate(measured):
        rec = current[int(ids[k])]
        assert rec["ixx"] == pytest.approx(row["ixx"] * scale**2, rel=1e-6)  # px² → arcsec²
        assert rec["ixy"] == pytest.approx(row["ixy"] * scale**2, rel=1e-6, abs=1e-9)
        assert rec["trailLength"] == pytest.approx(row["trail_length"] * scale, rel=1e-6)  # px → arcsec
        assert rec["psfNdata"] == 15**2 and rec["trailNdata"] == row["npix"] and rec["dipoleNdata"] == 0
        assert rec["psfFlux_flag_edge"] == bool(row["flags"] & M.APERTURE_TRUNCATED)
    # The symptom: a later alert of the same object carries the stored row as history, equal to the earlier alert.
    later = {**current[int(ids[0])], "diaSourceId": int(ids[-1]) + 1, "midpointMjdTai": MJD + 0.5}
    history = stored.astype(object).where(stored.notna(), None)
    history = [{k: v for k, v in r.items() if k in avro_units} for r in history.to_dict("records")]
    alert = make_alert(schema, later, prv_dia_sources=history)
    oid = apdb_rows["diaObjectId"][0]
    assert [p["diaSourceId"] for p in alert["prvDiaSources"] if p["diaObjectId"] == oid] == [int(ids[0])]
    assert len(alert["prvDiaSources"]) == len(measured)
    assert all(p == current[p["diaSourceId"]] for p in alert["prvDiaSources"])
