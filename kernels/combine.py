"""Combination of N frames into a master: sigma-clipped mean and median, streamed over blocks of rows.

A master calibration combines N overscan-corrected exposures pixel by pixel. The kernels here work on a
block of rows of every frame at a time (stacked frames-last, ``(rows, cols, n_frames)``, so that one
pixel's values are adjacent), so the caller never needs N full frames in memory:
:func:`combine_streaming` asks a reader for rows ``[r0, r1)`` of frame ``i`` and fills the whole combined
image block after block (an in-memory stack goes through :func:`combine_stack`, which uses the same core).

Per pixel, non-finite inputs (NaN, ±inf: saturated, masked or missing pixels) are ignored. The finite
values are sorted (N is small: tens of frames; up to 32 by rank counting, which has no data-dependent
branches, beyond by insertion), so every clipping pass keeps a contiguous range of the sorted values:

* ``clipped_mean``: as :func:`astropy.stats.sigma_clip` with ``cenfunc='median'`` — around the median of
  the kept values, reject values more than ``nsigma`` × their standard deviation (``stdfunc='std'``,
  population) or × 1.4826 × their median absolute deviation (``stdfunc='mad_std'``) away, or the MAD on the
  first pass and the standard deviation after it (``'mad_then_std'``), or the noise model
  ``sqrt(a + b × max(median, 0))`` when the noise of a frame is known (``'model'``: read noise and gain;
  the best choice for few frames); repeat until
  nothing changes or ``maxiter`` passes. The result is the mean of all values within the last pass's
  bounds (as astropy's mask); its variance is the
  sample variance of the kept values over their number (NaN where fewer than 2 remain).
* ``median``: the median of the finite values; variance ``π/2 × s² / n`` (the median's efficiency for
  Gaussian noise; NaN where fewer than 2).

Every method also returns the number of frames used per pixel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np

from kernels.arrays import readonly
from kernels.config import njit

__all__ = ["CombinedImage", "combine_stack", "combine_streaming", "METHODS", "STDFUNCS"]

#: Combination methods (name → code used by the kernels).
METHODS = {"clipped_mean": 0, "median": 1}
#: Scatter estimates of the clipped mean (name → code).
STDFUNCS = {"std": 0, "mad_std": 1, "mad_then_std": 2, "model": 3}
_MAD_TO_SIGMA = 1.482602218505602


# ---------------------------------------------------------------------------------------------------
# Serial cores
# ---------------------------------------------------------------------------------------------------


@njit
def _rank_sort(buf, n, tmp):
    """Sort ``buf[:n]`` by counting each value's rank: O(n²) comparisons but no data-dependent branches, which
    beats insertion sort's mispredicted branches for the few tens of frames of a calibration set."""
    for i in range(n):
        v = buf[i]
        r = 0
        for j in range(n):
            w = buf[j]
            r += (w < v) | ((w == v) & (j < i))
        tmp[r] = v
    for i in range(n):
        buf[i] = tmp[i]


@njit
def _insertion_sort(buf, n):
    for i in range(1, n):
        v = buf[i]
        j = i - 1
        while j >= 0 and buf[j] > v:
            buf[j + 1] = buf[j]
            j -= 1
        buf[j + 1] = v


@njit
def _sorted_median(buf, lo, hi):
    n = hi - lo
    m = lo + n // 2
    if n % 2 == 1:
        return buf[m]
    return 0.5 * (buf[m - 1] + buf[m])


@njit
def _mean_ss(buf, lo, hi):
    """Mean of ``buf[lo:hi]`` and the sum of squared deviations from it (two passes, stable)."""
    mean = 0.0
    for k in range(lo, hi):
        mean += buf[k]
    mean /= hi - lo
    ss = 0.0
    for k in range(lo, hi):
        d = buf[k] - mean
        ss += d * d
    return mean, ss


