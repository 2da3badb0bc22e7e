"""Score the per-CCD alert-production chain's DIASources against the simulator's truth.

The truth of a visit is the source table of its first snap (``truth/exposures/DAY/OBSID/OBSID_DET_sources.csv``):
transients (absent from the templates, which hold only the static sky) must appear in the difference
image with their calibrated flux (``flux_nJy``; the same in both snaps). Each transient's true S/N on the
difference is its true flux over the forced-photometry error at its true position on the difference image
(the noise the detection actually had to beat). A transient is found when a positive DIASource lies within
``match_radius`` pixels. False detections are DIASources farther than ``false_radius`` from every truth
source of any kind (stars, variables, transients, asteroid trails) — in a blank field, noise peaks.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from lsstpipe.pipelines.diasources import forced_photometry
from lsstpipe.pipelines.exposure import Exposure, MaskBit


def truth_sources(repo, obsid: str, detector: str) -> dict:
    (path,) = Path(repo).glob(f"truth/exposures/*/{obsid}/{obsid}_{detector}_sources.csv")
    rows = list(csv.DictReader(path.open()))
    out = {k: np.array([float(r[k]) for r in rows]) for k in ("x", "y", "x_end", "y_end", "flux_nJy", "mag")}
    out["kind"] = np.array([r["kind"] for r in rows])
    return out


def _segment_distance(px, py, x0, y0, x1, y1):
    """Distance of points (px, py) to each truth segment (x0, y0)-(x1, y1): ``(n_points, n_truth)``."""
    dx, dy = x1 - x0, y1 - y0
    L2 = np.maximum(dx * dx + dy * dy, 1e-12)
    t = np.clip(((px[:, None] - x0) * dx + (py[:, None] - y0) * dy) / L2, 0, 1)
    return np.hypot(px[:, None] - (x0 + t * dx), py[:, None] - (y0 + t * dy))


def score(result, repo, obsid: str, detector: str, match_radius: float = 2.0, false_radius: float = 6.0,
          edge: int = 20) -> dict:  # fmt: skip
    """Completeness per true-S/N bin, flux bias and false detections of one processed CCD."""
    truth = truth_sources(repo, obsid, detector)
    dia = result.dia_sources
    diff = result.difference
    ny, nx = result.calexp.shape
    tr = truth["kind"] == "transient"
    x, y, f = truth["x"][tr], truth["y"][tr], truth["flux_nJy"][tr]
    inside = (x > edge) & (x < nx - 1 - edge) & (y > edge) & (y < ny - 1 - edge)
    x, y, f = x[inside], y[inside], f[inside]
    bad = int(MaskBit.NO_DATA | MaskBit.BAD | MaskBit.SAT)
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    clean = (diff.mask[iy, ix] & bad) == 0
    x, y, f = x[clean], y[clean], f[clean]
    dexp = Exposure(diff.image, diff.variance, diff.mask)
    fwhm = float(diff.kernel_info.get("difference_psf_fwhm", result.sdqa["psf_fwhm_pix"]))
    _, err, ferr = forced_photometry(dexp, x, y, None, fwhm, result.characterization.zero_point)
    snr = f / err
    pos = dia[~dia["is_negative"]]
    if len(pos) and len(x):
        d = np.hypot(x[:, None] - pos["x"][None, :], y[:, None] - pos["y"][None, :])
        nearest = d.argmin(axis=1)
        found = d[np.arange(len(x)), nearest] <= match_radius
    else:
        nearest, found = np.zeros(len(x), int), np.zeros(len(x), bool)
    out = {"n_transients": int(len(x)), "snr": snr, "found": found}
    for lo, hi in ((10, np.inf), (5.5, 10), (5.5, np.inf)):
        sel = (snr >= lo) & (snr < hi)
        out[f"completeness_{lo}_{hi}"] = (float(found[sel].mean()) if sel.any() else np.nan, int(sel.sum()))
    bright = found & (snr >= 20)
    if bright.any():
        ratio = pos["psf_flux"][nearest[bright]] / f[bright]
        out["flux_ratio_median"] = float(np.median(ratio))
        out["flux_ratio_n"] = int(bright.sum())
    if len(dia):
        d = _segment_distance(dia["x"], dia["y"], truth["x"], truth["y"], truth["x_end"], truth["y_end"])
        out["n_false"] = int(np.sum(d.min(axis=1) > false_radius))
    else:
        out["n_false"] = 0
    return out
