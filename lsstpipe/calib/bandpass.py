"""Pre-DRP per-visit bandpasses: throughput curves from (simulated) EFD atmospheric telemetry.

Telemetry (:func:`simulate_efd_telemetry`)
------------------------------------------
Per visit: airmass (from the visit), precipitable water vapour ``pwv_mm``, aerosol optical depth at
500 nm ``aod_500`` and Ångström exponent ``angstrom``. Each night (``day_obs``) draws its own conditions
from a generator keyed by ``(seed, day_obs)`` only: PWV lognormal around 2.5 mm (Cerro Pachón's median,
×/÷ 1.8 night to night), AOD lognormal around 0.04 (×/÷ 1.6), the Ångström exponent normal 1.3 ± 0.3;
within the night they drift smoothly (a sinusoid in time of ±15 % for PWV, ±10 % for the AOD) with a
per-night period and phase. A visit's values therefore depend only on the seed, its night and its time,
never on which other visits are in the table.

Atmosphere (:func:`atmosphere_transmission`), a standard plane-parallel model
-----------------------------------------------------------------------------
``T_atm(λ) = exp(-X (τ_R + τ_A + τ_O2 + τ_O3 + τ_H2O))`` with ``X`` the airmass and λ in µm:

* Rayleigh: ``τ_R = 0.008569 λ⁻⁴ (1 + 0.0113 λ⁻² + 0.00013 λ⁻⁴) P / 1013.25 hPa`` (Hansen & Travis
  1974), ``P = 743 hPa`` at Cerro Pachón (2,663 m);
* aerosols: ``τ_A = aod_500 (λ / 0.5 µm)^-angstrom``;
* O2 (fixed): Gaussian optical-depth bands, A band 762 nm (peak τ 0.9, σ 3 nm), B band 688 nm (0.25,
  2.5 nm), γ band 629 nm (0.03, 2 nm);
* O3 (fixed, 300 DU): the Chappuis band, peak τ 0.032 at 602 nm (σ 55 nm), and the Huggins/Hartley UV
  cut-off, ``0.25 exp(-(λ - 0.32 µm) / 0.012 µm)``;
* H2O: Gaussian bands whose optical depth scales linearly with PWV (per mm: 0.009 at 723 nm, 0.025 at
  823 nm, 0.30 at 935 nm, 0.06 at 1,130 nm… see :data:`WATER_BANDS`). Real water lines saturate
  (a curve of growth closer to √PWV in the band cores); the linear form is what the issue asks for and
  keeps ``d T / d PWV`` simple.

Hardware (:func:`hardware_throughput`), smooth and documented rather than measured
----------------------------------------------------------------------------------
``filter × detector QE × optics``: the filter is a flat top of 0.95 between the LSST band edges
(:data:`BAND_EDGES_NM`) with ``tanh`` edges 4 nm wide; the QE is ``0.92`` times a blue roll-off
``1 - exp(-(λ - 300 nm) / 60 nm)`` and a red one ``1 / (1 + exp((λ - 1010 nm) / 25 nm))``; the optics are
three aluminium mirrors (0.92 each) and three lenses with coatings (0.98 each).

Output (:func:`make_bandpasses`), one version per run
-----------------------------------------------------
``REPO/calib/bandpass/{run_id}/`` holds ``telemetry.csv`` (the table above), ``bandpasses.fits`` and
``manifest.json``. ``bandpasses.fits``: HDU ``WAVELENGTH`` (float64 nm), HDU ``THROUGHPUT`` (one row per
visit: ``VISIT``, ``BAND``, ``MJD``, ``AIRMASS``, ``PWV_MM``, ``AOD_500``, ``ANGSTROM``, then the vectors
``ATMOSPHERE`` and ``TOTAL`` on the wavelength grid; ``TOTAL`` = atmosphere × hardware of the visit's
band), CHECKSUM/DATASUM with a fixed comment: the same inputs give the same bytes. A version directory is
written under a temporary name and renamed into place; an existing ``run_id`` is never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from lsstpipe import __version__
from lsstpipe.repo import Repository, read_csv, sha256_file, write_csv

__all__ = ["BAND_EDGES_NM", "DEFAULT_WAVELENGTHS", "TELEMETRY_COLUMNS", "WATER_BANDS", "atmosphere_transmission",
           "hardware_throughput", "make_bandpasses", "read_bandpasses", "simulate_efd_telemetry"]  # fmt: skip

#: LSST filter edges (nm, 50 % points) of the smooth filter model.
BAND_EDGES_NM = {
    "u": (320.0, 400.0), "g": (400.0, 552.0), "r": (552.0, 691.0),
    "i": (691.0, 818.0), "z": (818.0, 922.0), "y": (948.0, 1060.0),
}  # fmt: skip
#: Default wavelength grid, nm.
DEFAULT_WAVELENGTHS = np.arange(300.0, 1100.5, 1.0)
#: Columns of the telemetry table.
TELEMETRY_COLUMNS = ("visit", "day_obs", "mjd", "band", "airmass", "pwv_mm", "aod_500", "angstrom")
#: Water-vapour bands: (centre nm, sigma nm, optical depth per mm of PWV).
WATER_BANDS = ((723.0, 6.0, 0.009), (823.0, 8.0, 0.025), (935.0, 14.0, 0.30), (1130.0, 16.0, 0.06))
#: Oxygen bands: (centre nm, sigma nm, optical depth).
O2_BANDS = ((762.0, 3.0, 0.9), (688.0, 2.5, 0.25), (629.0, 2.0, 0.03))
PRESSURE_HPA = 743.0
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_CHECKSUM_COMMENT = "computed by lsstpipe.calib.bandpass"


def _visit_rows(visits: Sequence) -> list[dict]:
    rows = []
    for v in visits:
        if is_dataclass(v) and not isinstance(v, type):
            r: dict | None = asdict(v)
        else:
            r = dict(v) if isinstance(v, Mapping) else None
        if r is None:
            raise ValueError(f"visits must be VisitSpec objects or visits.csv rows (dicts), got {type(v).__name__}")
        missing = [k for k in ("visit", "day_obs", "mjd", "band", "airmass") if k not in r]
        if missing:
            raise ValueError(f"visit {r.get('visit', '?')} lacks {missing}; pass the rows of REPO/visits.csv")
        if r["band"] not in BAND_EDGES_NM:
            raise ValueError(f"visit {r['visit']}: unknown band {r['band']!r}; bands are {', '.join(BAND_EDGES_NM)}")
        if not (np.isfinite(float(r["airmass"])) and float(r["airmass"]) >= 1.0):
            raise ValueError(f"visit {r['visit']}: airmass must be finite and ≥ 1, got {r['airmass']}")
        rows.append(r)
    return rows


def simulate_efd_telemetry(visits: Sequence, seed: int) -> list[dict]:
    """Atmospheric telemetry per visit, as the EFD would give it (see the module docstring).

    Parameters
    ----------
    visits : sequence of VisitSpec or dict
        Visits (``visit``, ``day_obs``, ``mjd``, ``band``, ``airmass``), e.g. the rows of ``visits.csv``.
    seed : int
        Simulation seed; the same seed gives the same telemetry.

    Returns
    -------
    list of dict
        One row per visit, in the order given, with the keys :data:`TELEMETRY_COLUMNS`.
    """
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out = []
    nights: dict[int, tuple] = {}
    for r in _visit_rows(visits):
        night = int(r["day_obs"])
        if night not in nights:
            rng = np.random.default_rng([int(seed), 0xEFD, night])
            pwv = 2.5 * np.exp(np.log(1.8) * rng.standard_normal())
            aod = 0.04 * np.exp(np.log(1.6) * rng.standard_normal())
            alpha = float(np.clip(rng.normal(1.3, 0.3), 0.2, 2.5))
            period_h = rng.uniform(4.0, 12.0)
            phases = rng.uniform(0.0, 2 * np.pi, 2)
            nights[night] = (pwv, aod, alpha, period_h, phases)
        pwv, aod, alpha, period_h, phases = nights[night]
        t = 2 * np.pi * float(r["mjd"]) * 24.0 / period_h
        out.append({
            "visit": int(r["visit"]), "day_obs": night, "mjd": float(r["mjd"]), "band": str(r["band"]),
            "airmass": float(r["airmass"]),
            "pwv_mm": float(np.clip(pwv * (1.0 + 0.15 * np.sin(t + phases[0])), 0.2, 20.0)),
            "aod_500": float(np.clip(aod * (1.0 + 0.10 * np.sin(t + phases[1])), 0.002, 0.6)),
            "angstrom": alpha,
        })  # fmt: skip
    return out


def _wave_um(wavelengths: np.ndarray) -> np.ndarray:
    w = np.asarray(wavelengths, dtype=np.float64)
    if w.ndim != 1 or w.size < 2 or not np.all(np.isfinite(w)) or np.any(np.diff(w) <= 0):
        raise ValueError("wavelengths must be a 1-D increasing array of finite values in nm (≥ 2 of them)")
    if w[0] < 250.0 or w[-1] > 1200.0:
        raise ValueError(f"wavelengths must lie in 250-1200 nm (the model's range), got {w[0]}-{w[-1]} nm")
    return w / 1000.0


def _gauss_bands(lam_nm: np.ndarray, bands) -> np.ndarray:
    tau = np.zeros_like(lam_nm)
    for centre, sigma, depth in bands:
        tau += depth * np.exp(-0.5 * ((lam_nm - centre) / sigma) ** 2)
    return tau


def atmosphere_transmission(wavelengths: np.ndarray, airmass: float, pwv_mm: float, aod_500: float,
                            angstrom: float) -> np.ndarray:  # fmt: skip
    """Transmission of the atmosphere (module docstring) on ``wavelengths`` (nm); values in (0, 1]."""
    lam = _wave_um(wavelengths)
    if not (np.isfinite(airmass) and airmass >= 1.0):
        raise ValueError(f"airmass must be ≥ 1, got {airmass}")
    if not (pwv_mm >= 0 and aod_500 >= 0 and np.isfinite(pwv_mm) and np.isfinite(aod_500) and np.isfinite(angstrom)):
        raise ValueError(f"pwv_mm and aod_500 must be finite and ≥ 0, got {pwv_mm}, {aod_500}")
    nm = lam * 1000.0
    tau_r = 0.008569 * lam**-4 * (1 + 0.0113 * lam**-2 + 0.00013 * lam**-4) * PRESSURE_HPA / 1013.25
    tau_a = aod_500 * (lam / 0.5) ** -angstrom
    tau_o3 = 0.032 * np.exp(-0.5 * ((nm - 602.0) / 55.0) ** 2) + 0.25 * np.exp(-(lam - 0.32) / 0.012)
    tau = tau_r + tau_a + tau_o3 + _gauss_bands(nm, O2_BANDS) + pwv_mm * _gauss_bands(nm, WATER_BANDS)
    return np.exp(-airmass * tau)


def hardware_throughput(wavelengths: np.ndarray, band: str) -> np.ndarray:
    """Filter × QE × optics of ``band`` on ``wavelengths`` (nm), in [0, 1] (module docstring)."""
    if band not in BAND_EDGES_NM:
        raise ValueError(f"unknown band {band!r}; bands are {', '.join(BAND_EDGES_NM)}")
    nm = _wave_um(wavelengths) * 1000.0
    lo, hi = BAND_EDGES_NM[band]
    filt = 0.95 * 0.25 * (1 + np.tanh((nm - lo) / 4.0)) * (1 + np.tanh((hi - nm) / 4.0))
    qe = 0.92 * np.clip(1 - np.exp(-(nm - 300.0) / 60.0), 0.0, 1.0) / (1 + np.exp((nm - 1010.0) / 25.0))
    return filt * qe * 0.92**3 * 0.98**3


def _check_run_id(run_id: str) -> None:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(
            f"run_id {run_id!r} is not usable as a version name: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def make_bandpasses(repo: str | os.PathLike | Repository, run_id: str,
                    wavelengths: np.ndarray = DEFAULT_WAVELENGTHS, seed: int | None = None) -> Path:  # fmt: skip
    """Write this run's per-visit bandpasses into ``REPO/calib/bandpass/{run_id}/`` (module docstring).

    Parameters
    ----------
    repo : str, os.PathLike or Repository
        A repository with ``visits.csv`` (as ``lsstpipe simulate`` writes it).
    run_id : str
        The version name; a directory of that name must not exist yet.
    wavelengths : numpy.ndarray
        Increasing grid in nm within 250-1200 nm.
    seed : int, optional
        Telemetry seed; by default the repository's simulation seed.

    Returns
    -------
    pathlib.Path
        The version directory.

    Raises
    ------
    FileExistsError
        This ``run_id`` was already written (versions are never overwritten; pick a new run_id).
    FileNotFoundError
        No repository or no ``visits.csv``.
    ValueError
        A bad ``run_id``, wavelength grid or visit row.
    """
    repo = repo if isinstance(repo, Repository) else Repository(repo)
    _check_run_id(run_id)
    config = repo.read_config()
    visits_path = repo.root / "visits.csv"
    if not visits_path.is_file():
        raise FileNotFoundError(f"{visits_path} does not exist; simulate visits into {repo.root} first")
    base = repo.root / "calib" / "bandpass"
    final = base / run_id
    if final.exists():
        raise FileExistsError(
            f"bandpass version {run_id!r} already exists at {final}; versions are never overwritten — use a new run_id"
        )
    seed = int(config.get("seed", 0)) if seed is None else int(seed)
    lam = np.asarray(wavelengths, dtype=np.float64)
    _wave_um(lam)
    rows = sorted(simulate_efd_telemetry(read_csv(visits_path), seed), key=lambda r: r["visit"])
    if not rows:
        raise ValueError(f"{visits_path} lists no visits")
    hardware = {b: hardware_throughput(lam, b) for b in sorted({r["band"] for r in rows})}
    atm = np.array([atmosphere_transmission(lam, r["airmass"], r["pwv_mm"], r["aod_500"], r["angstrom"]) for r in rows])
    total = atm * np.array([hardware[r["band"]] for r in rows])
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{run_id}."))
    try:
        write_csv(tmp / "telemetry.csv", rows, TELEMETRY_COLUMNS)
        _write_fits(tmp / "bandpasses.fits", lam, rows, atm, total)
        manifest = {
            "run_id": run_id, "software": f"lsstpipe {__version__}", "seed": seed,
            "inputs": {"visits.csv": sha256_file(visits_path)}, "n_visits": len(rows),
            "model": "lsstpipe.calib.bandpass standard atmosphere v1", "pressure_hpa": PRESSURE_HPA,
            "wavelength_nm": [float(lam[0]), float(lam[-1]), int(lam.size)],
        }  # fmt: skip
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)  # atomic; fails if another run created ``final`` meanwhile
        except OSError:
            raise FileExistsError(
                f"bandpass version {run_id!r} appeared at {final} while writing; use a new run_id"
            ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_fits(path: Path, lam: np.ndarray, rows: list[dict], atm: np.ndarray, total: np.ndarray) -> None:
    n = lam.size
    cols = [
        fits.Column("VISIT", "K", array=[r["visit"] for r in rows]),
        fits.Column("BAND", "1A", array=[r["band"] for r in rows]),
        fits.Column("MJD", "D", array=[r["mjd"] for r in rows]),
        fits.Column("AIRMASS", "D", array=[r["airmass"] for r in rows]),
        fits.Column("PWV_MM", "D", array=[r["pwv_mm"] for r in rows]),
        fits.Column("AOD_500", "D", array=[r["aod_500"] for r in rows]),
        fits.Column("ANGSTROM", "D", array=[r["angstrom"] for r in rows]),
        fits.Column("ATMOSPHERE", f"{n}D", array=atm),
        fits.Column("TOTAL", f"{n}D", array=total),
    ]
    primary = fits.PrimaryHDU()
    primary.header["FORMAT"] = ("LSSTPIPE-BANDPASS", "per-visit throughput curves")
    primary.header["FMTVER"] = (1, "format version")
    hdul = fits.HDUList(
        [primary, fits.ImageHDU(lam, name="WAVELENGTH"), fits.BinTableHDU.from_columns(cols, name="THROUGHPUT")]
    )
    hdul["WAVELENGTH"].header["BUNIT"] = "nm"
    hdul.update_extend()
    for hdu in hdul:
        hdu.add_checksum(when=_CHECKSUM_COMMENT)
    hdul.writeto(path, checksum=False)


def read_bandpasses(version_dir: str | os.PathLike) -> tuple[np.ndarray, dict[int, dict]]:
    """Read a version written by :func:`make_bandpasses`.

    Returns
    -------
    wavelengths : numpy.ndarray
        nm.
    visits : dict of int to dict
        Visit → its telemetry and ``atmosphere`` and ``total`` throughput arrays.
    """
    path = Path(version_dir) / "bandpasses.fits"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run make_bandpasses for this version first")
    with fits.open(path, memmap=False, checksum=True) as hdul:
        if hdul[0].header.get("FORMAT") != "LSSTPIPE-BANDPASS":
            raise ValueError(f"{path} is not an lsstpipe bandpass file")
        lam = np.array(hdul["WAVELENGTH"].data, dtype=np.float64)
        t = hdul["THROUGHPUT"].data
        out = {}
        for k in range(len(t)):
            out[int(t["VISIT"][k])] = {
                "band": str(t["BAND"][k]), "mjd": float(t["MJD"][k]), "airmass": float(t["AIRMASS"][k]),
                "pwv_mm": float(t["PWV_MM"][k]), "aod_500": float(t["AOD_500"][k]),
                "angstrom": float(t["ANGSTROM"][k]), "atmosphere": np.array(t["ATMOSPHERE"][k], dtype=np.float64),
                "total": np.array(t["TOTAL"][k], dtype=np.float64),
            }  # fmt: skip
    return lam, out
