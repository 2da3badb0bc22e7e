"""Slow, obvious references of the frame-combination kernels (kernels/combine.py): astropy and numpy."""

import numpy as np
from astropy.stats import mad_std, sigma_clip


def _clip_loop(v, nsigma, maxiter, stdfunc, noise_model):
    """The clipping loop written out: kept values shrink pass by pass; the result is every value within the
    last pass's bounds (astropy's final mask)."""
    kept = v
    lo = hi = None
    for it in range(maxiter):
        c = np.median(kept)
        if stdfunc == "model":
            s = np.sqrt(noise_model[0] + noise_model[1] * max(c, 0.0))
        else:
            s = mad_std(kept) if it == 0 else np.std(kept)
        lo, hi = c - nsigma * s, c + nsigma * s
        new = kept[(kept >= lo) & (kept <= hi)]
        if new.size == 0:
            return new
        if new.size == kept.size:
            break
        kept = new
    return v[(v >= lo) & (v <= hi)]


def clipped_mean(stack, nsigma=3.0, maxiter=5, stdfunc="std", noise_model=None):
    """astropy's sigma_clip (median centre) along the frame axis (or the loop written out for the 'mad_then_std'
    and 'model' scatters), then mean, variance of the mean, count."""
    data = np.asarray(stack, np.float64)
    data = np.where(np.isfinite(data), data, np.nan)
    std = np.std if stdfunc == "std" else mad_std
    ny, nx = data.shape[1:]
    value = np.full((ny, nx), np.nan)
    var = np.full((ny, nx), np.nan)
    n = np.zeros((ny, nx), np.int64)
    for y in range(ny):
        for x in range(nx):
            v = data[:, y, x]
            v = v[np.isfinite(v)]
            if v.size == 0:
                continue
            if stdfunc in ("std", "mad_std"):
                kept = sigma_clip(v, sigma=nsigma, maxiters=maxiter, cenfunc="median", stdfunc=std, masked=True)
                k = kept.compressed()
            else:
                k = _clip_loop(v, nsigma, maxiter, stdfunc, noise_model)
            if k.size == 0:
                continue
            n[y, x] = k.size
            value[y, x] = k.mean()
            if k.size >= 2:
                var[y, x] = k.var(ddof=1) / k.size
    return value, var, n


def median(stack):
    """numpy's nanmedian along the frame axis, π/2 × sample variance / n, count of finite values."""
    data = np.asarray(stack, np.float64)
    data = np.where(np.isfinite(data), data, np.nan)
    n = np.isfinite(data).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore", RuntimeWarning)
        value = np.nanmedian(data, axis=0)
        var = np.where(n >= 2, np.pi / 2 * np.nanvar(data, axis=0, ddof=1) / np.maximum(n, 1), np.nan)
    return value, var, n
