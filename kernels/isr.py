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

The fused pass reads each raw pixel and each calibration pixel once and writes each output pixel once:
its floor is memory bandwidth (``benchmarks/isr.py``).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from kernels.arrays import readonly
from kernels.config import njit
from kernels.overscan import as_raw_counts, overscan_levels, overscan_start, row_level

__all__ = ["isr_ccd", "mask_boxes", "AmpLayout"]


# ---------------------------------------------------------------------------------------------------
# The fused pass
# ---------------------------------------------------------------------------------------------------


def _make_isr_row(reverse: bool):
    """The per-row kernel reading its inputs forwards or backwards (``reverse`` is a compile-time constant,
    so both loops vectorise)."""

    # Inlined into the caller (numba IR): a call per amplifier row, with its array arguments and the loop's
    # run-time alias checks, costs ~60 ns — a third of the fused pass.
    @njit(error_model="numpy", inline="always")  # no ZeroDivisionError checks: a zero flat gives inf → NO_DATA
    def isr_row(src, flev, base, c0, s0, f0, c1, s1, f1, c2, s2, f2, rawrow, bias, dark, flat, yy, x0, img, var, msk, g,
                r2, sa, dt, sat_bit, nodata_bit):  # fmt: skip
        """One output row of one amplifier.

        The signal is ``src - flev`` (raw counts and the row's overscan level, or an already corrected row
        and 0), then, with crosstalk, ``- base - c0 (s0 - f0) - c1 (s1 - f1) - c2 (s2 - f2)``: the constant
        part of the weak couplings and up to three strong sources (raw rows and their overscan levels, read
        again from the cache). ``base`` and the sources may be None: numba compiles a loop without them (the
        caller compiles three: no crosstalk, up to two sources with unused slots at ``c = 0``, three).
        ``src``, ``s0..s2`` and ``rawrow`` (for saturation) are in raw order; the calibrations are whole frames (or None: numba then
        compiles a version without them — a row view of an optional frame would stay a run-time Optional
        and keep the loop from vectorising), read at row ``yy`` from column ``x0``."""
        nan = np.float32(np.nan)
        inf = np.float32(np.inf)
        zero = np.float32(0.0)
        w = src.shape[0]
        if bias is not None:
            brow = bias[yy, x0 : x0 + w]
        if dark is not None:
            drow = dark[yy, x0 : x0 + w]
        if flat is not None:
            frow = flat[yy, x0 : x0 + w]
        for k in range(w):
            # unsigned: no wraparound test on the index, so the reversed loop vectorises too
            x = np.uint64(w - 1 - k) if reverse else np.uint64(k)
            v = np.float32(src[x]) - flev
            if base is not None:
                v = v - base
            if s0 is not None:
                v = v - c0 * (np.float32(s0[x]) - f0)
            if s1 is not None:
                v = v - c1 * (np.float32(s1[x]) - f1)
            if s2 is not None:
                v = v - c2 * (np.float32(s2[x]) - f2)
            if bias is not None:
                v -= brow[k]
            e = v * g
            ve = max(e, zero) + r2
            if dark is not None:
                e -= drow[k] * dt
            if flat is not None:
                f = frow[k]
                inv = np.float32(1.0) / f if f > zero else nan
                e = e * inv
                ve = ve * (inv * inv)
            ok = (abs(e) < inf) & (abs(ve) < inf)
            img[k] = e if ok else nan
            var[k] = ve if ok else nan
            msk[k] = (sat_bit if rawrow[x] >= sa else np.int32(0)) | (np.int32(0) if ok else nodata_bit)

    return isr_row


_isr_row_fwd = _make_isr_row(False)
_isr_row_rev = _make_isr_row(True)


@njit(inline="always")
def _emit(rev, src, flev, base, c0, s0, f0, c1, s1, f1, c2, s2, f2, rawrow, bias, dark, flat, yy, x0, img, var, msk, g,
          r2, sa, dt, sat_bit, nodata_bit):  # fmt: skip
    """The output row, its inputs read backwards (``rev``: the amplifier's serial direction is flipped) or not."""
    if rev:
        _isr_row_rev(src, flev, base, c0, s0, f0, c1, s1, f1, c2, s2, f2, rawrow, bias, dark, flat, yy, x0, img, var,
                     msk, g, r2, sa, dt, sat_bit, nodata_bit)  # fmt: skip
    else:
        _isr_row_fwd(src, flev, base, c0, s0, f0, c1, s1, f1, c2, s2, f2, rawrow, bias, dark, flat, yy, x0, img, var,
                     msk, g, r2, sa, dt, sat_bit, nodata_bit)  # fmt: skip


