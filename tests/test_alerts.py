"""Alerts in Rubin's Avro format: schema conformance, round trips, wire format, cutouts, batching, errors."""

from __future__ import annotations

import io
import math
import struct

import fastavro
import numpy as np
import pytest
from astropy.nddata import CCDData
from astropy.wcs import WCS, Sip

from lsstpipe.alerts import (
    HISTORY_DAYS,
    AlertSchemaError,
    AlertWriter,
    CcdCutouts,
    Cutouts,
    CutoutWriter,
    SourceContext,
    ccd_cutouts,
    cutout_size_pixels,
    deserialize_alert,
    dia_forced_source_record,
    dia_source_record,
    load_schema,
    make_alert,
    make_cutout,
    read_alerts,
    read_cutout,
    schema_id,
    serialize_alert,
    ss_source_record,
    write_alert_file,
)
from lsstpipe.alerts.packet import alert_dia_source
from lsstpipe.pipelines import association as A
from lsstpipe.pipelines.ap import FORCED_DTYPE
from lsstpipe.pipelines.diasources import DIA_DTYPE, FORCED_FAILED_FLAG, njy_per_electron
from lsstpipe.pipelines.difference import Difference
from lsstpipe.pipelines.exposure import Exposure, MaskBit

SCALE = 0.2  # arcsec / px
NY, NX = 300, 400
MJD = 61000.25


@pytest.fixture(scope="module")
def schema():
    return load_schema()


@pytest.fixture(scope="module")
def wcs():
    return rotated_sip_wcs()


