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

Per spot exposure (``IMGTYPE = 'SPOT'``, see :mod:`lsstpipe.sim.spots`) and detector,
``*_spots.csv`` has one row per projected spot:

=============== ======================================================================================
pattern         the exposure's spot pattern (which amplifiers are lit, :func:`~lsstpipe.sim.spots.lit_amplifiers`)
hdu, amp        the lit amplifier: HDU number (1-based, the crosstalk matrices' order) and name
x, y            0-based pixel position of the spot centre in the assembled image
flux_e          electrons injected (no flat field: the projector is calibrated in detected electrons)
fwhm_pix, beta  the spot's round Moffat profile
peak_e          central electrons per pixel of the profile before saturation and bleeding
full_well_e     the detector's full well
saturated       whether peak_e exceeds the full well (the spot then bleeds along its column)
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

from lsstpipe.camera import Detector
from lsstpipe.sim import sky as skymod
from lsstpipe.sim.instrument import FRINGE_BANDS, DetectorSignature
from lsstpipe.sim.scene import PSF_BETA, Sources
from lsstpipe.sim.spots import spot_peak_e

SOURCE_COLUMNS = (
    "id", "kind", "ra", "dec", "x", "y", "x_end", "y_end", "mag", "flux_e", "flux_nJy", "fwhm_pix", "e1", "e2",
    "beta", "trail_length", "trail_angle", "on_detector",
)  # fmt: skip


def source_rows(sources: Sources, shape: tuple[int, int] | None = None):
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


SPOT_COLUMNS = ("pattern", "hdu", "amp", "x", "y", "flux_e", "fwhm_pix", "beta", "peak_e", "full_well_e", "saturated")


def spot_rows(sources: Sources, detector: Detector, pattern: int) -> list[dict]:
    """Rows of the per-exposure spot truth table (see the module docstring); ``sources.id`` holds the
    lit amplifiers' HDU numbers, as :func:`lsstpipe.sim.spots.spot_sources` makes them."""
    by_hdu = {a.hdu: a for a in detector.amps}
    peak = spot_peak_e(sources.flux_e, sources.fwhm)
    full_well = float(detector.vendor.full_well_e)
    rows = []
    for k in range(len(sources)):
        hdu = int(sources.id[k])
        if hdu not in by_hdu:
            raise ValueError(f"spot {k} names amplifier HDU {hdu}, which {detector.name} does not have")
        rows.append({
            "pattern": int(pattern), "hdu": hdu, "amp": by_hdu[hdu].name, "x": float(sources.x[k]),
            "y": float(sources.y[k]), "flux_e": float(sources.flux_e[k]), "fwhm_pix": float(sources.fwhm[k]),
            "beta": PSF_BETA, "peak_e": float(peak[k]), "full_well_e": full_well, "saturated": bool(peak[k] > full_well),
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
