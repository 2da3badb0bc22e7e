"""One-to-one spatial association of sources with catalogue positions on the unit sphere.

Each source is matched to at most one target (a DIAObject, or a Solar System object's predicted position)
and each target to at most one source. A (source, target) pair is a candidate when their great-circle
separation is at most the target's match radius. Candidates are accepted greedily in the order

1. smallest separation first (nearest pairs are settled before farther ones),
2. at equal separation, the source with the higher S/N first,
3. then the lower source index, then the lower target index (a total order: the result is deterministic),

skipping a pair whose source or target is already taken. This is the standard greedy solution of the
assignment problem for well-separated fields; it differs from the global optimum only when two sources
compete for one target *and* the loser had no other candidate, in which case the nearer pair wins —
the behaviour the tie-break above documents.

Positions are unit vectors, so there is no RA 0/360 seam and the poles need no special case. Candidates
are found by sorting targets by declination and scanning the band ``|Δdec| ≤ r_max`` for each source (an
exact pre-filter: the angular separation is never smaller than ``|Δdec|``); separations come from the
chord length, ``θ = 2 asin(c / 2)``, accurate at all angles.
"""

from __future__ import annotations

import numpy as np

from kernels.config import njit
from kernels.sphere import unit_vectors as _unit

__all__ = ["associate"]

_ARCSEC = np.pi / (180.0 * 3600.0)


@njit
def _candidates(src_dec, src_xyz, tgt_dec_sorted, tgt_xyz, order, radius, rmax_deg, pi, pj, psep, fill):
    """Source-target pairs within the target's radius: their number, and (``fill``) the pairs themselves
    written into ``pi``, ``pj``, ``psep`` (call once to count, once to fill arrays of that size)."""
    n = 0
    for i in range(src_dec.size):
        lo = np.searchsorted(tgt_dec_sorted, src_dec[i] - rmax_deg, side="left")
        hi = np.searchsorted(tgt_dec_sorted, src_dec[i] + rmax_deg, side="right")
        for k in range(lo, hi):
            j = order[k]
            dx = src_xyz[i, 0] - tgt_xyz[j, 0]
            dy = src_xyz[i, 1] - tgt_xyz[j, 1]
            dz = src_xyz[i, 2] - tgt_xyz[j, 2]
            sep = 2.0 * np.arcsin(min(1.0, 0.5 * np.sqrt(dx * dx + dy * dy + dz * dz)))
            if sep <= radius[j]:
                if fill:
                    pi[n] = i
                    pj[n] = j
                    psep[n] = sep
                n += 1
    return n


@njit
def _greedy(pi, pj, psep, snr, n_src, n_tgt, match, sep_out):
    """Accept candidate pairs in (separation, -S/N, source, target) order, one-to-one."""
    n = pi.size
    keys = np.empty(n, np.int64)
    for k in range(n):
        keys[k] = k
    # Sort by the tuple key with a stable lexsort done as successive stable argsorts (least significant first).
    keys = keys[np.argsort(pj[keys], kind="mergesort")]
    keys = keys[np.argsort(pi[keys], kind="mergesort")]
    neg_snr = np.empty(n, np.float64)
    for k in range(n):
        neg_snr[k] = -snr[pi[keys[k]]]
    keys = keys[np.argsort(neg_snr, kind="mergesort")]
    seps = np.empty(n, np.float64)
    for k in range(n):
        seps[k] = psep[keys[k]]
    keys = keys[np.argsort(seps, kind="mergesort")]
    taken = np.zeros(n_tgt, np.bool_)
    for k in range(n):
        c = keys[k]
        i = pi[c]
        j = pj[c]
        if match[i] >= 0 or taken[j]:
            continue
        match[i] = j
        taken[j] = True
        sep_out[i] = psep[c]