def rotated_sip_wcs() -> WCS:
    """A rotated TAN-SIP WCS of a 400×300 CCD at 0.2″/px (with a visible SIP distortion)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crval = [150.0, -30.0]
    w.wcs.crpix = [NX / 2 + 0.5, NY / 2 + 0.5]
    s, th = SCALE / 3600.0, math.radians(20.0)
    w.wcs.cd = [[-s * math.cos(th), s * math.sin(th)], [s * math.sin(th), s * math.cos(th)]]
    a, b = np.zeros((3, 3)), np.zeros((3, 3))
    a[2, 0], a[1, 1], b[0, 2] = 2e-6, -1e-6, 3e-6
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    return w


def _gauss_image(x0, y0, flux=5000.0, sigma=1.5, noise=0.0, seed=0):
    yy, xx = np.mgrid[0:NY, 0:NX]
    img = flux / (2 * np.pi * sigma**2) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2))
    if noise:
        img = img + np.random.default_rng(seed).normal(0, noise, img.shape)
    return img.astype(np.float32)


def _dia_row(wcs, x, y, idx=7, flags=0):
    row = np.zeros(1, DIA_DTYPE)[0]
    ra, dec = wcs.all_pix2world(x, y, 0)
    vals = dict(id=idx, x=x, y=y, ra=float(ra), dec=float(dec), psf_flux=1234.5, psf_flux_err=56.7, ap_flux=1200.0,
                ap_flux_err=60.0, science_flux=np.nan, science_flux_err=np.nan, snr=21.8, ixx=2.0, iyy=3.0,
                ixy=0.5, trail_length=10.0, trail_angle=math.pi / 2, npix=40, bbox_size=9, is_negative=False,
                is_dipole=True,
                is_trailed=False, flags=flags)  # fmt: skip
    for k, v in vals.items():
        row[k] = v
    return row


def _context(wcs=None, **kw):
    base = dict(visit=2026112500042, detector=94, midpoint_mjd_tai=MJD, time_processed_mjd_tai=MJD + 0.0005,
                band="r", pixel_scale_arcsec=SCALE, psf_stamp_size=15, exposure_time=30.0, wcs=wcs)  # fmt: skip
    base.update(kw)
    return SourceContext(**base)


def _dia_object(object_id=555, n=3):
    obj = {"diaObjectId": object_id, "validityStartMjdTai": MJD, "ra": 150.0, "dec": -30.0, "nDiaSources": n,
           "r_psfFluxMean": 1100.0, "firstDiaSourceMjdTai": MJD - 200, "lastDiaSourceMjdTai": MJD}  # fmt: skip
    obj.update({f"{b}_psfFluxNdata": (n if b == "r" else 0) for b in "ugrizy"})
    return obj


def _history(object_id, dt_days, start_id=1000):
    src, forced = [], []
    for i, dt in enumerate(dt_days):
        base = {"visit": 1000 + i, "detector": 94, "midpointMjdTai": MJD - dt, "ra": 150.0, "dec": -30.0,
                "timeProcessedMjdTai": MJD - dt, "band": "r"}  # fmt: skip
        src.append({**base, "diaSourceId": start_id + i, "diaObjectId": object_id, "x": 10.0, "y": 20.0,
                    "psfFlux": 900.0 + i, "psfNdata": 225, "trailNdata": 0, "dipoleNdata": 0, "bboxSize": 7})  # fmt: skip
        forced.append({**base, "diaForcedSourceId": 9000 + i, "diaObjectId": object_id, "psfFlux": 10.0 * i})
    return src, forced


def _full_alert(schema, wcs, x=150.0, y=120.0, idx=7, visit=None, detector=None):
    ctx = _context(wcs) if visit is None else _context(wcs, visit=visit, detector=detector)
    src = dia_source_record(_dia_row(wcs, x, y, idx), ctx, schema, dia_object_id=555)
    prv, forced = _history(555, [400.0, 100.0, 2.0])
    img = _gauss_image(x, y)
    exp = Exposure(img, np.ones_like(img), np.zeros(img.shape, np.int32))
    diff = Difference(img, np.ones_like(img), np.zeros(img.shape, np.int32), img * 0.5)
    cut = ccd_cutouts(exp, diff, wcs, 27.0, x, y)
    ss = ss_source_record(schema, src["diaSourceId"], 424242, src["ra"], src["dec"], designation="2026 AB")
    return make_alert(schema, src, dia_object=_dia_object(), prv_dia_sources=prv, prv_dia_forced_sources=forced,
                      ss_source=ss, cutouts=cut)  # fmt: skip


# --------------------------------------------------------------------------------------------- schema
def test_schema_is_the_latest_shipped_by_lsst_alert_packet(schema):
    from lsst.alert.packet import get_latest_schema_version

    major, minor = get_latest_schema_version()
    assert major >= 11
    assert schema.definition["name"] == f"lsst.v{major}_{minor}.alert"
    assert schema_id(schema) == major * 100 + minor
    assert load_schema(f"{major}.{minor}") is schema
    with pytest.raises(ValueError, match="no schema 99.0"):
        load_schema("99.0")
    with pytest.raises(ValueError, match="look like"):
        load_schema("latest")


def test_sample_alert_shipped_in_the_package_decodes(schema):
    from lsst.alert.packet import get_schema_path

    major, minor = (int(v) for v in schema.definition["name"].split(".")[1][1:].split("_"))
    alerts = read_alerts(f"{get_schema_path(major, minor)}/sample_data/fakeAlert.avro")
    assert len(alerts) == 1 and alerts[0]["diaSourceId"] == 1231321321
    assert len(alerts[0]["prvDiaSources"]) == 2
    assert alerts[0]["diaObject"]["nDiaSources"] == 2
    assert alerts == read_alerts(f"{get_schema_path(major, minor)}/sample_data/fakeAlert.avro", schema)


# --------------------------------------------------------------------------------------------- records
def test_dia_source_mapping(schema, wcs):
    flags = 1 | 2 | 8 | FORCED_FAILED_FLAG  # EDGE, APERTURE_TRUNCATED, SATURATED, forced failed
    src = dia_source_record(_dia_row(wcs, 150.3, 120.6, flags=flags), _context(wcs), schema, dia_object_id=3)
    assert src["diaSourceId"] == 7 and src["diaObjectId"] == 3 and src["ssObjectId"] is None
    assert src["visit"] == 2026112500042 and src["detector"] == 94 and src["band"] == "r"
    assert src["midpointMjdTai"] == MJD
    assert src["psfFlux"] == pytest.approx(1234.5) and src["snr"] == pytest.approx(21.8, rel=1e-6)
    assert src["scienceFlux"] is None  # NaN: not measured → null
    assert src["trailLength"] == pytest.approx(10.0 * SCALE)
    assert src["ixx"] == pytest.approx(2.0 * SCALE**2) and src["ixy"] == pytest.approx(0.5 * SCALE**2)
    # trail along +y; +y points 20° from north (towards east for this CD): the position angle is 20°
    assert src["trailAngle"] == pytest.approx(20.0, abs=0.05)
    assert src["pixelFlags_edge"] and src["apFlux_flag_apertureTruncated"] and src["pixelFlags_saturated"]
    assert src["forced_PsfFlux_flag"] and not src["pixelFlags_bad"] and not src["centroid_flag"]
    assert src["isDipole"] and src["isNegative"] is False
    assert src["psfFlux_flag_edge"] and not src["psfFlux_flag"] and src["exposureTime"] == 30.0
    # 15×15 PSF stamp; 40 px footprint in a 9-px box, whose moments give trailLength; no dipole model fitted
    assert src["psfNdata"] == 225 and src["bboxSize"] == 9 and src["trailNdata"] == 40 and src["trailAlgorithm"] == 1
    assert src["dipoleNdata"] == 0 and src["dipoleFitAttempted"] is False and src["trail_flag"] is False
    named = schema.definition["__named_schemas"]
    assert fastavro.validate(src, named[schema.definition["name"].replace(".alert", ".diaSource")])
    no_wcs = dia_source_record(_dia_row(wcs, 150.3, 120.6), _context(None), schema)
    assert no_wcs["trailAngle"] is None
    with pytest.raises(ValueError, match="psf_stamp_size"):
        _context(psf_stamp_size=0)
    with pytest.raises(ValueError, match="pixel_scale_arcsec"):
        _context(pixel_scale_arcsec=np.nan)


def test_dia_forced_source_mapping(schema):
    row = np.zeros(1, FORCED_DTYPE)[0]
    row["dia_object_id"], row["ra"], row["dec"], row["psf_flux"], row["psf_flux_err"] = 9, 150.0, -30.0, 5.0, 1.0
    row["science_flux"] = np.nan
    rec = dia_forced_source_record(row, _context(), schema, dia_forced_source_id=77)
    assert rec["diaForcedSourceId"] == 77 and rec["diaObjectId"] == 9 and rec["psfFlux"] == 5.0
    assert rec["scienceFlux"] is None and rec["visit"] == 2026112500042 and rec["midpointMjdTai"] == MJD


def test_alert_dia_source_converts_only_avro_types(schema):
    row = np.zeros(1, A.DIA_SOURCE_ROW)[0]
    row["diaSourceId"], row["visit"], row["detector"], row["band"] = 11, 3, 7, "g"
    row["midpointMjdTai"], row["timeProcessedMjdTai"], row["ra"], row["dec"] = MJD, MJD, 10.0, -5.0
    row["ixx"], row["exposureTime"], row["trailAngle"], row["psfNdata"] = 0.1, np.nan, 33.3, 225
    rec = alert_dia_source(schema, row)
    assert rec["diaObjectId"] is None and rec["ssObjectId"] is None  # the row arrays' 0 = no id (NULL)
    assert rec["exposureTime"] is None and rec["trailAngle"] == float(np.float32(33.3))  # NaN = NULL
    assert rec["ixx"] == float(np.float32(0.1)) and rec["psfNdata"] == 225 and isinstance(rec["detector"], int)
    assert rec["templateFlux"] is None  # a field the row does not fill
    assert alert_dia_source(schema, {**rec, "diaObjectId": 0}) == rec
    with pytest.raises(AlertSchemaError, match="NaN"):
        row["ra"] = np.nan
        alert_dia_source(schema, row)


def test_missing_or_unknown_fields_name_the_field(schema, wcs):
    src = dia_source_record(_dia_row(wcs, 150.0, 120.0), _context(wcs), schema)
    obj = _dia_object()
    del obj["nDiaSources"]
    with pytest.raises(AlertSchemaError, match="diaObject is missing required field 'nDiaSources'"):
        make_alert(schema, src, dia_object=obj)
    with pytest.raises(AlertSchemaError, match=r"diaSource has field\(s\) \['psf_flux'\]"):
        make_alert(schema, {**src, "psf_flux": 1.0})
    bad = dict(src)
    del bad["midpointMjdTai"]
    with pytest.raises(AlertSchemaError, match="missing required field 'midpointMjdTai'"):
        make_alert(schema, bad)
    with pytest.raises(AlertSchemaError, match="no sky position"):
        dia_source_record(_nan_row(wcs), _context(wcs), schema)
    with pytest.raises(AlertSchemaError, match="belongs to diaObject 3"):
        make_alert(schema, {**src, "diaObjectId": 3}, dia_object=_dia_object(555))
    with pytest.raises(AlertSchemaError, match="visit"):  # a string where a long is required
        make_alert(schema, {**src, "visit": "tonight"})


def _nan_row(wcs):
    row = _dia_row(wcs, 1.0, 1.0)
    row["ra"] = np.nan
    return row


def test_history_limited_to_twelve_months(schema, wcs):
    src = dia_source_record(_dia_row(wcs, 150.0, 120.0, idx=5), _context(wcs), schema, dia_object_id=555)
    prv, forced = _history(555, [400.0, 366.0, 364.0, 30.0, 1.0, -1.0])
    prv.append({**prv[-2], "diaSourceId": 5, "midpointMjdTai": MJD})  # the triggering source itself
    alert = make_alert(schema, src, dia_object=_dia_object(), prv_dia_sources=prv, prv_dia_forced_sources=forced)
    got = [MJD - r["midpointMjdTai"] for r in alert["prvDiaSources"]]
    assert got == pytest.approx([364.0, 30.0, 1.0])  # oldest first, nothing older than 365 d, nothing later
    assert [MJD - r["midpointMjdTai"] for r in alert["prvDiaForcedSources"]] == pytest.approx([364.0, 30.0, 1.0])
    assert HISTORY_DAYS == 365.0
    empty = make_alert(schema, src)
    assert empty["prvDiaSources"] == [] and empty["diaObject"] is None and empty["cutoutScience"] is None


# --------------------------------------------------------------------------------------------- serialization
def test_alert_validates_and_round_trips_through_a_container_file(schema, wcs, tmp_path):
    alert = _full_alert(schema, wcs)
    assert fastavro.validate(alert, schema.definition)
    assert alert["diaSourceId"] == alert["diaSource"]["diaSourceId"]
    assert len(alert["prvDiaSources"]) == 2 and alert["ssSource"]["ssObjectId"] == 424242
    path = write_alert_file(tmp_path / "a.avro", [alert], schema)
    with open(path, "rb") as fh:
        back = list(fastavro.reader(fh))
    assert back == [alert]
    assert read_alerts(path, schema) == [alert]
    for name in ("cutoutScience", "cutoutTemplate", "cutoutDifference"):
        c = read_cutout(back[0][name])
        assert c.image.shape == (151, 151)


def test_wire_format_has_confluent_5_byte_header(schema, wcs):
    alert = _full_alert(schema, wcs)
    msg = serialize_alert(schema, alert)
    assert msg[0] == 0
    assert struct.unpack(">I", msg[1:5])[0] == schema_id(schema)
    sid, back = deserialize_alert(schema, msg)
    assert sid == schema_id(schema) and back == alert
    assert fastavro.schemaless_reader(io.BytesIO(msg[5:]), schema.definition) == alert
    assert serialize_alert(schema, alert, 7)[:5] == b"\x00\x00\x00\x00\x07"
    with pytest.raises(ValueError, match="magic byte 0"):
        deserialize_alert(schema, b"\x01" + msg[1:])


# --------------------------------------------------------------------------------------------- cutouts
def test_cutout_is_30_arcsec_centred_and_has_a_wcs(wcs):
    x, y = 180.0, 130.0
    img = _gauss_image(x, y, noise=1.0)
    var = np.full(img.shape, 4.0, np.float32)
    mask = np.zeros(img.shape, np.int32)
    mask[131, 181] = int(MaskBit.CR)
    n = cutout_size_pixels(wcs)
    assert n % 2 == 1 and abs(n * SCALE - 30.0) <= 1.01 * SCALE
    data = make_cutout(img, x, y, wcs, n, var, mask, flux_scale=2.0)
    assert data == make_cutout(img, x, y, wcs, n, var, mask, flux_scale=2.0)  # deterministic bytes
    c = read_cutout(data)
    assert c.image.shape == c.variance.shape == c.mask.shape == (n, n)
    assert np.unravel_index(np.nanargmax(c.image), c.image.shape) == (n // 2, n // 2)
    assert c.header["BUNIT"] == "nJy" and c.image[n // 2, n // 2] == pytest.approx(2.0 * img[130, 180])
    assert np.allclose(c.variance, 16.0) and c.mask[n // 2 + 1, n // 2 + 1] == int(MaskBit.CR)
    ra, dec = wcs.all_pix2world(x, y, 0)
    cra, cdec = c.wcs.all_pix2world(n // 2, n // 2, 0)
    sep = math.hypot((cra - ra) * math.cos(math.radians(dec)), cdec - dec) * 3600
    assert sep < 0.01
    # a fractional position maps too, through the cutout's origin
    xf, yf = 180.37, 129.71
    ra, dec = wcs.all_pix2world(xf, yf, 0)
    cf = read_cutout(make_cutout(img, xf, yf, wcs, n))
    cra, cdec = cf.wcs.all_pix2world(xf - cf.header["CUTMINX"], yf - cf.header["CUTMINY"], 0)
    assert math.hypot((cra - ra) * math.cos(math.radians(dec)), cdec - dec) * 3600 < 0.01
    ccd = CCDData.read(io.BytesIO(data))  # what brokers use
    assert ccd.unit.to_string() == "nJy" and ccd.uncertainty.array.shape == (n, n)


def test_cutout_at_ccd_edge_keeps_size_and_centre(wcs):
    x, y = 3.0, NY - 2.0
    img = _gauss_image(x, y)
    n = cutout_size_pixels(wcs)
    c = read_cutout(make_cutout(img, x, y, wcs, n, img, np.zeros(img.shape, np.int32)))
    assert c.image.shape == (n, n)
    assert np.unravel_index(np.nanargmax(c.image), c.image.shape) == (n // 2, n // 2)
    outside = np.isnan(c.image)
    assert outside[:, : n // 2 - 3].all() and outside[n // 2 + 2 :, :].all() and not outside[n // 2, n // 2]
    assert ((c.mask[outside] & int(MaskBit.NO_DATA)) != 0).all() and (c.mask[~outside] == 0).all()
    assert np.isnan(c.variance[outside]).all()
    # a centroid just off the edge (a source the edge cuts) gets its cutout at the nearest edge pixel
    edge = read_cutout(make_cutout(img, -1.4, y, wcs, n, img, np.zeros(img.shape, np.int32)))
    assert edge.image.shape == (n, n) and np.isfinite(edge.image[n // 2, n // 2])
    with pytest.raises(ValueError, match="outside"):
        make_cutout(img, NX + n, 5.0, wcs, n)
    with pytest.raises(ValueError, match="odd"):
        make_cutout(img, x, y, wcs, 150)


def test_ccd_cutouts_calibrate_to_njy(wcs):
    img = _gauss_image(200.0, 150.0)
    exp = Exposure(img, np.ones_like(img), np.zeros(img.shape, np.int32))
    diff = Difference(img * 0.25, np.ones_like(img), np.zeros(img.shape, np.int32), img * 0.75)
    cuts = ccd_cutouts(exp, diff, wcs, 31.4, 200.0, 150.0)  # zero point 31.4: 1 e- = 1 nJy
    sci, tmpl, dif = (read_cutout(b) for b in (cuts.science, cuts.template, cuts.difference))
    c = cutout_size_pixels(wcs) // 2
    assert sci.image[c, c] == pytest.approx(img[150, 200])
    assert dif.image[c, c] == pytest.approx(0.25 * img[150, 200]) and dif.mask is not None
    assert tmpl.image[c, c] == pytest.approx(0.75 * img[150, 200]) and tmpl.variance is None
    assert ccd_cutouts(exp, None, wcs, 31.4, 200.0, 150.0) == Cutouts(cuts.science, None, None)
    with pytest.raises(ValueError, match="WCS"):
        ccd_cutouts(exp, diff, None, 31.4, 200.0, 150.0)


def _odd_wcs(wcs):
    """The fixture's WCS with a reference pixel that is no half-integer (wcslib formats it with more digits)."""
    w = wcs.deepcopy()
    w.wcs.crpix = [201.123456789012, 150.987654321098]
    w.sip = Sip(wcs.sip.a, wcs.sip.b, None, None, w.wcs.crpix)
    return w


