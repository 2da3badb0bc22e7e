"""Solar System objects for the simulator: asteroids on Keplerian orbits that cross the simulated fields.

Each field (a group of nearby pointings) gets a Poisson number of asteroids (``SkyConfig.sso_density``
per square degree of the field of view), each on a bound heliocentric orbit built to pass through a
random point of the field at the field's first visit, with an apparent r magnitude drawn from
``SkyConfig.sso_mag_range`` at that moment (which fixes H for G = 0.15). Rubin's Solar System test
orbits (the sorcha test set shipped in ``lsstpipe/data``) are added too and show up wherever their
ephemerides cross a detector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from kernels.astrometry import angular_separation_deg
from lsstpipe.repo import write_csv
from lsstpipe.sim import orbits
from lsstpipe.sim.instrument import stable_seed
from lsstpipe.sim.sky import SkyConfig

SSO_ID_BASE = 8_000_000_000_000
#: Typical S-type colours relative to r.
DEFAULT_COLOURS = {"u": 1.9, "g": 0.58, "r": 0.0, "i": -0.21, "z": -0.30, "y": -0.39}


@dataclass(frozen=True)
class SolarSystemObject:
    id: int
    name: str
    orbit: orbits.Orbit = field(repr=False)
    H: float
    G: float
    colours: dict = field(repr=False)

    def ephemeris(self, mjds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Apparent (ra, dec, r-band magnitude) seen from Rubin at each of ``mjds`` (TAI)."""
        ra, dec, delta, r, phase = self.orbit.radec(np.asarray(mjds, dtype=float))
        return ra, dec, orbits.apparent_magnitude(self.H, self.G, r, delta, phase)


class Ephemerides:
    """Positions and magnitudes of every object at a fixed set of times, computed once (one vectorised
    call per object), then looked up per exposure and detector."""

    def __init__(self, ssos: list[SolarSystemObject], mjds) -> None:
        self.ssos = ssos
        self.mjds = np.unique(np.asarray(mjds, dtype=float))
        n, m = len(ssos), len(self.mjds)
        self.ra, self.dec, self.mag_r = np.zeros((n, m)), np.zeros((n, m)), np.zeros((n, m))
        for k, s in enumerate(ssos):
            self.ra[k], self.dec[k], self.mag_r[k] = s.ephemeris(self.mjds)
        self.ids = np.array([s.id for s in ssos], dtype=np.int64)
        self.colours = {b: np.array([s.colours.get(b, 0.0) for s in ssos]) for b in "ugrizy"}

    def at(self, mjd: float, band: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ra, dec, magnitude in ``band``) of every object at ``mjd``, which must be one of the times."""
        j = int(np.searchsorted(self.mjds, mjd))
        if j >= len(self.mjds) or abs(self.mjds[j] - mjd) > 1e-9:
            raise KeyError(f"no ephemeris computed for MJD {mjd}; pass it to Ephemerides first")
        return self.ra[:, j], self.dec[:, j], self.mag_r[:, j] + self.colours[band]


def _test_set() -> list[SolarSystemObject]:
    data = resources.files("lsstpipe") / "data"
    try:
        elements = orbits.read_des_orbits(Path(str(data / "sspp_testset_orbits.des")))
        colours = orbits.read_colours(Path(str(data / "sspp_testset_colours.txt")))
    except FileNotFoundError as exc:  # a broken installation: the simulation would lack its known objects
        raise FileNotFoundError(
            f"the Solar System test set of the package is missing ({exc.filename}); "
            "reinstall lsstpipe (pip install -e .)"
        ) from exc
    out = []
    for k, orb in enumerate(elements):
        c = colours.get(orb.name)
        col = {b: c.colour(b) for b in "ugrizy"} if c else dict(DEFAULT_COLOURS)
        h, g = (c.H_r, c.G) if c else (18.0, 0.15)
        out.append(SolarSystemObject(SSO_ID_BASE + 900_000 + k, orb.name, orb, float(h), float(g), col))
    return out


def make_ssos(visits, camera, config: SkyConfig, seed: int) -> list[SolarSystemObject]:
    """Asteroids crossing the fields of ``visits`` (see the module docstring)."""
    from lsstpipe.sim.templates import TRACT_RADIUS_DEG, group_fields

    fields = group_fields(visits, TRACT_RADIUS_DEG)
    out: list[SolarSystemObject] = []
    for f_idx, (fra, fdec) in enumerate(fields):
        members = [v for v in visits if _near(v, fra, fdec, TRACT_RADIUS_DEG)]
        first = min(members, key=lambda v: v.mjd)
        # The disc that holds every pointing of the field, with the camera's field of view around each.
        radius = camera.field_radius_deg + max(_sep_deg(v, fra, fdec) for v in members)
        rng = np.random.default_rng(stable_seed("sso", seed, camera.name, f_idx, fra, fdec))
        area = np.pi * radius**2
        n = int(rng.poisson(config.sso_density * area))
        for k in range(n):
            # Uniform in the disc of the field, by offsets on the tangent plane.
            rr = radius * np.sqrt(rng.uniform())
            th = rng.uniform(0, 2 * np.pi)
            dec = fdec + rr * np.sin(th)
            ra = fra + rr * np.cos(th) / max(np.cos(np.deg2rad(dec)), 1e-3)
            orb = orbits.orbit_through(ra % 360.0, float(np.clip(dec, -89.9, 89.9)), first.mjd, rng,
                                       name=f"sim{f_idx:02d}_{k:05d}")  # fmt: skip
            _, _, delta, r, phase = orb.radec(np.atleast_1d(first.mjd))
            m_target = rng.uniform(*config.sso_mag_range)
            g = 0.15
            h = m_target - float(np.asarray(orbits.apparent_magnitude(0.0, g, r, delta, phase)).ravel()[0])
            out.append(SolarSystemObject(SSO_ID_BASE + f_idx * 100_000 + k, orb.name, orb, h, g, dict(DEFAULT_COLOURS)))
    return out + _test_set()


def _sep_deg(v, ra, dec) -> float:
    return float(angular_separation_deg(v.ra, v.dec, ra, dec))


def _near(v, ra, dec, radius) -> bool:
    return _sep_deg(v, ra, dec) < radius


def write_sso_truth(path: Path, ssos: list[SolarSystemObject]) -> None:
    """Orbits (heliocentric ecliptic J2000 Keplerian elements), H, G and colours of every object."""
    rows = []
    for s in ssos:
        o = s.orbit
        el = {"a": o.a, "e": o.e, "inc": o.inc, "node": o.node, "arg_peri": o.arg_peri, "mean_anomaly": o.ma,
              "epoch_mjd_tdb": o.epoch}  # fmt: skip
        rows.append({"id": s.id, "name": s.name, **el, "H_r": s.H, "G": s.G,
                     **{f"{b}-r": s.colours[b] for b in "ugizy"}})  # fmt: skip
    cols = ["id", "name", "a", "e", "inc", "node", "arg_peri", "mean_anomaly", "epoch_mjd_tdb", "H_r", "G"] + [
        f"{b}-r" for b in "ugizy"
    ]
    write_csv(path, rows, cols)