def associate(src_ra, src_dec, src_snr, tgt_ra, tgt_dec, radius_arcsec):
    """Match sources one-to-one to targets within each target's radius (see the module docstring).

    Parameters
    ----------
    src_ra, src_dec : array_like of float, shape (n,)
        Source positions in degrees (any RA range; ``|dec| ≤ 90``).
    src_snr : array_like of float, shape (n,)
        Source S/N, used only to break exact separation ties (NaN counts as the lowest).
    tgt_ra, tgt_dec : array_like of float, shape (m,)
        Target positions in degrees.
    radius_arcsec : float or array_like of float, shape (m,)
        Match radius in arcseconds, one for all targets or one per target (> 0, finite).

    Returns
    -------
    match : numpy.ndarray of int64, shape (n,)
        Index of the matched target for each source, -1 if none.
    separation_arcsec : numpy.ndarray of float64, shape (n,)
        Separation of the accepted pair in arcseconds (NaN where unmatched).

    Raises
    ------
    ValueError
        Mismatched lengths, non-finite positions, ``|dec| > 90`` or a non-positive radius.
    """
    sra, sdec, ssnr = (
        np.ascontiguousarray(np.atleast_1d(np.asarray(a, np.float64))) for a in (src_ra, src_dec, src_snr)
    )
    tra, tdec = (np.ascontiguousarray(np.atleast_1d(np.asarray(a, np.float64))) for a in (tgt_ra, tgt_dec))
    if not (sra.ndim == sdec.ndim == ssnr.ndim == 1 and sra.size == sdec.size == ssnr.size):
        raise ValueError(
            f"source ra, dec and snr must be 1-d of one length, got {sra.shape}, {sdec.shape}, {ssnr.shape}"
        )
    if not (tra.ndim == tdec.ndim == 1 and tra.size == tdec.size):
        raise ValueError(f"target ra and dec must be 1-d of one length, got {tra.shape}, {tdec.shape}")
    for name, a in (("source ra", sra), ("source dec", sdec), ("target ra", tra), ("target dec", tdec)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} has NaN/inf values: drop rows without a sky position before associating")
    for name, d in (("source", sdec), ("target", tdec)):
        if np.any(np.abs(d) > 90.0):
            raise ValueError(f"{name} dec must lie in [-90, 90] degrees; are ra and dec swapped or in radians?")
    radius = np.asarray(radius_arcsec, np.float64)
    if radius.ndim == 0:
        radius = np.full(tra.size, float(radius))
    if radius.shape != tra.shape:
        raise ValueError(f"radius_arcsec must be a scalar or one per target ({tra.size}), got shape {radius.shape}")
    if radius.size and not (np.all(np.isfinite(radius)) and np.all(radius > 0)):
        raise ValueError("radius_arcsec must be finite and > 0")
    n, m = sra.size, tra.size
    match = np.full(n, -1, np.int64)
    sep = np.full(n, np.nan)
    if n == 0 or m == 0:
        return match, sep
    snr = np.where(np.isnan(ssnr), -np.inf, ssnr)
    sxyz, txyz = np.empty((n, 3)), np.empty((m, 3))
    _unit(sra, sdec, sxyz)
    _unit(tra, tdec, txyz)
    order = np.argsort(tdec, kind="mergesort")
    tdec_sorted = np.ascontiguousarray(tdec[order])
    rad = radius * _ARCSEC
    rmax_deg = float(np.rad2deg(rad.max())) * (1 + 1e-9) + 1e-12
    pi, pj, psep = np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
    count = _candidates(sdec, sxyz, tdec_sorted, txyz, order, rad, rmax_deg, pi, pj, psep, False)
    pi, pj, psep = np.empty(count, np.int64), np.empty(count, np.int64), np.empty(count, np.float64)
    _candidates(sdec, sxyz, tdec_sorted, txyz, order, rad, rmax_deg, pi, pj, psep, True)
    _greedy(pi, pj, psep, snr, n, m, match, sep)
    return match, sep / _ARCSEC