@pytest.mark.parametrize("odd_crpix", [False, True], ids=["half-pixel-crpix", "odd-crpix"])
def test_ccd_cutouts_bytes_are_make_cutouts_everywhere(wcs, odd_crpix):
    # the per-CCD writer patches four header cards of one astropy-made stamp: its bytes must be exactly
    # make_cutout's for every position, inside, at the edges and just off them, for all three stamps
    w = _odd_wcs(wcs) if odd_crpix else wcs
    rng = np.random.default_rng(11)
    img = rng.normal(100.0, 10.0, (NY, NX)).astype(np.float32)
    img[5, 7] = np.nan
    var = rng.uniform(1.0, 4.0, (NY, NX)).astype(np.float32)
    mask = rng.integers(0, 1 << 20, (NY, NX)).astype(np.int32)
    exp = Exposure(img, var, mask)
    diff = Difference(img * 0.5, var * 2.0, mask ^ 1, img * 0.25)
    zp = 27.3
    cuts = CcdCutouts(exp, diff, w, zp)
    n = cuts.size
    half = n // 2
    scale = njy_per_electron(zp)
    points = [(180.2, 130.7), (0.0, 0.0), (-0.5 - half, -0.5 - half), (NX - 0.5 + half - 1e-6, NY - 0.51 + half),
              (NX - 1.0, 3.0), (-1.4, NY - 2.0), (17.5, 150.5), (16.5, 149.5)]  # fmt: skip
    points += [(float(x), float(y)) for x, y in rng.uniform([-0.5 - half, -0.5 - half],
                                                            [NX - 0.5 + half, NY - 0.5 + half], (25, 2))]  # fmt: skip
    for x, y in points:
        ref = Cutouts(make_cutout(img, x, y, w, n, var, mask, scale), make_cutout(img * 0.25, x, y, w, n, flux_scale=scale),
                      make_cutout(img * 0.5, x, y, w, n, var * 2.0, mask ^ 1, scale))  # fmt: skip
        assert cuts.at(x, y) == ref, (x, y)
    assert ccd_cutouts(exp, diff, w, zp, 180.2, 130.7) == cuts.at(180.2, 130.7)
    c = read_cutout(cuts.at(180.2, 130.7).science)
    ra, dec = w.all_pix2world(180.2, 130.7, 0)
    cra, cdec = c.wcs.all_pix2world(180.2 - c.header["CUTMINX"], 130.7 - c.header["CUTMINY"], 0)
    assert math.hypot((cra - ra) * math.cos(math.radians(dec)), cdec - dec) * 3600 < 1e-6
    with pytest.raises(ValueError, match="outside"):
        cuts.at(NX + n, 5.0)
    with pytest.raises(ValueError, match="layout"):
        CutoutWriter(w, n, variance=False, mask=False).write(img, 10.0, 10.0, var)
    with pytest.raises(ValueError, match="odd"):
        CutoutWriter(w, 150, variance=True, mask=True)


