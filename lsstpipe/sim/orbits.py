"""Solar System objects on Keplerian orbits: positions, astrometric RA/Dec and magnitudes.

Conventions
-----------
* Positions are heliocentric, in AU, in the mean ecliptic and equinox of J2000; RA/Dec are equatorial
  J2000 (rotated by the J2000 obliquity), taken as ICRS (the ~20 mas frame bias is ignored).
* Orbital elements: ``a`` [AU], ``e``, ``inc``, ``node``, ``arg_peri``, mean anomaly ``ma`` [deg] at
  ``epoch`` (MJD, TDB). Only bound orbits (``e < 1``) are supported; planets' perturbations are ignored.
* Observation times (visit MJDs) are TAI. They become TDB by adding TT − TAI = 32.184 s (TDB − TT is under
  2 ms); sidereal time uses UT1 ≈ UTC = TAI − 37 s.
* :meth:`Orbit.radec` gives *astrometric* positions, comparable with a star catalogue: one light-time
  iteration, no aberration or light deflection, seen from Rubin's site (``topocentric=True``, the default;
  the parallax of a main-belt object is a few arcsec) or from the Earth's centre.
* The Earth is the Earth–Moon barycentre from Standish's approximate Keplerian elements with secular
  rates (JPL, valid 1800–2050: ~20″ in longitude, i.e. ~1e-4 AU) minus the Moon's offset from a
  low-precision lunar theory (Astronomical Almanac; good to ~50 km). Absolute ephemerides are thus good
  to tens of arcsec; the simulator only needs them to be self-consistent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lsstpipe.sim.opsim import RUBIN_HEIGHT_M, RUBIN_LAT_DEG, local_sidereal_time_deg

#: Gaussian gravitational constant squared: GM_sun in AU³/day².
GM_SUN = 0.01720209895**2
AU_KM = 149597870.7
#: Speed of light in AU/day.
C_AU_PER_DAY = 299792.458 * 86400.0 / AU_KM
#: Obliquity of the ecliptic at J2000 (IAU 2006), degrees.
OBLIQUITY_J2000_DEG = 84381.406 / 3600.0
TT_MINUS_TAI_S = 32.184
#: Moon / (Earth + Moon) mass ratio.
MOON_MASS_FRACTION = 1.0 / 82.30057
_MJD_J2000 = 51544.5


def tai_to_tdb(mjd_tai):
    """MJD (TAI) → MJD (TDB), ignoring the periodic TDB − TT terms (< 2 ms)."""
    return np.asarray(mjd_tai, dtype=float) + TT_MINUS_TAI_S / 86400.0


def solve_kepler(mean_anomaly, e, tol: float = 1e-15, max_iter: int = 100) -> np.ndarray:
    """Eccentric anomaly E (radians) solving ``E − e sin E = M`` for elliptic orbits, vectorised.

    Safeguarded Newton iteration on the bracket ``|E − M| ≤ e`` (solved for ``M`` reduced to [0, π],
    then mapped back), so it converges for every ``0 ≤ e < 1``.

    Parameters
    ----------
    mean_anomaly : array_like
        Mean anomaly M in radians (any range).
    e : array_like
        Eccentricity, broadcastable against ``mean_anomaly``.

    Raises
    ------
    ValueError
        If any ``e`` is outside [0, 1) (parabolic and hyperbolic orbits are not supported).
    """
    m, e = np.broadcast_arrays(np.asarray(mean_anomaly, dtype=float), np.asarray(e, dtype=float))
    if np.any(~(e >= 0.0) | ~(e < 1.0)):
        bad = e[~((e >= 0.0) & (e < 1.0))].ravel()[0]
        raise ValueError(f"eccentricity {bad} is outside [0, 1); only elliptic orbits are supported")
    two_pi = 2.0 * np.pi
    turns = np.floor((m + np.pi) / two_pi)
    mr = m - turns * two_pi  # in [-pi, pi)
    sign = np.where(mr < 0.0, -1.0, 1.0)
    ma = np.abs(mr)
    lo, hi = ma.copy(), np.minimum(ma + e, np.pi)
    big = ma + 0.85 * e
    E = np.where(big < np.pi, big, np.pi)
    for _ in range(max_iter):
        f = E - e * np.sin(E) - ma
        lo = np.where(f < 0.0, E, lo)
        hi = np.where(f > 0.0, E, hi)
        step = f / (1.0 - e * np.cos(E))
        new = E - step
        outside = (new <= lo) | (new >= hi) | ~np.isfinite(new)
        new = np.where(outside, 0.5 * (lo + hi), new)
        done = np.abs(new - E) <= tol * (1.0 + np.abs(E))
        E = new
        if np.all(done):
            break
    return sign * E + turns * two_pi


def elements_to_state(a, e, inc, node, arg_peri, mean_anomaly, gm: float = GM_SUN):
    """Heliocentric position [AU] and velocity [AU/day] from Keplerian elements (angles in degrees).

    Broadcasts over every element; returns two arrays of shape ``(3, ...)``.
    """
    a, e, inc, node, w, m = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in
                                                  (a, e, inc, node, arg_peri, mean_anomaly)))  # fmt: skip
    if np.any(~(a > 0.0)):
        raise ValueError("semi-major axis must be positive (bound orbit) for every object")
    big_e = solve_kepler(np.deg2rad(m), e)
    cos_e, sin_e = np.cos(big_e), np.sin(big_e)
    b = np.sqrt(1.0 - e * e)
    n = np.sqrt(gm / a**3)
    x, y = a * (cos_e - e), a * b * sin_e
    denom = 1.0 - e * cos_e
    vx, vy = -a * n * sin_e / denom, a * n * b * cos_e / denom
    p, q = _perifocal_axes(inc, node, w)
    return p * x + q * y, p * vx + q * vy


def _perifocal_axes(inc, node, arg_peri) -> tuple[np.ndarray, np.ndarray]:
    i, o, w = np.deg2rad(inc), np.deg2rad(node), np.deg2rad(arg_peri)
    co, so, ci, si, cw, sw = np.cos(o), np.sin(o), np.cos(i), np.sin(i), np.cos(w), np.sin(w)
    p = np.stack([co * cw - so * sw * ci, so * cw + co * sw * ci, sw * si])
    q = np.stack([-co * sw - so * cw * ci, -so * sw + co * cw * ci, cw * si])
    return p, q


def state_to_elements(r, v, gm: float = GM_SUN) -> tuple[float, float, float, float, float, float]:
    """Keplerian elements ``(a, e, inc, node, arg_peri, ma)`` (angles in degrees) of one state vector.

    Where the node is undefined (``inc`` ≈ 0) ``node`` is 0; where the perihelion is undefined (``e`` ≈ 0)
    ``arg_peri`` is 0 and the mean anomaly is counted from the node.

    Raises
    ------
    ValueError
        If the state is not a bound, non-degenerate orbit.
    """
    r, v = np.asarray(r, dtype=float), np.asarray(v, dtype=float)
    rn = float(np.linalg.norm(r))
    h = np.cross(r, v)
    hn = float(np.linalg.norm(h))
    if rn == 0.0 or hn <= 1e-14 * rn * max(float(np.linalg.norm(v)), 1e-300):
        raise ValueError("state vector has no angular momentum (radial or zero motion); no orbit fits it")
    energy = 0.5 * float(v @ v) - gm / rn
    if energy >= 0.0:
        raise ValueError(f"state vector is unbound (specific energy {energy:.3e} AU²/day² ≥ 0)")
    a = -gm / (2.0 * energy)
    e_vec = np.cross(v, h) / gm - r / rn
    e = float(np.linalg.norm(e_vec))
    h_hat = h / hn
    inc = math.degrees(math.acos(max(-1.0, min(1.0, float(h_hat[2])))))
    n_vec = np.array([-h[1], h[0], 0.0])
    n_hat = n_vec / np.linalg.norm(n_vec) if np.linalg.norm(n_vec) > 1e-12 * hn else np.array([1.0, 0.0, 0.0])
    q_hat = np.cross(h_hat, n_hat)
    node = math.degrees(math.atan2(n_hat[1], n_hat[0])) % 360.0
    arg_lat = math.atan2(float(r @ q_hat), float(r @ n_hat))
    w = math.atan2(float(e_vec @ q_hat), float(e_vec @ n_hat)) if e > 1e-12 else 0.0
    nu = arg_lat - w
    big_e = math.atan2(math.sqrt(1.0 - e * e) * math.sin(nu), e + math.cos(nu))
    ma = math.degrees(big_e - e * math.sin(big_e)) % 360.0
    return a, e, inc, node, math.degrees(w) % 360.0, ma


def ecliptic_to_equatorial(x: np.ndarray) -> np.ndarray:
    eps = math.radians(OBLIQUITY_J2000_DEG)
    c, s = math.cos(eps), math.sin(eps)
    return np.stack([x[0], c * x[1] - s * x[2], s * x[1] + c * x[2]])


def equatorial_to_ecliptic(x: np.ndarray) -> np.ndarray:
    eps = math.radians(OBLIQUITY_J2000_DEG)
    c, s = math.cos(eps), math.sin(eps)
    return np.stack([x[0], c * x[1] + s * x[2], -s * x[1] + c * x[2]])


def _moon_geocentric(mjd_tdb: np.ndarray) -> np.ndarray:
    """Low-precision geocentric Moon (AU, ecliptic J2000): Astronomical Almanac, ~0.3° and ~0.2 %."""
    t = (mjd_tdb - _MJD_J2000) / 36525.0

    def s(a, b):
        return np.sin(np.deg2rad(a + b * t))

    def c(a, b):
        return np.cos(np.deg2rad(a + b * t))

    lon = (218.32 + 481267.881 * t + 6.29 * s(135.0, 477198.87) - 1.27 * s(259.3, -413335.36)
           + 0.66 * s(235.7, 890534.22) + 0.21 * s(269.9, 954397.74) - 0.19 * s(357.5, 35999.05)
           - 0.11 * s(186.5, 966404.03))  # fmt: skip
    lon = lon - 1.396971 * t  # ecliptic of date → J2000 (general precession in longitude)
    lat = (5.13 * s(93.3, 483202.02) + 0.28 * s(228.2, 960400.89) - 0.28 * s(318.3, 6003.15)
           - 0.17 * s(217.6, -407332.21))  # fmt: skip
    parallax = (0.9508 + 0.0518 * c(135.0, 477198.87) + 0.0095 * c(259.3, -413335.36)
                + 0.0078 * c(235.7, 890534.22) + 0.0028 * c(269.9, 954397.74))  # fmt: skip
    dist = 6378.14 / np.sin(np.deg2rad(parallax)) / AU_KM
    lon, lat = np.deg2rad(lon), np.deg2rad(lat)
    return dist * np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)])


def earth_position(mjd_tdb) -> np.ndarray:
    """Heliocentric position of the Earth's centre (AU, ecliptic J2000), shape ``(3, ...)``; ~1e-4 AU.

    Standish's approximate elements of the Earth–Moon barycentre (valid 1800–2050) with the Moon's
    offset removed (see the module docstring).
    """
    mjd = np.asarray(mjd_tdb, dtype=float)
    t = (mjd - _MJD_J2000) / 36525.0
    a = 1.00000261 + 0.00000562 * t
    e = 0.01671123 - 0.00004392 * t
    inc = -0.00001531 - 0.01294668 * t
    mean_lon = 100.46457166 + 35999.37244981 * t
    peri = 102.93768193 + 0.32327364 * t
    node = np.zeros_like(t)
    emb, _ = elements_to_state(a, e, inc, node, peri - node, mean_lon - peri)
    return emb - MOON_MASS_FRACTION * _moon_geocentric(mjd)


def observer_position(mjd_tai, topocentric: bool = True) -> np.ndarray:
    """Heliocentric position (AU, ecliptic J2000) of Rubin (or of the Earth's centre) at MJD (TAI)."""
    mjd_tai = np.asarray(mjd_tai, dtype=float)
    pos = earth_position(tai_to_tdb(mjd_tai))
    if not topocentric:
        return pos
    # WGS84 geodetic → geocentric, in the equator of date (precession since J2000 ignored: ~0.01″ here).
    a_km, f = 6378.137, 1.0 / 298.257223563
    e2 = f * (2.0 - f)
    lat = math.radians(RUBIN_LAT_DEG)
    n_km = a_km / math.sqrt(1.0 - e2 * math.sin(lat) ** 2)
    h_km = RUBIN_HEIGHT_M / 1000.0
    rho_xy, z = (n_km + h_km) * math.cos(lat), (n_km * (1.0 - e2) + h_km) * math.sin(lat)
    lst = np.deg2rad(local_sidereal_time_deg(mjd_tai))
    site = np.stack([rho_xy * np.cos(lst), rho_xy * np.sin(lst), np.full_like(lst, z)]) / AU_KM
    return pos + equatorial_to_ecliptic(site)


class Ephemeris(NamedTuple):
    """Astrometric ephemeris of an object: arrays over the requested times."""

    ra: np.ndarray
    """Right ascension, deg in [0, 360)."""
    dec: np.ndarray
    """Declination, deg."""
    delta: np.ndarray
    """Observer–object distance, AU."""
    r: np.ndarray
    """Sun–object distance, AU."""
    phase: np.ndarray
    """Phase angle Sun–object–observer, deg."""


@dataclass(frozen=True)
class Orbit:
    """A Solar System object on a heliocentric Keplerian orbit (elements in ecliptic J2000).

    Attributes
    ----------
    name : str
    a : float
        Semi-major axis, AU.
    e : float
        Eccentricity, in [0, 1).
    inc, node, arg_peri, ma : float
        Inclination, longitude of the ascending node, argument of perihelion and mean anomaly, deg.
    epoch : float
        Epoch of the elements, MJD (TDB).
    """

    name: str
    a: float
    e: float
    inc: float
    node: float
    arg_peri: float
    ma: float
    epoch: float

    def __post_init__(self) -> None:
        if not (self.a > 0.0 and 0.0 <= self.e < 1.0):
            raise ValueError(
                f"orbit {self.name!r}: a = {self.a} AU, e = {self.e} is not a bound elliptic orbit; "
                f"only 0 ≤ e < 1 with a > 0 is supported"
            )

    @classmethod
    def from_state(cls, name: str, r, v, epoch: float) -> Orbit:
        """The orbit through heliocentric position ``r`` [AU] with velocity ``v`` [AU/day] at ``epoch`` (TDB)."""
        return cls(name, *state_to_elements(r, v), epoch=float(epoch))

    @property
    def period_days(self) -> float:
        return 2.0 * math.pi * math.sqrt(self.a**3 / GM_SUN)

    def state(self, mjd_tdb) -> tuple[np.ndarray, np.ndarray]:
        """Heliocentric position [AU] and velocity [AU/day], shape ``(3, ...)``, at MJD (TDB)."""
        t = np.asarray(mjd_tdb, dtype=float)
        n_deg = math.degrees(math.sqrt(GM_SUN / self.a**3))
        m = self.ma + n_deg * (t - self.epoch)
        return elements_to_state(self.a, self.e, self.inc, self.node, self.arg_peri, m)

    def position(self, mjd_tdb) -> np.ndarray:
        """Heliocentric position [AU], shape ``(3, ...)``, at MJD (TDB)."""
        return self.state(mjd_tdb)[0]

    def radec(self, mjd, topocentric: bool = True) -> Ephemeris:
        """Astrometric RA/Dec, distances and phase angle seen from Rubin at visit times ``mjd`` (TAI)."""
        mjd = np.asarray(mjd, dtype=float)
        obs = observer_position(mjd, topocentric)
        t = tai_to_tdb(mjd)
        rho = self.position(t) - obs
        light_time = np.linalg.norm(rho, axis=0) / C_AU_PER_DAY
        pos = self.position(t - light_time)
        rho = pos - obs
        delta = np.linalg.norm(rho, axis=0)
        eq = ecliptic_to_equatorial(rho)
        ra = np.rad2deg(np.arctan2(eq[1], eq[0])) % 360.0
        dec = np.rad2deg(np.arcsin(np.clip(eq[2] / delta, -1.0, 1.0)))
        cross = np.linalg.norm(np.cross(pos, rho, axis=0), axis=0)
        phase = np.rad2deg(np.arctan2(cross, np.sum(pos * rho, axis=0)))
        return Ephemeris(ra, dec, delta, np.linalg.norm(pos, axis=0), phase)


def apparent_magnitude(H, G, r_helio, delta, phase_angle) -> np.ndarray:
    """Apparent magnitude in the IAU H, G system (Bowell et al. 1989).

    ``m = H + 5 log10(r Δ) − 2.5 log10((1 − G) Φ1 + G Φ2)`` with ``Φi = exp(−Ai tan(α/2)^Bi)``,
    A = (3.33, 1.87), B = (0.63, 1.22). Distances in AU, phase angle α in degrees; the magnitude is in the
    band of ``H`` (add a colour from :class:`Colours` for another band).
    """
    tan_half = np.tan(np.deg2rad(np.asarray(phase_angle, dtype=float)) / 2.0)
    phi1 = np.exp(-3.33 * tan_half**0.63)
    phi2 = np.exp(-1.87 * tan_half**1.22)
    G = np.asarray(G, dtype=float)
    return (np.asarray(H, dtype=float) + 5.0 * np.log10(np.asarray(r_helio) * np.asarray(delta))
            - 2.5 * np.log10((1.0 - G) * phi1 + G * phi2))  # fmt: skip


@dataclass(frozen=True)
class Colours:
    """Absolute magnitude in r, slope parameter and colours (band − r) of one object."""

    name: str
    H_r: float
    G: float
    u_r: float
    g_r: float
    i_r: float
    z_r: float
    y_r: float

    def colour(self, band: str) -> float:
        """``band − r`` (0 for r)."""
        if band == "r":
            return 0.0
        if band not in "ugizy" or len(band) != 1:
            raise ValueError(f"unknown band {band!r}; LSSTCam bands are u, g, r, i, z, y")
        return getattr(self, f"{band}_r")

    def H(self, band: str) -> float:
        """Absolute magnitude in ``band``."""
        return self.H_r + self.colour(band)


_DES_COLUMNS = ("a", "e", "inc", "node", "argPeri", "ma", "epochMJD_TDB", "FORMAT")
_COLOUR_COLUMNS = ("H_r", "GS", "u-r", "g-r", "i-r", "z-r", "y-r")


def _read_table(path: str | Path, required: tuple[str, ...], what: str) -> tuple[Path, list[str], list[list[str]]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"{what} file {path} is empty")
    header = lines[0]
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(
            f"{what} file {path} lacks the columns {', '.join(missing)} in its header line "
            f"({' '.join(header)}); expected: ObjID {' '.join(required)}"
        )
    for k, row in enumerate(lines[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}, data line {k}: {len(row)} fields where the header has {len(header)}")
    return path, header, lines[1:]


def read_des_orbits(path: str | Path) -> list[Orbit]:
    """Orbits from a whitespace-separated OpenOrb/Sorcha ``.des`` file of Keplerian elements.

    The header line names the columns ``ObjID a e inc node argPeri ma epochMJD_TDB FORMAT`` (the first
    column is the object id whatever its name); every row must have ``FORMAT`` = ``KEP``.
    """
    path, header, rows = _read_table(path, _DES_COLUMNS, "orbit")
    col = {name: header.index(name) for name in _DES_COLUMNS}
    orbits = []
    for row in rows:
        if row[col["FORMAT"]] != "KEP":
            raise ValueError(
                f"{path}: object {row[0]} has FORMAT {row[col['FORMAT']]}; only KEP (Keplerian a, e, i, Ω, ω, M) "
                f"is supported — convert COM/CART orbits to KEP first"
            )
        values = [float(row[col[c]]) for c in _DES_COLUMNS[:-1]]
        orbits.append(Orbit(row[0], *values))
    return orbits


def read_colours(path: str | Path) -> dict[str, Colours]:
    """Colours by object id from a Sorcha physical-parameters file (``ObjID H_r GS u-r g-r i-r z-r y-r``)."""
    path, header, rows = _read_table(path, _COLOUR_COLUMNS, "colour")
    idx = [header.index(c) for c in _COLOUR_COLUMNS]
    return {row[0]: Colours(row[0], *(float(row[i]) for i in idx)) for row in rows}


def orbit_through(
    ra: float, dec: float, mjd: float, rng: np.random.Generator, r_helio_au: tuple[float, float] = (2.1, 3.3),
    name: str = "", sigma_inc_deg: float = 8.0, topocentric: bool = True,
) -> Orbit:  # fmt: skip
    """A main-belt-like orbit whose object is seen at (ra, dec) at visit time ``mjd`` (TAI).

    The heliocentric distance is drawn uniformly in ``r_helio_au`` and the object placed on the line of
    sight at that distance (at the light-time-corrected emission time). The orbital plane contains the
    object and has its pole tilted from the ecliptic pole by about ``sigma_inc_deg`` (more where the line
    of sight is far from the ecliptic); the velocity is the circular speed along the plane, perturbed by
    4 % radially and tangentially (eccentricities ≈ 0.1). The object moves prograde, so near
    opposition it moves retrograde on the sky at ~0.2–0.3 deg/day.

    Parameters
    ----------
    ra, dec : float
        Position seen from the observer, degrees.
    mjd : float
        Visit time, MJD (TAI).
    rng : numpy.random.Generator
        Source of the random draws.
    r_helio_au : (float, float)
        Range of heliocentric distance; both above the Earth's distance from the Sun.
    name : str
        Name of the returned orbit.
    sigma_inc_deg : float
        Scale of the tilt of the orbital pole from the ecliptic pole.
    topocentric : bool
        Whether (ra, dec) is seen from Rubin's site (as :meth:`Orbit.radec` by default) or the geocentre.
    """
    lo, hi = r_helio_au
    if not 1.02 < lo <= hi:
        raise ValueError(
            f"r_helio_au {r_helio_au} must be an increasing range above 1.02 AU (outside the Earth's orbit)"
        )
    obs = observer_position(mjd, topocentric)
    ra_r, dec_r = math.radians(ra), math.radians(dec)
    u = equatorial_to_ecliptic(np.array([math.cos(dec_r) * math.cos(ra_r), math.cos(dec_r) * math.sin(ra_r),
                                          math.sin(dec_r)]))  # fmt: skip
    r_h = rng.uniform(lo, hi)
    ou = float(obs @ u)
    delta = -ou + math.sqrt(ou * ou - float(obs @ obs) + r_h * r_h)
    pos = obs + delta * u
    r_hat = pos / np.linalg.norm(pos)
    tilt, node = math.radians(abs(rng.normal(0.0, sigma_inc_deg))), rng.uniform(0.0, 2.0 * math.pi)
    pole = np.array([math.sin(tilt) * math.sin(node), -math.sin(tilt) * math.cos(node), math.cos(tilt)])
    pole = pole - (pole @ r_hat) * r_hat
    if np.linalg.norm(pole) < 1e-6:  # line of sight to the ecliptic pole: any plane through it
        pole = np.cross(r_hat, [1.0, 0.0, 0.0])
    pole /= np.linalg.norm(pole)
    along = np.cross(pole, r_hat)
    v_circ = math.sqrt(GM_SUN / r_h)
    vel = v_circ * ((1.0 + rng.normal(0.0, 0.04)) * along + rng.normal(0.0, 0.04) * r_hat)
    epoch = float(tai_to_tdb(mjd)) - delta / C_AU_PER_DAY
    return Orbit.from_state(name, pos, vel, epoch)
