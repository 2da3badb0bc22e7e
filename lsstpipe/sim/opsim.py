"""Visit sequences: Rubin's simulated survey (opsim) or a built-in synthetic generator.

Conventions
-----------
* Times are MJD, treated as TAI (the scale of Rubin's headers). Sidereal time uses UTC = TAI − 37 s
  (valid since 2017-01-01) and UT1 ≈ UTC.
* ``day_obs`` is the calendar date (YYYYMMDD) of ``mjd`` − 12 h, Rubin's observing-day convention, so a
  night's visits share one ``day_obs``.
* ``seq_num`` counts exposures from 1 within a ``day_obs``; a visit of two snaps uses ``seq_num`` and
  ``seq_num + 1``.
* Visit ids follow Rubin's exposure-id convention ``day_obs * 100000 + seq_num`` (the id of the visit's
  first exposure), unless a ``first_visit_id`` asks for consecutive ids instead.
* A visit of ``n_snaps`` snaps of ``exptime / n_snaps`` seconds each has a 2 s readout after every
  snap: snap ``i`` starts at ``mjd + i * (exptime / n_snaps + 2 s)`` and the visit lasts
  ``n_snaps * (exptime / n_snaps + 2 s)`` (34 s for 2×15 s).
* Airmass is the plane-parallel sec(z) at Rubin's site, as opsim computes it.
"""

from __future__ import annotations

import datetime
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BANDS = ("u", "g", "r", "i", "z", "y")
#: Rubin Observatory at Cerro Pachón: longitude (deg, east positive), latitude (deg), height (m).
RUBIN_LON_DEG = -70.7494
RUBIN_LAT_DEG = -30.2444
RUBIN_HEIGHT_M = 2650.0
#: TAI − UTC in seconds, valid since 2017-01-01.
TAI_MINUS_UTC_S = 37.0
#: Readout time after each snap, seconds.
READOUT_S = 2.0

#: Dark-sky brightness (mag/arcsec²), Cm and extinction km per band: Ivezić et al. (2019), Table 2.
DARK_SKY_MAG = {"u": 22.99, "g": 22.26, "r": 21.20, "i": 20.48, "z": 19.60, "y": 18.61}
M5_CM = {"u": 23.09, "g": 24.42, "r": 24.44, "i": 24.32, "z": 24.16, "y": 23.73}
M5_KM = {"u": 0.491, "g": 0.213, "r": 0.126, "i": 0.096, "z": 0.069, "y": 0.170}
#: Fraction of visits per band in Rubin's baseline survey.
SURVEY_BAND_MIX = {"u": 0.07, "g": 0.09, "r": 0.22, "i": 0.22, "z": 0.20, "y": 0.20}

OPSIM_TABLE = "observations"
OPSIM_COLUMNS = (
    "observationId", "observationStartMJD", "visitTime", "visitExposureTime", "filter",
    "seeingFwhmGeom", "seeingFwhmEff", "fiveSigmaDepth", "fieldRA", "fieldDec", "rotSkyPos",
)  # fmt: skip
_SQLITE_MAGIC = b"SQLite format 3\x00"
_MJD_EPOCH = datetime.datetime(1858, 11, 17)


def local_sidereal_time_deg(mjd: np.ndarray | float, lon_deg: float = RUBIN_LON_DEG) -> np.ndarray:
    """Local mean sidereal time in degrees at MJD (TAI) and east longitude ``lon_deg`` (IAU 1982 GMST)."""
    d = np.asarray(mjd, dtype=float) - 51544.5 - TAI_MINUS_UTC_S / 86400.0
    t = d / 36525.0
    gmst = 280.46061837 + 360.98564736629 * d + 0.000387933 * t**2 - t**3 / 38710000.0
    return np.mod(gmst + lon_deg, 360.0)