#: Strong crosstalk sources applied inside the output pass (the slots of :func:`_make_isr_row`'s kernel); a
#: victim row with more (rare: a bright star in several amplifiers of the same row) gets its corrected row
#: built first.
_INLINE_SOURCES = 3

#: Raw rows per block of the fused pass: the block's raw rows (16 amplifiers × 4 rows × 2.3 kB = 147 kB for
#: LSSTCam) stay in the L2 cache between the pass that finds each row's range and the output pass that reads
#: them again as victims and as crosstalk sources.
_BLOCK = 4


@njit(inline="always")
def _strong_sources(xt, j, tol, mid, half, idx, coef, bound):
    """The constant part of the weak couplings into victim ``j`` (``base``) and its strong sources: indices
    into ``idx``, coefficients into ``coef``, in ascending order; returns ``(base, count)``.

    Each source row is split exactly into its mid-range ``mid[i]`` and the rest, ``|s_i - mid_i| <=
    half[i]``; the constant part always goes in. The rest of coupling ``i`` moves the victim by at most
    ``|xt[i, j]| * half[i]``: the largest of these go in, one by one, until the ones left can move it by
    ``tol`` at most together, so each victim pixel is off by at most ``tol`` (exact for ``tol = 0``). On
    sky rows the couplings of an LSSTCam CCD add up to a few hundredths of an ADU: no source goes in.
    ``bound`` is scratch space of ``namp`` float64.
    """
    namp = xt.shape[0]
    rest = 0.0
    for i in range(namp):
        b = float(abs(xt[i, j]) * half[i]) if i != j else 0.0  # the float32 product, as the reference's
        bound[i] = b
        rest += b
    if tol <= 0.0:  # exact: every coupling with a varying source goes in
        for i in range(namp):
            if bound[i] > 0.0:
                bound[i] = -1.0
        rest = 0.0
    while rest > tol:
        k = 0
        for i in range(1, namp):
            if bound[i] > bound[k]:
                k = i
        if bound[k] <= 0.0:  # (only float rounding of `rest` is left)
            break
        rest -= bound[k]
        bound[k] = -1.0  # in
    base = np.float32(0.0)
    n = 0
    for i in range(namp):
        c = xt[i, j]
        if i == j:
            continue
        if bound[i] < 0.0:
            idx[n] = i
            coef[n] = c
            n += 1
        elif c != 0.0:
            base += c * mid[i]
    return base, n


