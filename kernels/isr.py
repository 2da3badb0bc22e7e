"""Instrument signature removal: overscan, bias, crosstalk, gain, dark, flat, assembly, variance and mask.

The raw of a CCD is ``(namp, rows, cols)`` integer segments in HDU order; every segment has the same
layout (data region, serial overscan). Each row gets a robust level per amplifier from its serial overscan
(:mod:`kernels.overscan`): the bias drifts from row to row, and the drift is shared by the data and the
overscan of that row, so a row-wise subtraction removes it. :func:`isr_ccd` measures these levels itself
where it reads each raw row (or takes them from :func:`~kernels.overscan.overscan_levels`, e.g. smoothed),
and does, in one pass over each raw row of all amplifiers (all amplifiers are read at the same instant, so
crosstalk couples pixels with the same raw ``(row, col)``):

1. overscan subtraction (the row level of that amplifier);
2. first-order crosstalk removal ``t_j = s_j - sum_i C[i, j] s_i`` on the overscan-subtracted signal
   (fused: a block of raw rows of all 16 amplifiers stays in cache; the same correction as
   :func:`kernels.crosstalk.remove_crosstalk`, which run separately costs a pass over the segments several
   times the price of the whole fused pass). With ``crosstalk_tolerance`` > 0 the varying part of a weak
   coupling from a faint row is skipped, within a bound on the error;
3. assembly: the amplifier's pixel is written at its place in the CCD (``bbox`` with its flips);
4. master bias subtraction (ADU, assembled frame: the 2-D structure left after overscan subtraction);
5. gain to electrons, dark subtraction ``dark_rate * dark_time``, flat division;
6. variance ``(max(e, 0) + read_noise_e**2 (1 + 1/n_overscan) + gain**2/12) / flat**2``, with ``e`` the
   electrons before dark subtraction (dark current is Poisson too), the noise of the row's overscan level
   and the ADC's rounding included;
7. mask: ``sat_bit`` where the raw count reaches the amplifier's saturation, ``nodata_bit`` where the
   result is not finite (NaN or non-positive flat, NaN calibrations), the image and variance set to NaN
   there.

Defects (bad columns, boxes) are ORed into the mask afterwards by :func:`mask_boxes`, which touches only
their pixels. Fringes are fitted and subtracted after ISR by :mod:`kernels.fringe`.

The fused pass (compiled, :mod:`kernels.isr_pass`) reads each raw pixel and each calibration pixel once and
writes each output pixel once: its floor is memory bandwidth (``benchmarks/isr.py``).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from kernels.arrays import readonly
from kernels.config import njit
from kernels.isr_pass import BLOCK_ROWS, isr_rows, isr_rows_parallel
from kernels.overscan import as_raw_counts, overscan_levels

__all__ = ["isr_ccd", "mask_boxes", "AmpLayout"]


class AmpLayout:
    """Where each amplifier's data lands in the assembled CCD (arrays in HDU order).

    Parameters
    ----------
    data_rows, data_cols : slice
        The data region of a raw segment (the same for every amplifier).
    origins : sequence of (y0, x0)
        Lower corner of each amplifier's box in the assembled image (``AmpInfo.bbox[0]``, ``bbox[2]``).
    flip_x, flip_y : sequence of bool
        ``AmpInfo.flip_x``/``flip_y``: raw row ``y`` lands at ``y0 + y`` when ``flip_y`` else at
        ``y0 + h - 1 - y``; raw column ``x`` at ``x0 + w - 1 - x`` when ``flip_x`` else ``x0 + x`` (the
        convention of :func:`lsstpipe.isr.assembly.assemble_ccd`).
    shape : (ny, nx)
        The assembled image shape.
    """

    def __init__(self, data_rows: slice, data_cols: slice, origins, flip_x, flip_y, shape) -> None:
        self.data_rows = data_rows
        self.data_cols = data_cols
        self.oy0 = np.array([o[0] for o in origins], np.int64)
        self.ox0 = np.array([o[1] for o in origins], np.int64)
        self.flip_x = np.array(flip_x, np.bool_)
        self.flip_y = np.array(flip_y, np.bool_)
        self.shape = (int(shape[0]), int(shape[1]))
        if not (len(self.oy0) == len(self.flip_x) == len(self.flip_y)):
            raise ValueError("origins, flip_x and flip_y must have one entry per amplifier")


def _calib(name: str, a, shape) -> np.ndarray | None:
    if a is None:
        return None
    a = np.asarray(a)
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}; the assembled CCD is {shape}")
    if a.dtype != np.float32 or not a.flags.c_contiguous or not a.dtype.isnative:
        a = np.ascontiguousarray(a, dtype=np.float32)
    return readonly(a)


def _per_amp(name: str, v, namp: int) -> np.ndarray:
    v = np.asarray(v, np.float64)
    if v.shape != (namp,):
        raise ValueError(f"{name} needs one value per amplifier ({namp}), got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} has NaN or infinite values; check the amplifier table")
    return v


def isr_ccd(raw, layout: AmpLayout, oscan, gains, read_noise_e, saturation, *, bias=None, dark=None, flat=None,
            crosstalk=None, crosstalk_tolerance: float = 0.0, dark_time: float = 0.0, sat_bit: int = 1,
            nodata_bit: int = 2, oscan_noise_rows: float = 0.0, oscan_nsigma: float = 3.0, levels_out=None,
            parallel: bool = False, out=None):  # fmt: skip
    """Fused ISR of a CCD: raw integer segments → assembled image, variance and mask.

    Parameters
    ----------
    raw : numpy.ndarray
        Integer ``(namp, raw_rows, raw_cols)`` segments in HDU order. Not modified.
    layout : AmpLayout
        Data region of a segment and each amplifier's place in the assembled image.
    oscan : numpy.ndarray or slice
        ``(namp, data_rows)`` overscan level per row, ADU (:func:`~kernels.overscan.overscan_levels`); or
        the serial overscan columns of a segment (its rows are the data rows), whose level the pass
        measures row by row where it reads the row anyway: the levels of ``overscan_levels(raw,
        layout.data_rows, oscan, oscan_nsigma)`` to the bit, without that function's own pass over the raw
        (which costs as much as reading all of it).
    gains, read_noise_e, saturation : array_like
        Per amplifier: e-/ADU, read noise in electrons, saturation in raw ADU (``raw >= saturation``).
    bias : numpy.ndarray, optional
        Master bias in ADU after overscan subtraction, assembled ``(ny, nx)``.
    dark : numpy.ndarray, optional
        Dark current in e-/s, assembled; ``dark * dark_time`` is subtracted.
    flat : numpy.ndarray, optional
        Relative response, assembled; pixels with a non-positive or NaN flat become NO_DATA.
    crosstalk : numpy.ndarray, optional
        ``(namp, namp)`` coefficients, source × victim (HDU order); the diagonal is ignored.
    crosstalk_tolerance : float
        Largest error in ADU allowed in any pixel's crosstalk correction. Each source row is split into its
        mid-range (always corrected) and the rest, bounded by the coupling times the row's half-range; the
        rest goes in for the couplings with the largest bounds until the bounds of the others add up to the
        tolerance at most. On an LSSTCam sky row all of them add up to a few hundredths of an ADU, so a
        victim row away from bright stars costs no more than without crosstalk. 0 (the default) corrects
        every coupling exactly.
    dark_time : float
        Seconds of dark current accumulation.
    sat_bit, nodata_bit : int
        Mask bits for saturated pixels and for pixels without a valid value.
    oscan_noise_rows : float
        Number of overscan pixels averaged into each row's level (columns × rows of smoothing): adds
        ``read_noise**2 / oscan_noise_rows`` to the variance (0: ignore).
    oscan_nsigma : float
        Clipping of the measured levels (``oscan`` given as columns), in robust standard deviations.
    levels_out : numpy.ndarray, optional
        float64 ``(namp, data_rows)``: receives the overscan levels used (measured or given; the serial pass
        measures straight into it when it is C-contiguous and writeable).
    parallel : bool
        Split rows between threads.
    out : tuple of numpy.ndarray, optional
        ``(image, variance, mask)`` to fill: float32, float32, int32, C-contiguous, shape ``layout.shape``.

    Returns
    -------
    image, variance, mask : numpy.ndarray
        float32 electrons (flat-fielded), float32 electrons², int32 bit mask, assembled.
    """
    raw = as_raw_counts(raw)
    namp = raw.shape[0]
    if len(layout.oy0) != namp:
        raise ValueError(f"layout has {len(layout.oy0)} amplifiers, raw has {namp}")
    dr0, dr1, _ = layout.data_rows.indices(raw.shape[1])
    dc0, dc1, _ = layout.data_cols.indices(raw.shape[2])
    h, w = dr1 - dr0, dc1 - dc0
    ny, nx = layout.shape
    if h <= 0 or w <= 0:
        raise ValueError(f"data region rows {layout.data_rows}, cols {layout.data_cols} is empty")
    for a in range(namp):
        if not (0 <= layout.oy0[a] and layout.oy0[a] + h <= ny and 0 <= layout.ox0[a] and layout.ox0[a] + w <= nx):
            raise ValueError(f"amplifier {a} ({h}×{w} at {layout.oy0[a]}, {layout.ox0[a]}) lies outside {ny}×{nx}")
    if levels_out is not None and (levels_out.shape != (namp, h) or levels_out.dtype != np.float64):
        raise ValueError(f"levels_out must be a float64 array of shape {(namp, h)}, got {levels_out.dtype} "
                         f"{levels_out.shape}")  # fmt: skip
    measure = isinstance(oscan, slice)
    oc0 = oc1 = 0
    if measure:
        oc0, oc1, step = oscan.indices(raw.shape[2])
        if oc1 <= oc0 or step != 1:
            raise ValueError(f"overscan columns {oscan} select no contiguous columns of segments {raw.shape[1:]}")
        if not oscan_nsigma > 0:
            raise ValueError(f"oscan_nsigma must be positive, got {oscan_nsigma}")
        if parallel:  # threads split the rows; a row's level depends on the row before it
            levels = overscan_levels(raw, layout.data_rows, oscan, oscan_nsigma, 0, parallel=True)
            measure = False
        elif levels_out is not None and levels_out.flags.c_contiguous and levels_out.flags.writeable:
            levels = levels_out  # the pass writes the measured levels there
        else:
            levels = np.empty((namp, h), np.float64)
    else:
        levels = np.array(oscan, np.float64, order="C")  # a writable copy (256 kB): one compiled type for both ways
        if levels.shape != (namp, h):
            raise ValueError(f"oscan must be (namp, data rows) = {(namp, h)}, got {levels.shape}")
        if not np.all(np.isfinite(levels)):
            raise ValueError("overscan levels have NaN or infinite values")
    g = _per_amp("gains", gains, namp)
    rn = _per_amp("read_noise_e", read_noise_e, namp)
    sat = _per_amp("saturation", saturation, namp)
    if np.any(g <= 0):
        raise ValueError("gains must be positive (electrons per ADU)")
    # raw >= saturation  <=>  raw >= ceil(saturation): an int32 compare keeps the loop vectorised.
    sat_i = np.clip(np.ceil(sat), -(2**31), 2**31 - 1).astype(np.int32)
    rn2 = rn**2 + g**2 / 12.0  # read noise and the ADC's quantisation
    if oscan_noise_rows > 0:
        rn2 = rn2 + rn**2 / float(oscan_noise_rows)
    shape = (ny, nx)
    b = _calib("bias", bias, shape)
    d = _calib("dark", dark, shape)
    f = _calib("flat", flat, shape)
    xt = None
    if crosstalk is not None:
        xt = np.asarray(crosstalk, np.float64)
        if xt.shape != (namp, namp):
            raise ValueError(f"crosstalk matrix must be {namp}×{namp} (source × victim), got {xt.shape}")
        if not np.all(np.isfinite(xt)):
            raise ValueError("crosstalk matrix has NaN or infinite coefficients; re-measure or fix the matrix file")
        xt = readonly(xt.astype(np.float32))
    if not math.isfinite(dark_time) or dark_time < 0:
        raise ValueError(f"dark_time must be a finite number of seconds ≥ 0, got {dark_time}")
    if out is None:
        image = np.empty(shape, np.float32)
        variance = np.empty(shape, np.float32)
        mask = np.empty(shape, np.int32)
        if not _covers(layout, h, w):
            image.fill(np.nan)
            variance.fill(np.nan)
            mask.fill(nodata_bit)
    else:
        image, variance, mask = out
        for name, arr, dt in (
            ("image", image, np.float32),
            ("variance", variance, np.float32),
            ("mask", mask, np.int32),
        ):
            if arr.shape != shape or arr.dtype != dt or not arr.flags.c_contiguous or not arr.flags.writeable:
                raise ValueError(f"out {name} must be a writeable C-contiguous {np.dtype(dt)} array of shape {shape}")
    if not (crosstalk_tolerance >= 0 and math.isfinite(crosstalk_tolerance)):
        raise ValueError(f"crosstalk_tolerance must be a finite number of ADU ≥ 0, got {crosstalk_tolerance}")
    tol = float(crosstalk_tolerance)
    calibs = (b, d, f, g, rn2, sat_i, float(dark_time), layout.oy0, layout.ox0, layout.flip_x, layout.flip_y, image,
              variance, mask, np.int32(sat_bit), np.int32(nodata_bit))  # fmt: skip
    if parallel:
        isr_rows_parallel(max(1, min(h, 4 * numba.get_num_threads())), raw, dr0, dc0, h, w, levels, xt, tol, *calibs)
    else:
        cut = np.empty(namp) if measure else None  # each amplifier's clipping, set by the pass
        isr_rows(0, h, raw, dr0, dc0, h, w, levels, cut, oc0, oc1 - oc0, float(oscan_nsigma), xt, tol, *calibs,
                 BLOCK_ROWS, np.empty(w, np.float32))  # fmt: skip
    if levels_out is not None and levels_out is not levels:
        levels_out[...] = levels
    return image, variance, mask


def _covers(layout: AmpLayout, h: int, w: int) -> bool:
    ny, nx = layout.shape
    return len(layout.oy0) * h * w == ny * nx


# ---------------------------------------------------------------------------------------------------
# Defects
# ---------------------------------------------------------------------------------------------------


@njit
def _mask_boxes(mask, boxes, bit):
    ny, nx = mask.shape
    for k in range(boxes.shape[0]):
        y0, y1 = max(boxes[k, 0], 0), min(boxes[k, 1], ny)
        x0, x1 = max(boxes[k, 2], 0), min(boxes[k, 3], nx)
        for y in range(y0, y1):
            for x in range(x0, x1):
                mask[y, x] |= bit


def mask_boxes(mask: np.ndarray, boxes, bit: int) -> None:
    """OR ``bit`` into ``mask`` inside each box ``(y0, y1, x0, x1)`` (half-open, clipped to the image), in place."""
    if mask.ndim != 2 or mask.dtype.kind != "i":
        raise ValueError(f"mask must be a 2-D integer array, got {mask.dtype} {mask.shape}")
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    _mask_boxes(mask, boxes, mask.dtype.type(bit))