# --------------------------------------------------------------------------------------------- writer
class FakeProducer:
    """In-memory stand-in for a Kafka producer (no network)."""

    def __init__(self):
        self.messages = []
        self.flushed = 0

    def produce(self, topic, key, value):
        self.messages.append((topic, key, value))

    def flush(self):
        self.flushed += 1


def test_writer_batches_per_ccd_atomically_and_to_kafka(schema, wcs, tmp_path):
    alerts = [_full_alert(schema, wcs, 100.0 + 20 * i, 120.0, idx=i, visit=42, detector=94) for i in range(7)]
    other = _full_alert(schema, wcs, 150.0, 150.0, idx=100, visit=42, detector=95)
    kafka = FakeProducer()
    w = AlertWriter(tmp_path, batch_size=3, kafka=kafka, topic="lsst-alerts")
    d = tmp_path / "alerts" / "42"
    assert w.add(alerts[0]) is None and w.add(alerts[1]) is None and not d.exists()
    first = w.add(alerts[2])
    assert first == d / "94-0.avro" and first.exists()  # a full batch leaves before close
    assert read_alerts(first) == alerts[:3]
    w.add(other)
    assert w.add_many(alerts[3:]) == [d / "94-1.avro"]
    assert sorted(p.name for p in d.iterdir()) == ["94-0.avro", "94-1.avro"]  # no temporary files left
    assert w.pending == 2 and len(kafka.messages) == 8 and kafka.flushed == 0
    assert sorted(w.close()) == [d / "94-2.avro", d / "95-0.avro"]
    assert kafka.flushed == 1 and w.close() == []
    with pytest.raises(RuntimeError, match="closed"):
        w.add(alerts[0])
    got = [a for b in range(3) for a in read_alerts(d / f"94-{b}.avro")]
    assert got == alerts and read_alerts(d / "95-0.avro") == [other]
    topic, key, value = kafka.messages[0]
    assert topic == "lsst-alerts" and key == b"0" and value[:5] == b"\x00" + struct.pack(">I", schema_id(schema))
    assert deserialize_alert(schema, value)[1] == alerts[0]