@njit(error_model="numpy")
def _isr_rows(y_begin, y_end, raw, dr0, dc0, h, w, levels, cut, oc0, on, nsigma, xt, tol, bias, dark, flat,
              gains, rn2, sat, dark_time, oy0, ox0, flip_x, flip_y, image, variance, mask, sat_bit, nodata_bit, nb,
              tr):  # fmt: skip
    """Raw rows ``[y_begin, y_end)`` of the data region of every amplifier → assembled outputs.

    Blocks of ``nb`` raw rows of all amplifiers (they are read at the same instant, so crosstalk couples
    pixels with the same raw ``(row, col)``). First each raw row of the block, where it lies: its overscan
    level — measured with ``cut`` (an array: the serial overscan ``[oc0, oc0 + on)`` of the row, clipped
    at ``nsigma``; the levels of :func:`~kernels.overscan.overscan_levels` with ``smooth=0`` to the bit,
    written into ``levels``), else (None) read from ``levels`` — and, with crosstalk, its range (which
    couplings are strong, :func:`_strong_sources`). The block's raw rows, 16 × ``nb`` × 2.3 kB for
    LSSTCam, then stay in the L2 cache. Then one band of output rows (half of an LSSTCam CCD) at a time,
    row by row, amplifiers left to right — the rows of a block of a band are contiguous in each output and
    calibration frame, so the pass streams through six sequential regions — the output pixels, with the
    overscan level of the row and the crosstalk of the strong sources applied on the way. Every raw,
    calibration and output pixel crosses the memory bus once. ``xt``, ``bias``, ``dark`` and ``flat`` may
    be None: numba compiles a version without them.
    """
    namp = raw.shape[0]
    dt = np.float32(dark_time)
    zero = np.float32(0.0)
    order = np.argsort(oy0 * (ox0.max() + 1) + ox0)
    starts = [0]  # amplifiers of one band of output rows (same oy0) are consecutive in `order`
    for k in range(1, namp):
        if oy0[order[k]] != oy0[order[k - 1]]:
            starts.append(k)
    starts.append(namp)
    mid = np.empty((namp, nb), np.float32)
    half = np.empty((namp, nb), np.float32)
    flev = np.empty((namp, nb), np.float32)
    idx = np.empty(namp, np.int64)
    coef = np.empty(namp, np.float32)
    bound = np.empty(namp, np.float64)
    zrow = np.zeros(w, raw.dtype)
    buf = np.empty(max(on, 1), np.float64)
    center = np.zeros(namp, np.float64)
    if cut is not None:
        for a in range(namp):
            cut[a], center[a] = overscan_start(raw[a], dr0 + y_begin, dr0 + y_end, oc0, oc0 + on, nsigma, buf)
    for yb in range(y_begin, y_end, nb):
        ye = min(yb + nb, y_end)
        for a in range(namp):
            seg = raw[a]
            for y in range(yb, ye):
                # The range also without crosstalk when the level is measured: the overscan lines then come
                # in behind a sequential read of the row, instead of stalling on their own (5 ms per CCD)
                if xt is not None or cut is not None:
                    rr = seg[dr0 + y, dc0 : dc0 + w]
                    lo = rr[0]
                    hi = rr[0]
                    for x in range(w):
                        lo = min(lo, rr[x])  # integer reductions vectorise (float ones need fastmath)
                        hi = max(hi, rr[x])
                if cut is not None:  # after the data: the overscan follows them in the raw row
                    center[a] = row_level(seg, dr0 + y, oc0, on, center[a], cut[a], buf)
                    levels[a, y] = center[a]
                lev = levels[a, y]
                flev[a, y - yb] = np.float32(lev)
                if xt is not None or cut is not None:
                    mid[a, y - yb] = np.float32(0.5 * (float(lo) + float(hi)) - lev)
                    half[a, y - yb] = np.float32(0.5 * (float(hi) - float(lo)))
        # One band of output rows at a time: six sequential regions in flight instead of twelve.
        for band in range(len(starts) - 1):
            up = flip_y[order[starts[band]]]  # output rows ascend with raw rows
            for j in range(ye - yb):
                y = yb + j if up else ye - 1 - j  # the block's output rows in ascending memory order
                r = y - yb
                for k in range(starts[band], starts[band + 1]):
                    a = order[k]
                    rawrow = raw[a, dr0 + y, dc0 : dc0 + w]
                    yy = oy0[a] + y if flip_y[a] else oy0[a] + (h - 1 - y)
                    x0 = ox0[a]
                    img, var, msk = image[yy, x0 : x0 + w], variance[yy, x0 : x0 + w], mask[yy, x0 : x0 + w]
                    g = np.float32(gains[a])
                    r2 = np.float32(rn2[a])
                    rev = flip_x[a]
                    fl = flev[a, r]
                    if xt is None:
                        _emit(rev, rawrow, fl, None, zero, None, zero, zero, None, zero, zero, None, zero, rawrow, bias,
                              dark, flat, yy, x0, img, var, msk, g, r2, sat[a], dt, sat_bit, nodata_bit)  # fmt: skip
                        continue
                    base, n = _strong_sources(xt, a, tol, mid[:, r], half[:, r], idx, coef, bound)
                    if n > _INLINE_SOURCES:  # the corrected row built first, in the reference order
                        for x in range(w):
                            tr[x] = (np.float32(rawrow[x]) - fl) - base
                        for m in range(n):
                            c = coef[m]
                            i = idx[m]
                            si = raw[i, dr0 + y, dc0 : dc0 + w]
                            fi = flev[i, r]
                            for x in range(w):
                                tr[x] -= c * (np.float32(si[x]) - fi)
                        _emit(rev, tr, zero, None, zero, None, zero, zero, None, zero, zero, None, zero, rawrow, bias,
                              dark, flat, yy, x0, img, var, msk, g, r2, sat[a], dt, sat_bit, nodata_bit)  # fmt: skip
                        continue
                    if n == 0:  # the common case: a sky row's couplings are all within the tolerance
                        _emit(rev, rawrow, fl, base, zero, None, zero, zero, None, zero, zero, None, zero, rawrow, bias,
                              dark, flat, yy, x0, img, var, msk, g, r2, sat[a], dt, sat_bit, nodata_bit)  # fmt: skip
                        continue
                    # Two compiled variants (up to two sources, three) keep the compile time in bounds: a row
                    # with fewer sources fills a slot with c = 0 and a row of zeros (the same value to the bit).
                    i0 = idx[0] if n > 0 else a
                    i1 = idx[1] if n > 1 else a
                    s0 = raw[i0, dr0 + y, dc0 : dc0 + w] if n > 0 else zrow
                    s1 = raw[i1, dr0 + y, dc0 : dc0 + w] if n > 1 else zrow
                    c0, f0 = (coef[0], flev[i0, r]) if n > 0 else (zero, zero)
                    c1, f1 = (coef[1], flev[i1, r]) if n > 1 else (zero, zero)
                    if n <= 2:
                        _emit(rev, rawrow, fl, base, c0, s0, f0, c1, s1, f1, zero, None, zero, rawrow, bias, dark, flat,
                              yy, x0, img, var, msk, g, r2, sat[a], dt, sat_bit, nodata_bit)  # fmt: skip
                        continue
                    i2 = idx[2]
                    _emit(rev, rawrow, fl, base, c0, s0, f0, c1, s1, f1, coef[2], raw[i2, dr0 + y, dc0 : dc0 + w],
                          flev[i2, r], rawrow, bias, dark, flat, yy, x0, img, var, msk, g, r2, sat[a], dt,
                          sat_bit, nodata_bit)  # fmt: skip


