"""The simulated sky: stars (some variable), transients and their light curves, photometric conventions.

Static sources are generated per sky cell (``cell_deg`` × ``cell_deg`` in declination bands), each cell
seeded from (seed, cell), so the same patch of sky always holds the same stars whichever visits are
simulated, and templates, reference catalogues and science exposures agree.

Fluxes: a source of AB magnitude ``m`` in band ``b`` gives ``10**(-0.4 (m - ZP[b] + K[b] (X - 1)))``
electrons per second at airmass ``X`` before the flat field (``ZP``: LSST instrumental zero points for
1 e-/s; ``K``: extinction per airmass). Calibrated fluxes are in nJy (``m = 31.4 - 2.5 log10(nJy)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lsstpipe.pipelines.exposure import NJY_AB_ZP
from lsstpipe.sim.instrument import BANDS, stable_seed

#: Magnitude giving 1 electron per second at airmass 1 (LSST throughputs, SMTN-002).
ZERO_POINTS = {"u": 26.52, "g": 28.51, "r": 28.36, "i": 28.17, "z": 27.78, "y": 26.82}
#: Atmospheric extinction, magnitudes per airmass.
EXTINCTION = {"u": 0.47, "g": 0.21, "r": 0.13, "i": 0.10, "z": 0.07, "y": 0.18}

KIND_STAR, KIND_VARIABLE, KIND_TRANSIENT, KIND_SSO = "star", "variable", "transient", "sso"


def mag_to_njy(mag):
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - NJY_AB_ZP))


def njy_to_mag(flux):
    return NJY_AB_ZP - 2.5 * np.log10(np.asarray(flux, dtype=float))


def electrons_per_second(mag, band: str, airmass: float):
    """Electrons per second above the flat field for AB magnitude ``mag`` in ``band`` at ``airmass``."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - ZERO_POINTS[band] + EXTINCTION[band] * (airmass - 1.0)))


def exposure_zero_point(band: str, airmass: float, exptime: float) -> float:
    """Magnitude of a source giving one electron in the flat-fielded exposure."""
    return ZERO_POINTS[band] - EXTINCTION[band] * (airmass - 1.0) + 2.5 * np.log10(exptime)


def sky_electrons_per_pixel(sky_mag: float, band: str, pixel_scale: float) -> float:
    """Sky electrons per second per pixel for a sky brightness in mag/arcsec² (as seen, at the airmass)."""
    return float(electrons_per_second(sky_mag, band, 1.0) * pixel_scale**2)


@dataclass(frozen=True)
class SkyConfig:
    """Densities and ranges of the simulated sky (per square degree)."""

    star_density: float = 40000.0
    star_mag_range: tuple[float, float] = (14.0, 25.5)
    star_slope: float = 0.25
    variable_fraction: float = 0.03
    transient_density: float = 2000.0
    transient_peak_mag: tuple[float, float] = (18.0, 24.0)
    sso_density: float = 200.0
    sso_mag_range: tuple[float, float] = (19.0, 23.5)
    cell_deg: float = 0.1


@dataclass(frozen=True)
class StaticCatalog:
    """Stars (and variable stars) of a set of cells; magnitudes per band are mean magnitudes."""

    id: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    mags: dict
    variable: np.ndarray
    var_amp: np.ndarray
    var_period: np.ndarray
    var_phase: np.ndarray

    def __len__(self) -> int:
        return len(self.id)

    def flux_factor(self, mjd: float) -> np.ndarray:
        """Flux relative to the mean at ``mjd``: 1 for constant stars, ``1 + A sin(2π t/P + φ)`` for variables."""
        return 1.0 + self.variable * self.var_amp * np.sin(2 * np.pi * mjd / self.var_period + self.var_phase)


@dataclass(frozen=True)
class TransientCatalog:
    """New transients: fast rise, slower exponential decline, around a peak epoch."""

    id: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    peak_mjd: np.ndarray
    peak_mag: dict
    rise_days: np.ndarray
    fall_days: np.ndarray

    def __len__(self) -> int:
        return len(self.id)

    def flux_factor(self, mjd: float) -> np.ndarray:
        """Flux relative to peak at ``mjd`` (zero before the explosion, taken as 5 rise times before peak)."""
        dt = mjd - self.peak_mjd
        rise = np.where(dt > -5 * self.rise_days, np.exp(np.minimum(dt, 0.0) / self.rise_days), 0.0)
        return np.where(dt < 0, rise, np.exp(-np.maximum(dt, 0.0) / self.fall_days))


def _cell_ids(ra: float, dec: float, radius: float, cell: float) -> list[tuple[int, int]]:
    """Cells (dec band, ra index) intersecting a circle of ``radius`` deg around (ra, dec)."""
    ids = []
    nband = int(np.ceil(180.0 / cell))
    b0 = max(int(np.floor((dec - radius + 90.0) / cell)), 0)
    b1 = min(int(np.floor((dec + radius + 90.0) / cell)), nband - 1)
    for b in range(b0, b1 + 1):
        dlo = -90.0 + b * cell
        cosd = max(np.cos(np.deg2rad(min(abs(dlo), abs(dlo + cell)))), 1e-6)
        nra = max(int(np.floor(360.0 * cosd / cell)), 1)
        width = 360.0 / nra
        near_pole = abs(dec) + radius >= 89.0
        span = 180.0 if near_pole else min(radius / max(np.cos(np.deg2rad(min(abs(dec) + radius, 89.0))), 1e-6), 180.0)
        r0 = int(np.floor((ra - span) / width))
        r1 = int(np.floor((ra + span) / width))
        for r in sorted({k % nra for k in range(r0, r1 + 1)}):
            ids.append((b, r))
    return ids