def test_reset_ccd_leaves_exactly_the_rerun_alerts(schema, wcs, tmp_path):
    alerts = [_full_alert(schema, wcs, 100.0 + 20 * i, 120.0, idx=i, visit=42, detector=94) for i in range(5)]
    other = _full_alert(schema, wcs, 150.0, 150.0, idx=100, visit=42, detector=95)
    w = AlertWriter(tmp_path, batch_size=2)
    w.add_many(alerts[:3] + [other])  # the first attempt dies after one full batch and a queued alert
    d = tmp_path / "alerts" / "42"
    assert w.reset_ccd(42, 94) == [d / "94-0.avro"] and w.pending == 1
    w.add_many(alerts)  # the re-run
    w.close()
    got = [a for p in sorted(d.glob("94-*.avro")) for a in read_alerts(p)]
    assert sorted(a["diaSourceId"] for a in got) == list(range(5)) and read_alerts(d / "95-0.avro") == [other]


def test_writer_rejects_bad_input_with_clear_errors(schema, wcs, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        AlertWriter(tmp_path, batch_size=0)
    with pytest.raises(TypeError, match="produce"):
        AlertWriter(tmp_path, kafka=object())
    w = AlertWriter(tmp_path, batch_size=2)
    bad = _full_alert(schema, wcs)
    bad["diaSource"] = {**bad["diaSource"], "ra": None}
    with pytest.raises(AlertSchemaError, match=r"diaSource\.ra\) is None expected double"):
        w.add(bad)
    assert w.pending == 0 and w.close() == []


# --------------------------------------------------------------------------------------------- the real chain
@pytest.mark.slow
def test_alerts_from_a_processed_mini_ccd(tmp_path, schema):
    """One alert per DIASource of a simulated mini CCD run through ``process_ccd`` (≈1 min: simulation + chain)."""
    from lsstpipe.pipelines.ap import process_ccd
    from lsstpipe.pipelines.inputs import load_ccd_inputs
    from lsstpipe.repo import Repository
    from lsstpipe.sim.simulate import SimulationRequest, run_simulation

    root = tmp_path / "repo"
    run_simulation(SimulationRequest(repo=str(root), detectors=("R11_S12",), n_visits=1, bands="r", cds=False,
                                     seed=11, progress=False))  # fmt: skip
    repo = Repository(root)
    visit = sorted({e["visit"] for e in repo.exposures("OBJECT")})[0]
    inputs = load_ccd_inputs(repo, visit, "R11_S12", calibs="truth")
    result = process_ccd(inputs)
    assert len(result.dia_sources), result.flags
    char = result.characterization
    ctx = SourceContext(visit=int(visit), detector=inputs.detector.id, midpoint_mjd_tai=61000.0,
                        time_processed_mjd_tai=61000.001, band=inputs.band, wcs=char.wcs, psf_stamp_size=15,
                        pixel_scale_arcsec=char.metrics["pixel_scale_arcsec"])  # fmt: skip
    with AlertWriter(tmp_path / "out", batch_size=4) as writer:
        for i, row in enumerate(result.dia_sources):
            src = dia_source_record(row, ctx, schema, dia_source_id=i + 1)
            cuts = ccd_cutouts(result.calexp, result.difference, char.wcs, char.zero_point, row["x"], row["y"])
            writer.add(make_alert(schema, src, cutouts=cuts))
    alerts = [a for p in writer.paths for a in read_alerts(p, schema)]
    assert sorted(a["diaSourceId"] for a in alerts) == list(range(1, len(result.dia_sources) + 1))
    for a in alerts:
        assert fastavro.validate(a, schema.definition)
        c = read_cutout(a["cutoutDifference"])
        n = c.image.shape[0]
        ra, dec = c.wcs.all_pix2world(a["diaSource"]["x"] - c.header["CUTMINX"],
                                      a["diaSource"]["y"] - c.header["CUTMINY"], 0)  # fmt: skip
        dra = (ra - a["diaSource"]["ra"]) * math.cos(math.radians(dec))
        assert math.hypot(dra, dec - a["diaSource"]["dec"]) * 3600 < 0.01 and n == 151
