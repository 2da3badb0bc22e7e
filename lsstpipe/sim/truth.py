"""Truth tables written next to the simulated raws.

Per exposure and detector, ``*_sources.csv`` has one row per injected source:

=============== ======================================================================================
id              stable source id (stars by sky cell, transients ≥ 9e12, asteroids ≥ 8e12)
kind            star, variable, transient or sso
ra, dec         degrees, at the exposure midpoint (asteroids: at the shutter opening)
x, y            0-based pixel position in the assembled image (asteroids: start of the trail)
x_end, y_end    end of the trail (equal to x, y for fixed sources)
mag             AB magnitude during the exposure
flux_e          electrons injected (before the flat field); all of it is inside the PSF stamp
flux_nJy        calibrated flux
fwhm_pix, e1, e2, beta  the PSF (elliptical Moffat) at the source
trail_length    pixels; trail_angle degrees from +x towards +y
on_detector     whether (x, y) lies on the CCD
=============== ======================================================================================

``truth/instrument/{DET}.fits`` holds what the instrument did to every raw of that detector: the flat
field per band (``FLAT_{band}``), ``DARK_RATE`` (e-/s), ``BIAS_COLS``/``BIAS_ROWS`` (the fixed bias
structure in ADU per amplifier, in raw-segment coordinates), ``CROSSTALK`` (16×16, source × victim,
HDU order), ``FRINGE`` (unit-rms pattern), ``DEFECTS`` (bad columns) and ``AMPS`` (gain, read noise,
bias level and saturation per amplifier).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from astropy.io import fits

from lsstpipe.sim import sky as skymod
from lsstpipe.sim.instrument import FRINGE_BANDS, DetectorSignature
from lsstpipe.sim.scene import PSF_BETA, Sources

SOURCE_COLUMNS = (
    "id", "kind", "ra", "dec", "x", "y", "x_end", "y_end", "mag", "flux_e", "flux_nJy", "fwhm_pix", "e1", "e2",
    "beta", "trail_length", "trail_angle", "on_detector",
)  # fmt: skip


def source_rows(sources: Sources, zero_point: float, shape: tuple[int, int] | None = None):
    """Rows of the per-exposure source truth table (see the module docstring)."""
    if sources is None:
        return []
    rows = []
    length, angle = sources.trail_length, sources.trail_angle
    njy = skymod.mag_to_njy(sources.mag) if len(sources) else np.zeros(0)
    for k in range(len(sources)):
        on = True
        if shape is not None:
            on = bool(0 <= sources.x[k] <= shape[1] - 1 and 0 <= sources.y[k] <= shape[0] - 1)
        rows.append({
            "id": int(sources.id[k]), "kind": str(sources.kind[k]), "ra": float(sources.ra[k]),
            "dec": float(sources.dec[k]), "x": float(sources.x[k]), "y": float(sources.y[k]),
            "x_end": float(sources.x_end[k]), "y_end": float(sources.y_end[k]), "mag": float(sources.mag[k]),
            "flux_e": float(sources.flux_e[k]), "flux_nJy": float(njy[k]), "fwhm_pix": float(sources.fwhm[k]),
            "e1": float(sources.e1[k]), "e2": float(sources.e2[k]), "beta": PSF_BETA,
            "trail_length": float(length[k]), "trail_angle": float(angle[k]), "on_detector": on,
        })  # fmt: skip
    return rows


def write_instrument_truth(path: Path, sig: DetectorSignature, bands: list[str]) -> None:
    """Write the detector's instrument signature (see the module docstring), atomically."""
    det = sig.detector
    hdus = [fits.PrimaryHDU()]
    hdus[0].header["DETNAME"] = det.name
    hdus[0].header["DETID"] = det.id
    hdus[0].header["VENDOR"] = det.vendor.name
    for band in bands:
        hdus.append(fits.ImageHDU(sig.flat(band), name=f"FLAT_{band}"))
    hdus.append(fits.ImageHDU(sig.dark_rate, name="DARK_RATE"))
    hdus.append(fits.ImageHDU(sig.col_pattern.astype(np.float32), name="BIAS_COLS"))
    hdus.append(fits.ImageHDU(sig.row_pattern.astype(np.float32), name="BIAS_ROWS"))
    hdus.append(fits.ImageHDU(sig.crosstalk, name="CROSSTALK"))
    if any(b in FRINGE_BANDS for b in bands):
        hdus.append(fits.ImageHDU(sig.fringe, name="FRINGE"))
    defects = sig.bad_columns
    hdus.append(fits.BinTableHDU.from_columns([
        fits.Column("x", "J", array=[d["x"] for d in defects]),
        fits.Column("y0", "J", array=[d["y0"] for d in defects]),
        fits.Column("y1", "J", array=[d["y1"] for d in defects]),
        fits.Column("kind", "8A", array=[d["kind"] for d in defects]),
    ], name="DEFECTS"))  # fmt: skip
    amps = det.amps
    hdus.append(fits.BinTableHDU.from_columns([
        fits.Column("name", "3A", array=[a.name for a in amps]),
        fits.Column("segment", "9A", array=[a.segment for a in amps]),
        fits.Column("gain", "D", array=[a.gain for a in amps]),
        fits.Column("read_noise_e", "D", array=[a.read_noise for a in amps]),
        fits.Column("bias_level", "D", array=[a.bias_level for a in amps]),
        fits.Column("saturation_adu", "D", array=[a.saturation for a in amps]),
    ], name="AMPS"))  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fits.HDUList(hdus).writeto(tmp, overwrite=True)
    os.replace(tmp, path)