def _cell_bounds(b: int, r: int, cell: float) -> tuple[float, float, float, float]:
    dlo = -90.0 + b * cell
    cosd = max(np.cos(np.deg2rad(min(abs(dlo), abs(dlo + cell)))), 1e-6)
    nra = max(int(np.floor(360.0 * cosd / cell)), 1)
    width = 360.0 / nra
    return r * width, (r + 1) * width, dlo, min(dlo + cell, 90.0)


def _uniform_in_cell(rng, n, bounds):
    ra0, ra1, d0, d1 = bounds
    s0, s1 = np.sin(np.deg2rad(d0)), np.sin(np.deg2rad(d1))
    dec = np.rad2deg(np.arcsin(rng.uniform(s0, s1, n)))
    ra = rng.uniform(ra0, ra1, n)
    area = (ra1 - ra0) * np.rad2deg(s1 - s0)
    return ra, dec, area


def _star_colours(rng, r, n):
    gr = rng.uniform(0.2, 1.4, n)
    mags = {"r": r, "g": r + gr}
    mags["u"] = mags["g"] + 0.9 + 1.1 * gr
    mags["i"] = r - 0.35 * gr
    mags["z"] = mags["i"] - 0.2 * gr
    mags["y"] = mags["z"] - 0.1 * gr
    return mags


def stars_in_cells(cells, seed: int, config: SkyConfig) -> StaticCatalog:
    """Stars of the given cells (ids stable per cell)."""
    parts = []
    for b, r in cells:
        rng = np.random.default_rng(stable_seed("stars", seed, config.cell_deg, b, r))
        bounds = _cell_bounds(b, r, config.cell_deg)
        _, _, area = _uniform_in_cell(rng, 0, bounds)
        n = int(rng.poisson(config.star_density * area))
        ra, dec, _ = _uniform_in_cell(rng, n, bounds)
        m0, m1 = config.star_mag_range
        a = config.star_slope
        u = rng.uniform(0, 1, n)
        rmag = np.log10(10 ** (a * m0) + u * (10 ** (a * m1) - 10 ** (a * m0))) / a
        mags = _star_colours(rng, rmag, n)
        var = rng.uniform(0, 1, n) < config.variable_fraction
        cid = (b * 100000 + r) * 100000
        parts.append(
            dict(
                id=cid + np.arange(n, dtype=np.int64), ra=ra % 360.0, dec=dec, mags=mags, variable=var,
                var_amp=np.where(var, rng.uniform(0.1, 0.6, n), 0.0),
                var_period=rng.uniform(0.1, 20.0, n), var_phase=rng.uniform(0, 2 * np.pi, n),
            )
        )  # fmt: skip
    return StaticCatalog(
        id=_cat(parts, "id", np.int64), ra=_cat(parts, "ra"), dec=_cat(parts, "dec"),
        mags={b: np.concatenate([p["mags"][b] for p in parts]) if parts else np.zeros(0) for b in BANDS},
        variable=_cat(parts, "variable", bool), var_amp=_cat(parts, "var_amp"),
        var_period=_cat(parts, "var_period"), var_phase=_cat(parts, "var_phase"),
    )  # fmt: skip


def transients_in_cells(cells, seed: int, config: SkyConfig, mjd_range: tuple[float, float]) -> TransientCatalog:
    """Transients of the given cells peaking within ``mjd_range`` widened by 30 days before and 5 after."""
    parts = []
    t0, t1 = mjd_range[0] - 30.0, mjd_range[1] + 5.0
    for b, r in cells:
        rng = np.random.default_rng(stable_seed("transients", seed, config.cell_deg, b, r, round(t0, 3)))
        bounds = _cell_bounds(b, r, config.cell_deg)
        _, _, area = _uniform_in_cell(rng, 0, bounds)
        n = int(rng.poisson(config.transient_density * area))
        ra, dec, _ = _uniform_in_cell(rng, n, bounds)
        peak_r = rng.uniform(*config.transient_peak_mag, n)
        colour = rng.uniform(-0.3, 0.5, n)
        mags = {bb: peak_r + colour * k for bb, k in zip(BANDS, (1.5, 0.6, 0.0, -0.3, -0.5, -0.6))}
        cid = 9_000_000_000_000 + (b * 100000 + r) * 10000
        parts.append(
            dict(
                id=cid + np.arange(n, dtype=np.int64), ra=ra % 360.0, dec=dec, peak_mjd=rng.uniform(t0, t1, n),
                mags=mags, rise=rng.uniform(2.0, 10.0, n), fall=rng.uniform(10.0, 40.0, n),
            )
        )  # fmt: skip
    return TransientCatalog(
        id=_cat(parts, "id", np.int64), ra=_cat(parts, "ra"), dec=_cat(parts, "dec"),
        peak_mjd=_cat(parts, "peak_mjd"),
        peak_mag={b: np.concatenate([p["mags"][b] for p in parts]) if parts else np.zeros(0) for b in BANDS},
        rise_days=_cat(parts, "rise"), fall_days=_cat(parts, "fall"),
    )  # fmt: skip


def _cat(parts, key, dtype=float):
    return np.concatenate([p[key] for p in parts]).astype(dtype) if parts else np.zeros(0, dtype)


def cells_around(ra: float, dec: float, radius: float, config: SkyConfig) -> list[tuple[int, int]]:
    """Sky cells within ``radius`` degrees of (ra, dec)."""
    return _cell_ids(ra % 360.0, dec, radius, config.cell_deg)