@njit
def _spread(buf, lo, hi, center, stdfunc, dev, tmp):
    """Standard deviation (population) or MAD-based sigma of ``buf[lo:hi]`` (sorted) about ``center``."""
    n = hi - lo
    if stdfunc == 0:
        return math.sqrt(_mean_ss(buf, lo, hi)[1] / n)
    for k in range(n):
        dev[k] = abs(buf[lo + k] - center)
    if n <= 32:
        _rank_sort(dev, n, tmp)
    else:
        _insertion_sort(dev, n)
    return _MAD_TO_SIGMA * _sorted_median(dev, 0, n)


@njit
def _combine_pixel(buf, n, method, nsigma, maxiter, stdfunc, na, nb, dev, tmp):
    """Combine the ``n`` finite values in ``buf`` (reordered): (value, variance of the value, n used)."""
    nan = np.nan
    if n == 0:
        return nan, nan, 0
    if n <= 32:
        _rank_sort(buf, n, tmp)
    else:
        _insertion_sort(buf, n)
    lo, hi = 0, n
    if method == 1:
        value = _sorted_median(buf, 0, n)
    else:
        bmin, bmax = -np.inf, np.inf
        for it in range(maxiter):
            center = _sorted_median(buf, lo, hi)
            if stdfunc == 3:
                cut = nsigma * math.sqrt(na + nb * max(center, 0.0))
            else:
                kind = stdfunc if stdfunc < 2 else (1 if it == 0 else 0)
                cut = nsigma * _spread(buf, lo, hi, center, kind, dev, tmp)
            bmin, bmax = center - cut, center + cut
            new_lo, new_hi = lo, hi
            while new_lo < new_hi and buf[new_lo] < bmin:
                new_lo += 1
            while new_hi > new_lo and buf[new_hi - 1] > bmax:
                new_hi -= 1
            if new_lo == new_hi:
                return nan, nan, 0  # everything clipped (e.g. two frames far apart under a noise model)
            if new_lo == lo and new_hi == hi:
                break
            lo, hi = new_lo, new_hi
        # As astropy: the result keeps every value within the last bounds (which may have widened again).
        lo, hi = 0, n
        while lo < hi and buf[lo] < bmin:
            lo += 1
        while hi > lo and buf[hi - 1] > bmax:
            hi -= 1
        if hi == lo:
            return nan, nan, 0
    used = hi - lo
    mean, ss = _mean_ss(buf, lo, hi)
    if method != 1:
        value = mean
    if used < 2:
        return value, nan, used
    var = ss / (used - 1) / used
    if method == 1:
        var *= 0.5 * math.pi
    return value, var, used


@njit
def _combine_row(block, y, method, nsigma, maxiter, stdfunc, na, nb, out_value, out_var, out_n, oy, buf, dev, tmp):
    nframes = block.shape[2]
    for x in range(block.shape[1]):
        n = 0
        for i in range(nframes):
            v = float(block[y, x, i])
            if math.isfinite(v):
                buf[n] = v
                n += 1
        value, var, used = _combine_pixel(buf, n, method, nsigma, maxiter, stdfunc, na, nb, dev, tmp)
        out_value[oy, x] = value
        out_var[oy, x] = var
        out_n[oy, x] = used


@njit
def _combine_block(block, method, nsigma, maxiter, stdfunc, na, nb, out_value, out_var, out_n, y0):
    """Combine a ``(rows, cols, n)`` block (frames last: one pixel's values are adjacent in memory) into rows
    ``y0 …`` of the outputs (serial)."""
    buf = np.empty(block.shape[2], np.float64)
    dev = np.empty(block.shape[2], np.float64)
    tmp = np.empty(block.shape[2], np.float64)
    for y in range(block.shape[0]):
        _combine_row(
            block, y, method, nsigma, maxiter, stdfunc, na, nb, out_value, out_var, out_n, y0 + y, buf, dev, tmp
        )


