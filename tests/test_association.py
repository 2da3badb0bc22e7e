"""Association: the kernel against its naive reference, edge cases, and the per-CCD stage's policy."""

from __future__ import annotations

import numpy as np
import pytest
from naive_associate import naive_associate, separation_arcsec

from kernels.associate import associate
from lsstpipe.pipelines import association as A
from lsstpipe.pipelines.diasources import DIA_DTYPE

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


def _no_objects():
    return np.zeros(0, A.DIA_OBJECT_ROW), np.zeros(0, A.DIA_SOURCE_ROW)


def test_new_objects_for_every_unmatched_source():
    src = _dia([10, 10.01, 10.02, 10.03], [0, 0, 0, 0], [100.0, -80.0, 50.0, 70.0], dipole=[False, False, True, False])
    src["bbox_size"] = [5, 5, 12, 6]  # a dipole's footprint spans both lobes
    rows = A.dia_source_rows(src, 7, 3, "r", MJD, MJD + 0.001)
    assert list(rows["bboxSize"]) == [5, 5, 12, 6] and list(rows["psfNdata"]) == [25] * 4
    # rows without the column (older DIASource files) get the square of the footprint's area
    legacy = np.zeros(4, [(n, t) for n, t in DIA_DTYPE.descr if n != "bbox_size"])
    for name in legacy.dtype.names:
        legacy[name] = src[name]
    assert list(A.dia_source_rows(legacy, 7, 3, "r", MJD, MJD + 0.001)["bboxSize"]) == [5] * 4
    res = A.associate_ccd(rows, *_no_objects(), None)
    assert res.n_new == 4 and res.n_unassociated == 0 and res.n_updated == 0
    ids = res.dia_sources["diaObjectId"]
    assert np.array_equal(ids, rows["diaSourceId"])  # each new object takes the id of the source creating it
    assert sorted(res.dia_objects["diaObjectId"]) == sorted(ids)
    obj = res.dia_objects[res.dia_objects["diaObjectId"] == ids[0]][0]
    assert obj["nDiaSources"] == 1 and obj["r_psfFluxNdata"] == 1 and obj["g_psfFluxNdata"] == 0
    assert obj["r_psfFluxMean"] == pytest.approx(100.0) and np.isnan(obj["r_psfFluxSigma"])
    assert obj["firstDiaSourceMjdTai"] == obj["lastDiaSourceMjdTai"] == MJD


def test_solar_system_matches_take_precedence_and_create_nothing():
    src = _dia([30.0, 30.1], [5.0, 5.0], [100.0, 100.0])
    rows = A.dia_source_rows(src, 1, 0, "g", MJD, MJD)
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
    rows1 = A.dia_source_rows(_dia([359.99995], [-20.0], [100.0], snr=10.0), 1, 4, "r", MJD, MJD)
    res1 = A.associate_ccd(rows1, *_no_objects(), None)
    hist = res1.dia_sources
    rows2 = A.dia_source_rows(_dia([0.00005], [-20.0], [300.0], snr=30.0), 2, 4, "g", MJD + 1, MJD + 1)
    res2 = A.associate_ccd(rows2, res1.dia_objects, hist, None)
    assert res2.n_new == 0 and res2.n_updated == 1
    obj = res2.dia_objects[0]
    assert obj["diaObjectId"] == hist["diaObjectId"][0] and obj["nDiaSources"] == 2
    # S/N²-weighted mean across the RA seam: 100/1000 of the way from 0.00005 to 359.99995.
    expected_ra = (0.00005 - 0.0001 * 100 / 1000) % 360
    assert separation_arcsec(obj["ra"], obj["dec"], expected_ra, -20.0) < 1e-3
    assert obj["r_psfFluxNdata"] == 1 and obj["g_psfFluxNdata"] == 1
    assert obj["firstDiaSourceMjdTai"] == MJD and obj["lastDiaSourceMjdTai"] == MJD + 1
    rows3 = A.dia_source_rows(_dia([0.0], [-20.0], [-40.0], snr=8.0), 3, 4, "r", MJD + 2, MJD + 2)
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
        rows = A.dia_source_rows(_dia(ra, dec, flux), visit + 1, 1, "ri"[visit % 2], MJD + visit, MJD + visit)
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
        A.dia_source_rows(src, 1, 1, "x", MJD, MJD)
    with pytest.raises(ValueError, match="MJD"):
        A.dia_source_rows(src, 1, 1, "r", 2.46e6, MJD)
    with pytest.raises(ValueError, match="detector"):
        A.dia_source_id(1, 300, 0)
    with pytest.raises(ValueError, match="2\\^20"):
        A.dia_source_id(1, 3, 1 << 20)
    with pytest.raises(ValueError, match="radius_arcsec"):
        A.AssociationConfig(radius_arcsec=0)


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
    rows = A.dia_source_rows(_dia(ra, dec, rng.uniform(100, 900, ra.size)), 4, 9, "z", MJD, MJD)
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