@njit(parallel=True)
def _isr_parallel(nchunk, raw, dr0, dc0, h, w, levels, xt, tol, bias, dark, flat, gains, rn2, sat, dark_time,
                  oy0, ox0, flip_x, flip_y, image, variance, mask, sat_bit, nodata_bit):  # fmt: skip
    for k in numba.prange(nchunk):
        y0 = k * h // nchunk
        y1 = (k + 1) * h // nchunk
        tr = np.empty(w, np.float32)
        _isr_rows(y0, y1, raw, dr0, dc0, h, w, levels, None, 0, 0, 0.0, xt, tol, bias, dark, flat, gains, rn2,
                  sat, dark_time, oy0, ox0, flip_x, flip_y, image, variance, mask, sat_bit, nodata_bit, _BLOCK,
                  tr)  # fmt: skip


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
        float64 ``(namp, data_rows)``: receives the overscan levels used (measured or given).
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
        else:
            levels = np.empty((namp, h), np.float64)
    else:
        levels = np.array(oscan, np.float64, order="C")  # a copy (256 kB for LSSTCam): the pass writes measured ones
        if levels.shape != (namp, h):
            raise ValueError(f"oscan must be (namp, data rows) = {(namp, h)}, got {levels.shape}")
        if not np.all(np.isfinite(levels)):
            raise ValueError("overscan levels have NaN or infinite values")
    if levels_out is not None and (levels_out.shape != (namp, h) or levels_out.dtype != np.float64):
        raise ValueError(f"levels_out must be a float64 array of shape {(namp, h)}, got {levels_out.dtype} "
                         f"{levels_out.shape}")  # fmt: skip
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
        _isr_parallel(max(1, min(h, 4 * numba.get_num_threads())), raw, dr0, dc0, h, w, levels, xt, tol, *calibs)
    else:
        _isr_rows(0, h, raw, dr0, dc0, h, w, levels, np.empty(namp) if measure else None, oc0, oc1 - oc0, float(oscan_nsigma), xt, tol,
                  *calibs, _BLOCK, np.empty(w, np.float32))  # fmt: skip
    if levels_out is not None:
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
