"""Slow, obvious reference implementations of the kernels (loops and plain numpy)."""

import math

import numpy as np


def moffat_sources(shape, xs, ys, fluxes, fwhm, beta, e1, e2, radii, sub=3):
    """Pixel-by-pixel elliptical Moffat stamps, each normalised to its flux within its stamp."""
    image = np.zeros(shape)
    for x0, y0, f, r in zip(xs, ys, fluxes, radii):
        alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
        det = math.sqrt(1 - e1 * e1 - e2 * e2)
        qxx, qxy, qyy = (1 - e1) / det, -e2 / det, (1 + e1) / det
        cx, cy = math.floor(x0 + 0.5), math.floor(y0 + 0.5)
        stamp = {}
        for j in range(-r, r + 1):
            for i in range(-r, r + 1):
                xx, yy = i - (x0 - cx), j - (y0 - cy)
                if xx * xx + yy * yy > (r + 0.5) ** 2:
                    continue
                if xx * xx + yy * yy < (2 * alpha + 1.5) ** 2 and sub > 1:
                    pts = [(xx + (si + 0.5) / sub - 0.5, yy + (sj + 0.5) / sub - 0.5)
                           for sj in range(sub) for si in range(sub)]  # fmt: skip
                else:
                    pts = [(xx, yy)]
                v = np.mean([(1 + (qxx * x * x + 2 * qxy * x * y + qyy * y * y) / alpha**2) ** -beta for x, y in pts])
                stamp[(cy + j, cx + i)] = v
        total = sum(stamp.values())
        for (y, x), v in stamp.items():
            if 0 <= y < shape[0] and 0 <= x < shape[1]:
                image[y, x] += f * v / total
    return image


def compose_expectation(signal, flat, dark_rate, sky_grid, step, exptime, dark_time, fringe=None, fringe_amp=0.0):
    ny, nx = signal.shape
    gy, gx = sky_grid.shape
    fy = np.minimum(np.arange(ny) / step, gy - 1.000001)
    fx = np.minimum(np.arange(nx) / step, gx - 1.000001)
    j, i = fy.astype(int), fx.astype(int)
    ty, tx = (fy - j)[:, None], (fx - i)[None, :]
    g = sky_grid
    sky = (1 - ty) * ((1 - tx) * g[j][:, i] + tx * g[j][:, i + 1]) + ty * (
        (1 - tx) * g[j + 1][:, i] + tx * g[j + 1][:, i + 1]
    )
    sky = sky * exptime
    if fringe is not None:
        sky = sky + fringe_amp * sky * fringe
    return np.maximum((signal + sky) * flat + dark_rate * dark_time, 0.0)


def digitize(segs, bias, row_offsets, col_pattern, read_noise, noise, adc_max=2**18 - 1):
    v = (
        segs
        + bias[:, None, None]
        + row_offsets[:, :, None]
        + col_pattern[:, None, :]
        + read_noise[:, None, None] * noise
    )
    return np.floor(np.clip(v, 0, adc_max) + 0.5).astype(np.int32)


def apply_crosstalk(segs, matrix):
    return segs + np.einsum("ij,iyx->jyx", matrix - np.diag(np.diag(matrix)), segs.astype(np.float64))