def altitude_deg(ra: np.ndarray | float, dec: np.ndarray | float, mjd: np.ndarray | float) -> np.ndarray:
    """Altitude in degrees of (ra, dec) [deg] seen from Rubin at MJD (TAI); no refraction."""
    ha = np.deg2rad(local_sidereal_time_deg(mjd) - np.asarray(ra, dtype=float))
    dec_r, lat = np.deg2rad(np.asarray(dec, dtype=float)), np.deg2rad(RUBIN_LAT_DEG)
    sin_alt = np.sin(lat) * np.sin(dec_r) + np.cos(lat) * np.cos(dec_r) * np.cos(ha)
    return np.rad2deg(np.arcsin(np.clip(sin_alt, -1.0, 1.0)))


def airmass(ra: np.ndarray | float, dec: np.ndarray | float, mjd: np.ndarray | float) -> np.ndarray:
    """Plane-parallel airmass sec(z) of (ra, dec) [deg] from Rubin at MJD (TAI); NaN below the horizon."""
    sin_alt = np.sin(np.deg2rad(altitude_deg(ra, dec, mjd)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sin_alt > 0.0, 1.0 / sin_alt, np.nan)


def m5_from_sky(band: str, sky_mag, seeing_fwhm, exptime, airmass):
    """Point-source 5σ depth, Ivezić et al. (2019) eq. 6.

    ``m5 = Cm + 0.5 (m_sky − 21) + 2.5 log10(0.7 / θ_eff) + 1.25 log10(t / 30) − km (X − 1)``, with
    ``Cm`` and ``km`` per band from the paper's Table 2. Vectorised over every argument but ``band``.
    """
    _check_band(band)
    return (
        M5_CM[band]
        + 0.5 * (np.asarray(sky_mag) - 21.0)
        + 2.5 * np.log10(0.7 / np.asarray(seeing_fwhm))
        + 1.25 * np.log10(np.asarray(exptime) / 30.0)
        - M5_KM[band] * (np.asarray(airmass) - 1.0)
    )


def sky_from_m5(band: str, m5, seeing_fwhm, exptime, airmass):
    """Sky brightness (mag/arcsec²) that gives depth ``m5``: eq. 6 of Ivezić et al. (2019) inverted.

    Where the inputs are not finite (or the seeing is not positive) the band's dark-sky value
    :data:`DARK_SKY_MAG` is returned instead.
    """
    _check_band(band)
    m5, seeing = np.asarray(m5, dtype=float), np.asarray(seeing_fwhm, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        sky = 21.0 + 2.0 * (
            m5
            - M5_CM[band]
            - 2.5 * np.log10(0.7 / seeing)
            - 1.25 * np.log10(np.asarray(exptime) / 30.0)
            + M5_KM[band] * (np.asarray(airmass) - 1.0)
        )
    return np.where(np.isfinite(sky) & (seeing > 0.0), sky, DARK_SKY_MAG[band])


def day_obs_of(mjd: float) -> int:
    """Rubin's observing day (YYYYMMDD, the date at ``mjd`` − 12 h) of an MJD."""
    date = _MJD_EPOCH + datetime.timedelta(days=float(mjd) - 0.5)
    return date.year * 10000 + date.month * 100 + date.day


def _check_band(band: str) -> None:
    if band not in BANDS:
        raise ValueError(f"unknown band {band!r}; LSSTCam bands are {', '.join(BANDS)}")


@dataclass(frozen=True)
class VisitSpec:
    """One visit: pointing, time, band and observing conditions.

    Build one with :meth:`create`, which derives ``day_obs``, ``airmass`` and ``sky_mag``.

    Attributes
    ----------
    visit : int
        Our visit id (see the module conventions).
    observation_id : int
        The opsim ``observationId``, or -1 for a synthetic visit.
    mjd : float
        Start of the first exposure, MJD (TAI).
    day_obs : int
        Observing day, YYYYMMDD of ``mjd`` − 12 h.
    seq_num : int
        1-based exposure counter within ``day_obs`` of the visit's first snap.
    band : str
        One of u, g, r, i, z, y.
    ra, dec : float
        Boresight (deg, ICRS).
    rot_sky_pos : float
        Position angle (deg, from north through east) of the focal-plane +y axis on the sky.
    seeing_fwhm : float
        Effective seeing FWHM in arcsec (opsim ``seeingFwhmEff``).
    five_sigma_depth : float
        Point-source 5σ depth (AB mag).
    exptime : float
        Total open-shutter time of the visit, seconds.
    n_snaps : int
        Number of snaps (1 or 2).
    airmass : float
        sec(z) of the boresight at ``mjd`` from Rubin's site.
    sky_mag : float
        Sky brightness in the band, mag/arcsec².
    """

    visit: int
    observation_id: int
    mjd: float
    day_obs: int
    seq_num: int
    band: str
    ra: float
    dec: float
    rot_sky_pos: float
    seeing_fwhm: float
    five_sigma_depth: float
    exptime: float
    n_snaps: int
    airmass: float
    sky_mag: float

    def __post_init__(self) -> None:
        _check_band(self.band)
        if self.n_snaps not in (1, 2):
            raise ValueError(f"visit {self.visit}: n_snaps must be 1 or 2, not {self.n_snaps}")
        if not self.exptime > 0.0:
            raise ValueError(f"visit {self.visit}: exptime must be positive, not {self.exptime}")
        if not -90.0 <= self.dec <= 90.0:
            raise ValueError(f"visit {self.visit}: dec must be within [-90, 90] deg, not {self.dec}")
        if self.seq_num < 1:
            raise ValueError(f"visit {self.visit}: seq_num counts from 1, not {self.seq_num}")
        if not self.seeing_fwhm > 0.0:
            raise ValueError(f"visit {self.visit}: seeing_fwhm must be positive, not {self.seeing_fwhm}")
        if not (math.isfinite(self.airmass) and self.airmass >= 1.0):
            raise ValueError(
                f"visit {self.visit}: boresight RA {self.ra:.3f}, Dec {self.dec:.3f} is below the horizon "
                f"at MJD {self.mjd:.5f} (airmass {self.airmass}); pick a pointing near the local "
                f"sidereal time {float(local_sidereal_time_deg(self.mjd)):.1f} deg"
            )

    @classmethod
    def create(
        cls, *, visit: int, mjd: float, band: str, ra: float, dec: float, rot_sky_pos: float,
        seeing_fwhm: float, five_sigma_depth: float = math.nan, exptime: float = 30.0, n_snaps: int = 2,
        seq_num: int = 1, observation_id: int = -1, sky_mag: float | None = None,
    ) -> VisitSpec:  # fmt: skip
        """A visit with ``day_obs``, ``airmass`` and (unless given) ``sky_mag`` derived.

        ``sky_mag`` comes from ``five_sigma_depth`` by eq. 6 of Ivezić et al. (2019); when the depth is
        NaN it is the band's dark-sky value and the depth is computed from it instead.
        """
        _check_band(band)
        x = float(airmass(ra, dec, mjd))
        if sky_mag is None:
            sky_mag = float(sky_from_m5(band, five_sigma_depth, seeing_fwhm, exptime, x))
        if not math.isfinite(five_sigma_depth):
            five_sigma_depth = float(m5_from_sky(band, sky_mag, seeing_fwhm, exptime, x))
        return cls(
            visit=int(visit), observation_id=int(observation_id), mjd=float(mjd), day_obs=day_obs_of(mjd),
            seq_num=int(seq_num), band=band, ra=float(ra) % 360.0, dec=float(dec),
            rot_sky_pos=float(rot_sky_pos) % 360.0, seeing_fwhm=float(seeing_fwhm),
            five_sigma_depth=float(five_sigma_depth), exptime=float(exptime), n_snaps=int(n_snaps),
            airmass=x, sky_mag=float(sky_mag),
        )  # fmt: skip

    @property
    def snap_exptime(self) -> float:
        """Exposure time of one snap, seconds."""
        return self.exptime / self.n_snaps

    @property
    def visit_time(self) -> float:
        """Duration of the visit including the readouts, seconds."""
        return self.n_snaps * (self.snap_exptime + READOUT_S)

    def _check_snap(self, i: int) -> None:
        if not 0 <= i < self.n_snaps:
            raise IndexError(f"visit {self.visit} has snaps 0..{self.n_snaps - 1}; no snap {i}")

    def snap_mjd(self, i: int) -> float:
        """Start (MJD, TAI) of snap ``i`` (0-based): snaps are separated by the snap time + 2 s readout."""
        self._check_snap(i)
        return self.mjd + i * (self.snap_exptime + READOUT_S) / 86400.0

    def exposure_id(self, i: int) -> int:
        """Rubin exposure id ``day_obs * 100000 + seq_num + i`` of snap ``i``."""
        self._check_snap(i)
        return self.day_obs * 100000 + self.seq_num + i

    def obsid(self, i: int) -> str:
        """LSSTCam OBSID of snap ``i``, e.g. ``MC_O_20230924_000001``."""
        self._check_snap(i)
        return f"MC_O_{self.day_obs}_{self.seq_num + i:06d}"


def _seq_nums(mjds: np.ndarray, n_snaps: np.ndarray) -> tuple[list[int], list[int]]:
    """``day_obs`` and 1-based ``seq_num`` of time-ordered visits, counting exposures per day_obs."""
    day_obs, seq = [], []
    counter: dict[int, int] = {}
    for mjd, n in zip(mjds, n_snaps):
        d = day_obs_of(mjd)
        s = counter.get(d, 1)
        counter[d] = s + int(n)
        day_obs.append(d)
        seq.append(s)
    return day_obs, seq


def _connect_opsim(db_path: Path) -> sqlite3.Connection:
    if not db_path.is_file():
        raise FileNotFoundError(
            f"opsim database {db_path} does not exist; pass the path of a Rubin survey simulation "
            f"SQLite file such as baseline_v2.0_1yr.db"
        )
    with open(db_path, "rb") as f:
        if f.read(16) != _SQLITE_MAGIC:
            raise ValueError(
                f"{db_path} is not an SQLite database; pass an opsim output file (.db) with a {OPSIM_TABLE!r} table"
            )
    con = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    if OPSIM_TABLE not in tables:
        con.close()
        raise ValueError(
            f"{db_path} has no {OPSIM_TABLE!r} table (tables: {', '.join(tables) or 'none'}); "
            f"is it an opsim output file?"
        )
    columns = {r[1] for r in con.execute(f"PRAGMA table_info({OPSIM_TABLE})")}
    missing = [c for c in OPSIM_COLUMNS if c not in columns]
    if missing:
        con.close()
        raise ValueError(
            f"table {OPSIM_TABLE!r} of {db_path} lacks the columns {', '.join(missing)}; an opsim "
            f"database of Rubin's v2 schema (e.g. baseline_v2.0) has them"
        )
    return con


def _night_error(con: sqlite3.Connection, db_path: Path, night: int, day0: int) -> ValueError:
    rows = con.execute(f"SELECT DISTINCT CAST(observationStartMJD - 0.5 AS INTEGER) FROM {OPSIM_TABLE}").fetchall()
    nights = np.array(sorted(r[0] - day0 + 1 for r in rows))
    if nights.size == 0:
        return ValueError(f"{db_path} has no visits")
    nearest = nights[np.argsort(np.abs(nights - night), kind="stable")[:2]]
    return ValueError(
        f"night {night} of {db_path} has no visits; it holds {nights.size} nights with visits between "
        f"night {nights[0]} and night {nights[-1]} (nearest: {', '.join(map(str, sorted(nearest)))})"
    )


def read_opsim(
    db_path: str | Path, night: int | None = None, visits: int | None = None,
    first_visit_id: int | None = None,
) -> list[VisitSpec]:  # fmt: skip
    """Visits of a Rubin survey simulation (opsim) SQLite database, in time order.

    Parameters
    ----------
    db_path : str or Path
        An opsim output file with an ``observations`` table holding :data:`OPSIM_COLUMNS`
        (e.g. ``baseline_v2.0_1yr.db``).
    night : int, optional
        Night number counted in calendar nights (observing days) from the first night in the file,
        which is night 1. None reads every night.
    visits : int, optional
        Keep only the first ``visits`` visits of the selection.
    first_visit_id : int, optional
        Number the visits ``first_visit_id``, ``first_visit_id + 1``, …; by default the visit id is
        Rubin's exposure id ``day_obs * 100000 + seq_num``.

    Returns
    -------
    list of VisitSpec
        ``seeing_fwhm`` is ``seeingFwhmEff``; ``n_snaps`` is 1 when ``visitTime`` exceeds the exposure
        time by less than 2.5 s (the 1×30 s u-band visits of baseline v2.0), else 2; ``sky_mag`` is
        derived from ``fiveSigmaDepth``.

    Raises
    ------
    FileNotFoundError
        If ``db_path`` does not exist.
    ValueError
        If the file is not an opsim SQLite database, or the night has no visits.
    """
    db_path = Path(db_path)
    if night is not None and (not isinstance(night, (int, np.integer)) or night < 1):
        raise ValueError(f"night counts from 1 (the first night in the file), not {night!r}")
    if visits is not None and visits < 1:
        raise ValueError(f"visits must be a positive number of visits to read, not {visits!r}")
    con = _connect_opsim(db_path)
    try:
        first = con.execute(f"SELECT MIN(observationStartMJD) FROM {OPSIM_TABLE}").fetchone()[0]
        if first is None:
            raise ValueError(f"{db_path} has no visits")
        day0 = math.floor(first - 0.5)
        query = f"SELECT {', '.join(OPSIM_COLUMNS)} FROM {OPSIM_TABLE}"
        args: tuple = ()
        if night is not None:
            query += " WHERE observationStartMJD >= ? AND observationStartMJD < ?"
            args = (day0 + night - 0.5, day0 + night + 0.5)
        query += " ORDER BY observationStartMJD"
        if visits is not None:
            query += f" LIMIT {int(visits)}"
        rows = con.execute(query, args).fetchall()
        if not rows:
            raise _night_error(con, db_path, int(night or 1), day0)
    finally:
        con.close()
    cols = {name: [r[i] for r in rows] for i, name in enumerate(OPSIM_COLUMNS)}
    mjd = np.array(cols["observationStartMJD"], dtype=float)
    exptime = np.array(cols["visitExposureTime"], dtype=float)
    n_snaps = np.where(np.array(cols["visitTime"], dtype=float) - exptime < 2.5, 1, 2)
    ra, dec = np.array(cols["fieldRA"], dtype=float), np.array(cols["fieldDec"], dtype=float)
    x = airmass(ra, dec, mjd)
    day_obs, seq = _seq_nums(mjd, n_snaps)
    out = []
    for k in range(len(rows)):
        band = cols["filter"][k]
        _check_band(band)
        seeing, m5 = cols["seeingFwhmEff"][k], cols["fiveSigmaDepth"][k]
        vid = day_obs[k] * 100000 + seq[k] if first_visit_id is None else first_visit_id + k
        out.append(
            VisitSpec(
                visit=vid, observation_id=int(cols["observationId"][k]), mjd=float(mjd[k]),
                day_obs=day_obs[k], seq_num=seq[k], band=band, ra=float(ra[k]) % 360.0, dec=float(dec[k]),
                rot_sky_pos=float(cols["rotSkyPos"][k]) % 360.0, seeing_fwhm=float(seeing),
                five_sigma_depth=float(m5), exptime=float(exptime[k]), n_snaps=int(n_snaps[k]),
                airmass=float(x[k]),
                sky_mag=float(sky_from_m5(band, m5, seeing, exptime[k], x[k])),
            )
        )  # fmt: skip
    return out


def synthetic_visits(
    n: int, seed: int = 0, *, start_mjd: float = 60218.05, ra: float = 330.0, dec: float = -25.0,
    dither_deg: float = 0.2, n_snaps: int = 2, bands: str | Sequence[str] | None = None,
    block_size: int = 4, revisit_minutes: float = 30.0, first_visit_id: int | None = None,
) -> list[VisitSpec]:  # fmt: skip
    """A deterministic, realistic-looking sequence of ``n`` visits to one field.

    Visits come in blocks of ``block_size`` consecutive visits (one every visit time: 34 s for 2 snaps,
    32 s for 1); each block is repeated about ``revisit_minutes`` later (±10 %) in the same band, so that
    moving objects can be linked, and the next pair of blocks starts after the revisit. Each visit points
    at the field centre (``ra``, ``dec``) dithered uniformly within ±``dither_deg`` on the sky, with a
    uniformly random ``rot_sky_pos``. Seeing is lognormal with median 0.8″ (15 % per block pair, 3 % per
    visit), the sky up to 0.3 mag brighter than dark sky, and the depth follows from eq. 6 of
    Ivezić et al. (2019).

    The default field, (330°, −25°) from MJD 60218.05 (2023-10-01 01:12 UTC), crosses the meridian
    at Rubin about an hour after the start, at airmass ≈ 1.0.

    Parameters
    ----------
    n : int
        Number of visits.
    seed : int
        Seed of the random generator; the same seed gives the same visits.
    start_mjd : float
        Start of the first visit (MJD, TAI).
    ra, dec : float
        Field centre (deg).
    dither_deg : float
        Half-width of the dither box (deg).
    n_snaps : int
        Snaps per visit (2×15 s or 1×30 s).
    bands : str or sequence of str, optional
        Bands to cycle through, one per block pair (``"gr"`` or ``["g", "r"]``); by default each pair's
        band is drawn from Rubin's survey mix :data:`SURVEY_BAND_MIX`.
    block_size : int
        Consecutive visits per block.
    revisit_minutes : float
        Mean delay between a block and its revisit.
    first_visit_id : int, optional
        Number the visits consecutively from this id instead of ``day_obs * 100000 + seq_num``.

    Returns
    -------
    list of VisitSpec
        With ``observation_id`` = -1.
    """
    if n < 1:
        raise ValueError(f"n must be a positive number of visits, not {n}")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, not {block_size}")
    if not 0.0 <= dither_deg < 5.0:
        raise ValueError(f"dither_deg must be within [0, 5) deg, not {dither_deg}")
    band_cycle = list(bands) if bands is not None else None
    for b in band_cycle or ():
        _check_band(b)
    if band_cycle is not None and not band_cycle:
        raise ValueError("bands is empty; give at least one band or None for the survey mix")
    rng = np.random.default_rng(seed)
    visit_time = n_snaps * (30.0 / n_snaps + READOUT_S) / 86400.0
    mix_bands, mix_p = list(SURVEY_BAND_MIX), np.array(list(SURVEY_BAND_MIX.values()))
    specs: list[tuple[float, str, float, float]] = []  # mjd, band, seeing, sky brightening
    t, pair = float(start_mjd), 0
    while len(specs) < n:
        band = band_cycle[pair % len(band_cycle)] if band_cycle else str(rng.choice(mix_bands, p=mix_p))
        seeing_pair = 0.8 * math.exp(0.15 * rng.standard_normal())
        revisit = revisit_minutes * (1.0 + rng.uniform(-0.1, 0.1)) / 1440.0
        for start in (t, t + revisit):
            for k in range(block_size):
                seeing = max(0.4, seeing_pair * math.exp(0.03 * rng.standard_normal()))
                specs.append((start + k * visit_time, band, seeing, rng.uniform(0.0, 0.3)))
        t += revisit + block_size * visit_time + rng.uniform(5.0, 10.0) / 86400.0
        pair += 1
    specs = specs[:n]
    dx, dy = rng.uniform(-dither_deg, dither_deg, (2, n))
    rot = rng.uniform(0.0, 360.0, n)
    mjds = np.array([s[0] for s in specs])
    day_obs, seq = _seq_nums(mjds, np.full(n, n_snaps))
    out = []
    for k, (mjd, band, seeing, brighter) in enumerate(specs):
        dec_k = float(np.clip(dec + dy[k], -90.0, 90.0))
        ra_k = (ra + dx[k] / max(math.cos(math.radians(dec_k)), 1e-3)) % 360.0
        vid = day_obs[k] * 100000 + seq[k] if first_visit_id is None else first_visit_id + k
        out.append(
            VisitSpec.create(
                visit=vid, mjd=mjd, band=band, ra=ra_k, dec=dec_k, rot_sky_pos=rot[k], seeing_fwhm=seeing,
                exptime=30.0, n_snaps=n_snaps, seq_num=seq[k], sky_mag=DARK_SKY_MAG[band] - brighter,
            )
        )  # fmt: skip
    return out