@njit(parallel=True)
def _combine_block_parallel(block, method, nsigma, maxiter, stdfunc, na, nb, out_value, out_var, out_n, y0):
    """:func:`_combine_block` with rows split between threads (per-row scratch)."""
    for y in numba.prange(block.shape[0]):
        buf = np.empty(block.shape[2], np.float64)
        dev = np.empty(block.shape[2], np.float64)
        tmp = np.empty(block.shape[2], np.float64)
        _combine_row(
            block, y, method, nsigma, maxiter, stdfunc, na, nb, out_value, out_var, out_n, y0 + y, buf, dev, tmp
        )


# ---------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CombinedImage:
    """A combined image with its per-pixel error and frame count.

    Attributes
    ----------
    image : numpy.ndarray
        float32 combined value (NaN where no frame had a finite value).
    variance : numpy.ndarray
        float32 variance of the combined value (NaN where fewer than 2 frames were used).
    n_used : numpy.ndarray
        int16 number of frames that went into each pixel.
    """

    image: np.ndarray
    variance: np.ndarray
    n_used: np.ndarray


def _check_params(method: str, nsigma: float, maxiter: int, stdfunc: str,
                  noise_model: tuple[float, float] | None) -> tuple[int, int, float, float]:  # fmt: skip
    if method not in METHODS:
        raise ValueError(f"unknown combination method {method!r}; use one of {', '.join(METHODS)}")
    if stdfunc not in STDFUNCS:
        raise ValueError(f"unknown stdfunc {stdfunc!r}; use one of {', '.join(STDFUNCS)}")
    if not (math.isfinite(nsigma) and nsigma > 0):
        raise ValueError(f"nsigma must be a positive number of standard deviations, got {nsigma}")
    if int(maxiter) < 1:
        raise ValueError(f"maxiter must be ≥ 1 clipping pass, got {maxiter}")
    if (stdfunc == "model") != (noise_model is not None):
        raise ValueError("give noise_model=(a, b) with stdfunc='model', and only then")
    na, nb = (0.0, 0.0) if noise_model is None else (float(noise_model[0]), float(noise_model[1]))
    if not (math.isfinite(na) and math.isfinite(nb) and na >= 0 and nb >= 0 and na + nb > 0):
        if noise_model is not None:
            raise ValueError(f"noise_model (a, b) must be finite, ≥ 0 and not both 0, got {noise_model}")
    return METHODS[method], STDFUNCS[stdfunc], na, nb


def _as_block(block: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(block)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if a.dtype.kind in "iu" or a.dtype.itemsize > 8 or a.dtype == np.float16:
        a = a.astype(np.float64)
    if not a.dtype.isnative or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))
    return readonly(a)


def combine_stack(stack: np.ndarray, method: str = "clipped_mean", *, nsigma: float = 3.0, maxiter: int = 5,
                  stdfunc: str = "std", noise_model: tuple[float, float] | None = None,
                  parallel: bool = False) -> CombinedImage:  # fmt: skip
    """Combine an in-memory stack of frames pixel by pixel.

    Parameters
    ----------
    stack : numpy.ndarray
        ``(n_frames, ny, nx)`` real values; non-finite values are ignored. Not modified.
    method : {'clipped_mean', 'median'}
        See the module docstring.
    nsigma : float
        Clipping threshold (``clipped_mean``).
    maxiter : int
        Largest number of clipping passes (``clipped_mean``).
    stdfunc : {'std', 'mad_std', 'mad_then_std', 'model'}
        Scatter used for clipping: the population standard deviation (as astropy's default), the
        normalised median absolute deviation (robust for few frames, where one outlier inflates the
        standard deviation so much that it is never clipped, but it also clips ~5 % of good values of 10
        frames at 3σ), or the MAD on the first pass and the standard deviation on the next ones (the gross
        outliers go first; good values clipped by the noisy MAD come back), or ``noise_model``.
    noise_model : tuple of float, optional
        ``(a, b)``: the variance of one frame's pixel is ``a + b × value`` (e.g. read noise² and 1/gain);
        required by, and only allowed with, ``stdfunc='model'``.
    parallel : bool
        Split rows between numba threads.

    Returns
    -------
    CombinedImage

    Raises
    ------
    ValueError
        A stack that is not 3-D with at least one frame, or a bad parameter.
    """
    a = np.asarray(stack)
    if a.ndim != 3 or a.shape[0] < 1:
        raise ValueError(f"stack must be (n_frames ≥ 1, ny, nx), got shape {a.shape}")
    return combine_streaming(lambda i, r0, r1: a[i, r0:r1], a.shape[0], a.shape[1:], method, nsigma=nsigma,
                             maxiter=maxiter, stdfunc=stdfunc, noise_model=noise_model, block_rows=max(1, a.shape[1]),
                             parallel=parallel)  # fmt: skip


