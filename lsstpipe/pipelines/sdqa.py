"""Science Data Quality Assessment metrics of one CCD, published later as DM telemetry.

:func:`ccd_sdqa` gathers, from the chain's intermediate results, the numbers an observer and the SDQA
system look at per CCD: seeing, sky background and noise, zero point, the number of PSF stars, the
astrometric scatter, the PSF model residual, the fraction of usable pixels, cosmic-ray pixels, template
coverage, the difference image's noise relative to its variance plane, and DIASource counts. Every value is
a plain float or int (NaN when the stage that measures it did not run), so the dictionary serializes as it is.
"""

from __future__ import annotations

import math

import numpy as np

from kernels.diffim import pull_quartiles
from lsstpipe.pipelines.exposure import Exposure, MaskBit

__all__ = ["SDQA_KEYS", "ccd_sdqa"]

#: Every key :func:`ccd_sdqa` returns.
SDQA_KEYS = (
    "seeing_arcsec", "psf_fwhm_pix", "background_level", "background_rms", "zero_point", "zero_point_err",
    "n_psf_stars", "n_refcat_matches", "astrometric_scatter_mas", "psf_residual_rms", "good_pixel_fraction",
    "n_cr_pixels", "template_coverage", "diff_noise_ratio", "n_dia_sources", "n_dia_negative", "n_dia_dipoles",
    "n_dia_trailed", "seconds",
)  # fmt: skip


def _f(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def ccd_sdqa(calexp: Exposure, char, diff, dia: np.ndarray, timings: dict) -> dict:
    """The SDQA metrics (:data:`SDQA_KEYS`) of one processed CCD."""
    m = dict(char.metrics) if char is not None else {}
    bad = int(MaskBit.NO_DATA | MaskBit.BAD | MaskBit.SAT)
    out = {k: _f(m.get(k)) for k in SDQA_KEYS[:10]}
    out["good_pixel_fraction"] = float(np.mean((calexp.mask & bad) == 0))
    n_cr = calexp.metadata.get("n_cr_pixels", [])
    out["n_cr_pixels"] = int(sum(n_cr)) if isinstance(n_cr, list | tuple) else int(n_cr)
    if diff is not None:
        out["template_coverage"] = _f(
            diff.metrics.get("template_coverage", np.mean((diff.mask & int(MaskBit.NO_DATA)) == 0))
        )
        # robust σ of the pulls: their interquartile range (np.percentile's, without its 0.2 s partition)
        q25, q75, n = pull_quartiles(diff.image, diff.variance, diff.mask, bad)
        out["diff_noise_ratio"] = float((q75 - q25) / 1.3489795003921634) if n else math.nan
    else:
        out["template_coverage"] = out["diff_noise_ratio"] = math.nan
    out["n_dia_sources"] = int(len(dia))
    out["n_dia_negative"] = int(np.sum(dia["is_negative"])) if len(dia) else 0
    out["n_dia_dipoles"] = int(np.sum(dia["is_dipole"])) if len(dia) else 0
    out["n_dia_trailed"] = int(np.sum(dia["is_trailed"])) if len(dia) else 0
    out["seconds"] = _f(timings.get("total"))
    return out
