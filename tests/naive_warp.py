"""Slow, obvious reference for :mod:`kernels.warp`: per-pixel loops, the Lanczos formula from ``np.sinc``."""

import math

import numpy as np


def lanczos3(d):
    d = np.asarray(d, float)
    return np.where(np.abs(d) < 3, np.sinc(d) * np.sinc(d / 3.0), 0.0)


def bilinear(grid, step, x, y):
    """Value and derivatives (d/dx, d/dy) of the bilinear interpolant of ``grid`` (nodes every ``step``)."""
    ncy, ncx = grid.shape
    i0 = min(int(x / step), ncx - 2)
    j0 = min(int(y / step), ncy - 2)
    fx, fy = x / step - i0, y / step - j0
    g00, g01, g10, g11 = grid[j0, i0], grid[j0, i0 + 1], grid[j0 + 1, i0], grid[j0 + 1, i0 + 1]
    v = (1 - fy) * ((1 - fx) * g00 + fx * g01) + fy * ((1 - fx) * g10 + fx * g11)
    ddx = ((1 - fy) * (g01 - g00) + fy * (g11 - g10)) / step
    ddy = ((1 - fx) * (g10 - g00) + fx * (g11 - g01)) / step
    return v, ddx, ddy


def warp(image, variance, mask, src_x, src_y, step, shape, conserve_flux=True, variance_mode="density"):
    """Lanczos-3 resampling as documented in :mod:`kernels.warp`, one target pixel at a time."""
    ny_s, nx_s = image.shape
    mask = np.zeros(image.shape, np.int64) if mask is None else np.asarray(mask, np.int64)
    out_i = np.full(shape, np.nan)
    out_v = np.full(shape, np.nan)
    out_m = np.full(shape, 2, np.int64)
    for y in range(shape[0]):
        for x in range(shape[1]):
            sx, dxdx, dxdy = bilinear(src_x, step, x, y)
            sy, dydx, dydy = bilinear(src_y, step, x, y)
            if not (math.isfinite(sx) and math.isfinite(sy)):
                continue
            ix, iy = math.floor(sx), math.floor(sy)
            if ix - 2 < 0 or iy - 2 < 0 or ix + 3 >= nx_s or iy + 3 >= ny_s:
                continue
            sl = (slice(iy - 2, iy + 4), slice(ix - 2, ix + 4))
            img, var, msk = image[sl].astype(float), variance[sl].astype(float), mask[sl]
            if not (np.isfinite(img).all() and np.isfinite(var).all()) or (msk & 2).any():
                continue
            wx = lanczos3(sx - np.arange(ix - 2, ix + 4))
            wy = lanczos3(sy - np.arange(iy - 2, iy + 4))
            wx, wy = wx / wx.sum(), wy / wy.sum()
            w = np.outer(wy, wx)
            value = (w * img).sum()
            if variance_mode == "pixel":
                v = (w * w * var).sum()
            else:
                tx, ty = sx - ix, sy - iy
                v = (1 - ty) * ((1 - tx) * variance[iy, ix] + tx * variance[iy, ix + 1]) + ty * (
                    (1 - tx) * variance[iy + 1, ix] + tx * variance[iy + 1, ix + 1]
                )
            if conserve_flux:
                jac = abs(dxdx * dydy - dxdy * dydx)
                value, v = value * jac, v * jac * jac
            out_i[y, x], out_v[y, x] = value, v
            out_m[y, x] = np.bitwise_or.reduce(msk.ravel()) & ~2
    return out_i, out_v, out_m