def combine_streaming(read_rows: Callable[[int, int, int], np.ndarray], n_frames: int, shape: tuple[int, int],
                      method: str = "clipped_mean", *, nsigma: float = 3.0, maxiter: int = 5, stdfunc: str = "std",
                      noise_model: tuple[float, float] | None = None, block_rows: int = 64,
                      parallel: bool = False) -> CombinedImage:  # fmt: skip
    """Combine ``n_frames`` frames of ``shape`` that are read block of rows by block of rows.

    Only ``n_frames × block_rows`` rows are in memory at once: the frames can live in files (e.g.
    ``numpy.memmap`` scratch) and be much larger than memory together.

    Parameters
    ----------
    read_rows : callable
        ``read_rows(i, r0, r1)`` returns rows ``[r0, r1)`` of frame ``i`` as a ``(r1 - r0, nx)`` array.
    n_frames : int
        Number of frames (≥ 1).
    shape : tuple of int
        ``(ny, nx)`` of every frame.
    method, nsigma, maxiter, stdfunc, noise_model, parallel
        As in :func:`combine_stack`.
    block_rows : int
        Rows per block.

    Returns
    -------
    CombinedImage

    Raises
    ------
    ValueError
        A bad parameter, or a block of the wrong shape or type from ``read_rows``.
    """
    code, std_code, na, nb = _check_params(method, nsigma, maxiter, stdfunc, noise_model)
    if int(n_frames) < 1:
        raise ValueError(f"need at least one frame to combine, got {n_frames}")
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (ny ≥ 1, nx ≥ 1), got {shape}")
    if int(block_rows) < 1:
        raise ValueError(f"block_rows must be ≥ 1, got {block_rows}")
    ny, nx = int(shape[0]), int(shape[1])
    image = np.empty((ny, nx), np.float32)
    variance = np.empty((ny, nx), np.float32)
    n_used = np.empty((ny, nx), np.int16)
    kernel = _combine_block_parallel if parallel else _combine_block
    for r0 in range(0, ny, int(block_rows)):
        r1 = min(ny, r0 + int(block_rows))
        rows = []
        for i in range(int(n_frames)):
            b = np.asarray(read_rows(i, r0, r1))
            if b.shape != (r1 - r0, nx):
                raise ValueError(f"frame {i} rows {r0}:{r1} came back with shape {b.shape}, expected {(r1 - r0, nx)}")
            rows.append(b)
        block = _as_block(np.stack(rows, axis=-1), "frames")  # (rows, cols, frames)
        val = np.empty((r1 - r0, nx), np.float64)
        var = np.empty((r1 - r0, nx), np.float64)
        cnt = np.empty((r1 - r0, nx), np.int64)
        kernel(block, code, float(nsigma), int(maxiter), std_code, na, nb, val, var, cnt, 0)
        image[r0:r1] = val
        variance[r0:r1] = var
        n_used[r0:r1] = cnt
    return CombinedImage(image, variance, n_used)
