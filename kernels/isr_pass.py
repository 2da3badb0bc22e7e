"""The fused ISR pass of :func:`kernels.isr.isr_ccd` (numba): blocks of raw rows of all amplifiers →
assembled image, variance and mask.

:func:`isr_rows` measures (or reads) each raw row's overscan level and range, picks each victim row's strong
crosstalk sources (:func:`_strong_sources`), then writes the output rows with a per-row kernel compiled in
variants without the calibrations or crosstalk sources it is not given (:func:`_make_isr_row`);
:func:`isr_rows_parallel` splits the rows between threads. :mod:`kernels.isr` checks the inputs, holds the
amplifier layout and documents the steps and their order.
"""

from __future__ import annotations

import numba
import numpy as np

from kernels.config import njit
from kernels.overscan import overscan_start, row_level

__all__ = ["isr_rows", "isr_rows_parallel", "isr_row_fwd", "isr_row_rev", "BLOCK_ROWS"]


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


isr_row_fwd = _make_isr_row(False)
isr_row_rev = _make_isr_row(True)


@njit(inline="always")
def _emit(rev, src, flev, base, c0, s0, f0, c1, s1, f1, c2, s2, f2, rawrow, bias, dark, flat, yy, x0, img, var, msk, g,
          r2, sa, dt, sat_bit, nodata_bit):  # fmt: skip
    """The output row, its inputs read backwards (``rev``: the amplifier's serial direction is flipped) or not."""
    if rev:
        isr_row_rev(src, flev, base, c0, s0, f0, c1, s1, f1, c2, s2, f2, rawrow, bias, dark, flat, yy, x0, img, var,
                     msk, g, r2, sa, dt, sat_bit, nodata_bit)  # fmt: skip
    else:
        isr_row_fwd(src, flev, base, c0, s0, f0, c1, s1, f1, c2, s2, f2, rawrow, bias, dark, flat, yy, x0, img, var,
                     msk, g, r2, sa, dt, sat_bit, nodata_bit)  # fmt: skip


#: Strong crosstalk sources applied inside the output pass (the slots of :func:`_make_isr_row`'s kernel); a
#: victim row with more (rare: a bright star in several amplifiers of the same row) gets its corrected row
#: built first.
_INLINE_SOURCES = 3

#: Raw rows per block of the fused pass: the block's raw rows (16 amplifiers × 4 rows × 2.3 kB = 147 kB for
#: LSSTCam) stay in the L2 cache between the pass that finds each row's range and the output pass that reads
#: them again as victims and as crosstalk sources.
BLOCK_ROWS = 4


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
def isr_rows(y_begin, y_end, raw, dr0, dc0, h, w, levels, cut, oc0, on, nsigma, xt, tol, bias, dark, flat,
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
def isr_rows_parallel(nchunk, raw, dr0, dc0, h, w, levels, xt, tol, bias, dark, flat, gains, rn2, sat, dark_time,
                  oy0, ox0, flip_x, flip_y, image, variance, mask, sat_bit, nodata_bit):  # fmt: skip
    for k in numba.prange(nchunk):
        y0 = k * h // nchunk
        y1 = (k + 1) * h // nchunk
        tr = np.empty(w, np.float32)
        isr_rows(y0, y1, raw, dr0, dc0, h, w, levels, None, 0, 0, 0.0, xt, tol, bias, dark, flat, gains, rn2,
                  sat, dark_time, oy0, ox0, flip_x, flip_y, image, variance, mask, sat_bit, nodata_bit, BLOCK_ROWS,
                  tr)  # fmt: skip
