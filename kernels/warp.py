"""Lanczos-3 resampling of an image, its variance and its mask onto another pixel grid.

The caller gives, on a coarse grid of *target* pixels (every ``step`` pixels in x and y, nodes at
``0, step, 2 step, …`` up to and including the first node ≥ the last pixel), the *source* pixel
coordinates of those pixels (0-based pixel centres) — typically target WCS → sky → source WCS, computed
exactly there. The kernel interpolates them bilinearly to every target pixel. For a map whose second
derivatives are bounded by ``c`` (pixels per pixel²) the bilinear error is at most ``c · step² / 8``; for
a TAN-SIP CCD WCS onto a TAN template ``c`` is ~1e-7 (the optical distortion bends the pixel grid by a
few parts in 1e4 over a full CCD), so ``step = 32`` errs by ~1e-5 pixel (measured in ``tests/test_warp.py``:
< 1e-4 pixel on an LSSTCam CCD with its distortion).

Resampling: ``L(d) = sinc(d) sinc(d/3)`` for ``|d| < 3``, 6 × 6 taps, the 1-D weights normalised to unit
sum (so a constant image stays constant). A target pixel is ``NO_DATA`` (image and variance NaN) when any
of its 36 taps lies outside the source, is NaN/inf (image or variance), or carries the source mask's
``NO_DATA`` bit; the other source mask bits of the 36 taps are OR-ed into the target mask.

Flux: with ``conserve_flux`` the value is multiplied by the local Jacobian determinant ``|∂(sx, sy)/∂(x, y)|``
(source pixels per target pixel, from the same bilinear grid), so an image of flux per pixel keeps its
total flux: interpolation preserves surface brightness, and the determinant converts it to the target's
pixel area. For nearly equal pixel scales (template and science at 0.2″) the factor is 1 to a few 1e-3;
without it an image of surface brightness is resampled as is.

Variance: ``"pixel"`` gives the per-pixel variance of the interpolated values, ``Σ w² V`` (it varies with
the sub-pixel phase, and the interpolated noise is correlated); ``"density"`` gives the white-noise level
the interpolated image carries per unit area, bilinearly interpolated ``V`` — the quantity a later
convolution with a broad kernel sees (``Σ K² V`` after convolving). :func:`lanczos_noise_power` gives the
matching noise power spectrum of the interpolated white noise, averaged over sub-pixel phases.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from kernels.arrays import float_plane
from kernels.config import njit

#: Mask bit written where the source does not cover a target pixel (``MaskBit.NO_DATA``).
NO_DATA = 2
#: Half-width of the Lanczos kernel (a = 3: taps at offsets -2 … 3 of floor(s)).
LANCZOS_A = 3
#: Floating-point freedoms for the resampling loops: fused multiply-adds and reassociated sums (15 % faster),
#: but not the "no NaN / no inf" assumptions of ``fastmath=True``, which would fold the NaN tests away.
#: (Kept here rather than in ``kernels/config.py``, which this module does not own.)
_FAST = {"contract", "reassoc", "nsz", "arcp"}
#: Lanczos weights are tabulated at 1/TABLE_SIZE pixel and interpolated linearly: error < 2e-6 per weight (the
#: table is kept in float32, whose rounding, 6e-8, is far below that).
TABLE_SIZE = 1024
_PI = math.pi
#: Target pixels are resampled in tiles of TILE_Y rows × about TILE_X columns (:func:`_warp_into`): 64 × 128
#: measured fastest here for rotated and unrotated grids alike (a full-size CCD's template ~25 % faster
#: than row by row at its ~100° rotation, ad hoc).
TILE_Y = 64
TILE_X = 128
#: Unsigned offsets 1 … 5: an array index of unsigned type needs no test for negative (wrap-around) values,
#: which would cost three instructions per tap (the resampling loop is bound by its instruction count).
_U1, _U2, _U3, _U4, _U5 = (np.uint64(k) for k in range(1, 6))
_C3 = 0.5  # cos(π/3)
_S3 = math.sqrt(3.0) / 2.0  # sin(π/3)


class WarpResult(NamedTuple):
    """Resampled planes on the target grid: float32 image and variance (NaN where ``NO_DATA``), int32 mask."""

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray


# --------------------------------------------------------------------------------------------- cores
@njit
def _lanczos3(t, w):
    """Unit-sum Lanczos-3 weights of taps ``floor(s) - 2 … floor(s) + 3`` for fractional offset ``t``."""
    if t < 1e-9:
        for k in range(6):
            w[k] = 0.0
        w[2] = 1.0
        return
    st = math.sin(_PI * t)
    a = _PI * t / 3.0
    sa, ca = math.sin(a), math.cos(a)
    total = 0.0
    for k in range(6):
        m = k - 2  # tap offset; d = t - m
        d = t - m
        sign = 1.0 if m % 2 == 0 else -1.0
        # sin(π d / 3) = sin(a - m π/3) by the angle-difference formula
        cm, sm = 1.0, 0.0
        for _ in range(abs(m)):
            cm, sm = cm * _C3 - sm * _S3, sm * _C3 + cm * _S3
        if m < 0:
            sm = -sm
        s3 = sa * cm - ca * sm
        w[k] = 3.0 * sign * st * s3 / (_PI * _PI * d * d)
        total += w[k]
    for k in range(6):
        w[k] /= total


@njit
def _table(n):
    """Weights at offsets ``t = i / n``, ``i = 0 … n`` (row ``n`` is ``t = 1``: the taps shifted by one)."""
    lut = np.empty((n + 1, 6))
    w = np.empty(6)
    for i in range(n):
        _lanczos3(i / n, w)
        lut[i] = w
    lut[n, 0] = 0.0
    lut[n, 1:] = lut[0, :5]
    return lut


@njit(fastmath=_FAST)
def _weights6(lut, t):
    """The six weights at offset ``t`` as a tuple (kept in registers by the compiler), in the table's float32:
    a float32 image is then resampled in float32 arithmetic (its rounding, a few 1e-7 of the value, is that of
    the float32 result), a float64 one in float64."""
    n = lut.shape[0] - 1
    u = t * n
    k = min(int(u), n - 1)
    f = np.float32(u - k)
    g = np.float32(1.0) - f
    ku = np.uint64(k)  # k >= 0: t >= 0
    a, b = lut[ku], lut[ku + _U1]
    return (g * a[0] + f * b[0], g * a[1] + f * b[1], g * a[2] + f * b[2], g * a[3] + f * b[3],
            g * a[4] + f * b[4], g * a[5] + f * b[5])  # fmt: skip


@njit(fastmath=_FAST)
def _row6(r, x0, w):
    """``Σ w[i] r[x0 + i]``; ``x0`` unsigned (np.uint64)."""
    return (w[0] * r[x0] + w[1] * r[x0 + _U1] + w[2] * r[x0 + _U2] + w[3] * r[x0 + _U3] + w[4] * r[x0 + _U4]
            + w[5] * r[x0 + _U5])  # fmt: skip


@njit
def _row6sq(r, x0, w):
    """``Σ w[i]² r[x0 + i]``; ``x0`` unsigned (np.uint64)."""
    return (w[0] * w[0] * r[x0] + w[1] * w[1] * r[x0 + _U1] + w[2] * w[2] * r[x0 + _U2] + w[3] * w[3] * r[x0 + _U3]
            + w[4] * w[4] * r[x0 + _U4] + w[5] * w[5] * r[x0 + _U5])  # fmt: skip


@njit
def _bad_integral(image, variance, mask, no_data, ii):
    """Summed-area table of unusable source pixels (non-finite image/variance or the NO_DATA bit)."""
    ny, nx = image.shape
    for y in range(ny):
        run = 0
        for x in range(nx):
            bad = (not np.isfinite(image[y, x])) or (not np.isfinite(variance[y, x])) or (mask[y, x] & no_data) != 0
            run += 1 if bad else 0
            ii[y + 1, x + 1] = ii[y, x + 1] + run


@njit
def _source_flags(image, variance, mask):
    """Which summed-area tables a source needs: ``(any mask bit set, any mask bit set or any non-finite image
    or variance pixel)``, in one pass without temporaries (``mask`` of shape (1, 1): no mask); stops at the
    first mask bit, which needs both."""
    ny, nx = image.shape
    with_mask = mask.shape == image.shape
    inf = np.inf
    finite = True
    for y in range(ny):
        ok = True
        for x in range(nx):  # no branch inside: the row's test vectorises
            ok &= (abs(image[y, x]) < inf) & (abs(variance[y, x]) < inf)
        finite &= ok
        if with_mask:
            bits = 0
            for x in range(nx):
                bits |= mask[y, x]
            if bits != 0:
                return True, True
    return False, not finite


@njit
def _mask_integral(mask, ii):
    ny, nx = mask.shape
    for y in range(ny):
        run = 0
        for x in range(nx):
            run += 1 if mask[y, x] != 0 else 0
            ii[y + 1, x + 1] = ii[y, x + 1] + run


@njit(fastmath=_FAST)
def _row_coords(gx, gy, j0, fy, inv, step, xbeg, xend, sxr, syr, jacr, conserve):
    """Source coordinates (and, with ``conserve``, the Jacobian determinant) of target pixels ``xbeg … xend - 1``
    of a row at ``fy`` between node rows ``j0`` and ``j0 + 1``: linear in x within each cell, so the loop over
    a cell's pixels vectorises (the same bilinear interpolation, rearranged)."""
    ncx = gx.shape[1]
    for i0 in range(xbeg // step, min((xend - 1) // step, ncx - 2) + 1):
        a00, a01, a10, a11 = gx[j0, i0], gx[j0, i0 + 1], gx[j0 + 1, i0], gx[j0 + 1, i0 + 1]
        b00, b01, b10, b11 = gy[j0, i0], gy[j0, i0 + 1], gy[j0 + 1, i0], gy[j0 + 1, i0 + 1]
        a0 = (1 - fy) * a00 + fy * a10
        a1 = (1 - fy) * a01 + fy * a11
        b0 = (1 - fy) * b00 + fy * b10
        b1 = (1 - fy) * b01 + fy * b11
        dxdx = (a1 - a0) * inv
        dydx = (b1 - b0) * inv
        xa = max(xbeg, i0 * step)
        xb = xend if i0 == ncx - 2 else min(xend, (i0 + 1) * step)  # the last cell runs to the last pixel
        for x in range(xa, xb):
            fx = x * inv - i0
            sxr[x] = a0 + fx * (a1 - a0)
            syr[x] = b0 + fx * (b1 - b0)
            if conserve:
                dxdy = ((1 - fx) * (a10 - a00) + fx * (a11 - a01)) * inv
                dydy = ((1 - fx) * (b10 - b00) + fx * (b11 - b01)) * inv
                jacr[x] = abs(dxdx * dydy - dxdy * dydx)


@njit(fastmath=_FAST)
def _warp_into(image, variance, mask, gx, gy, step, box, out_img, out_var, out_mask, bad_ii, mask_ii, pixel_variance,
               lut, no_data, conserve):  # fmt: skip
    """Fill the target pixels of ``box`` (``y0, y1, x0, x1``) still flagged ``no_data`` in ``out_mask`` that
    this source covers.

    ``bad_ii`` and ``mask_ii`` are the summed-area tables of the unusable and of the flagged source pixels,
    None where the source has none; ``pixel_variance`` is the variance plane for ``"pixel"`` variances, None
    for ``"density"``. Being None rather than flags, the unused paths are compiled out.

    Tile by tile (``TILE_Y`` rows of about ``TILE_X`` pixels), row by row in a tile: the source coordinates of
    the row's pixels first (:func:`_row_coords`), then the taps (:func:`_warp_row`). (One
    loop doing both, pixel by pixel, took ~44 ns per target pixel of a full-size CCD's template patch here —
    a long chain of dependent steps per pixel; split, ~31 ns.) The taps are summed in the source's precision
    (the weights are float32), the results within a few 1e-7 of a float64 sum. Timed ad hoc on a later, slower
    VM, a clean float32 patch warped onto a full-size CCD with density variances: 39–42 ns per target pixel
    with float64 sums and the three paths chosen by runtime flags, 35 ns with float32 sums, 27–28 ns with the
    paths compiled out as well (the "pixel" variances: 55–58 → 44 ns)."""
    ncy = gx.shape[0]
    inv = 1.0 / step
    istep = int(step)
    ybeg, yend, xbeg, xend = box
    nx_o = out_img.shape[1]
    sxr = np.empty(nx_o)
    syr = np.empty(nx_o)
    jacr = np.ones(nx_o)
    # Tiles of target pixels: the source pixels one tile reads stay in the L2 cache, whatever the rotation
    # between the grids (row by row, a rotated target row reads a slanted line across thousands of source rows,
    # and the next row reads them again after they have been evicted). The tile width is whole cells of the
    # coarse grid, so each cell's coordinates are interpolated in the same loop as without tiles (to the bit).
    tile_x = istep * max(1, TILE_X // istep)
    for ty0 in range(ybeg, yend, TILE_Y):
        for tx0 in range(xbeg, xend, tile_x):
            tx1 = min(tx0 + tile_x, xend)
            for y in range(ty0, min(ty0 + TILE_Y, yend)):
                cy = y * inv
                j0 = min(int(cy), ncy - 2)
                fy = cy - j0
                _row_coords(gx, gy, j0, fy, inv, istep, tx0, tx1, sxr, syr, jacr, conserve)
                _warp_row(image, variance, mask, tx0, tx1, sxr, syr, jacr, out_img[y], out_var[y], out_mask[y],
                          bad_ii, mask_ii, pixel_variance, lut, no_data, conserve)  # fmt: skip


@njit(fastmath=_FAST, inline="always")
def _warp_row(image, variance, mask, xbeg, xend, sxr, syr, jacr, oi, ov, om, bad_ii, mask_ii, pixel_variance, lut,
              no_data, conserve):  # fmt: skip
    """Target pixels ``xbeg … xend - 1`` of one row (:func:`_warp_into`; ``oi``, ``ov``, ``om``: the row of each
    output plane), their source coordinates in ``sxr``, ``syr`` (and ``jacr``)."""
    ny_s, nx_s = image.shape
    for k in range(xend - xbeg):
        x = np.uint64(xbeg) + np.uint64(k)  # xbeg >= 0; unsigned indices throughout (_U1)
        if (om[x] & no_data) == 0:
            continue
        sx, sy = sxr[x], syr[x]
        if not (np.isfinite(sx) and np.isfinite(sy)):
            continue
        ix = int(math.floor(sx))
        iy = int(math.floor(sy))
        x0, y0 = ix - 2, iy - 2
        if x0 < 0 or y0 < 0 or ix + 3 >= nx_s or iy + 3 >= ny_s:
            continue
        x1, y1 = x0 + 6, y0 + 6
        if bad_ii is not None:
            if bad_ii[y1, x1] - bad_ii[y0, x1] - bad_ii[y1, x0] + bad_ii[y0, x0] != 0:
                continue
        tx, ty = sx - ix, sy - iy
        wx = _weights6(lut, tx)
        wy = _weights6(lut, ty)
        one, ftx, fty = np.float32(1.0), np.float32(tx), np.float32(ty)  # the bilinear variance in float32 too
        xu, yu = np.uint64(x0), np.uint64(y0)  # both >= 0 (tested above)
        acc = (wy[0] * _row6(image[yu], xu, wx) + wy[1] * _row6(image[yu + _U1], xu, wx)
               + wy[2] * _row6(image[yu + _U2], xu, wx) + wy[3] * _row6(image[yu + _U3], xu, wx)
               + wy[4] * _row6(image[yu + _U4], xu, wx) + wy[5] * _row6(image[yu + _U5], xu, wx))  # fmt: skip
        if pixel_variance is not None:
            pv = pixel_variance
            accv = (wy[0] * wy[0] * _row6sq(pv[yu], xu, wx) + wy[1] * wy[1] * _row6sq(pv[yu + _U1], xu, wx)
                    + wy[2] * wy[2] * _row6sq(pv[yu + _U2], xu, wx) + wy[3] * wy[3] * _row6sq(pv[yu + _U3], xu, wx)
                    + wy[4] * wy[4] * _row6sq(pv[yu + _U4], xu, wx) + wy[5] * wy[5] * _row6sq(pv[yu + _U5], xu, wx))  # fmt: skip
        else:
            iu, ju = np.uint64(ix), np.uint64(iy)
            accv = (one - fty) * ((one - ftx) * variance[ju, iu] + ftx * variance[ju, iu + _U1]) + fty * (
                (one - ftx) * variance[ju + _U1, iu] + ftx * variance[ju + _U1, iu + _U1]
            )
        bits = 0
        if mask_ii is not None:
            if mask_ii[y1, x1] - mask_ii[y0, x1] - mask_ii[y1, x0] + mask_ii[y0, x0] != 0:
                for j in range(6):
                    for i in range(6):
                        bits |= mask[y0 + j, x0 + i]
        if conserve:
            jac = np.float32(jacr[x])
            acc *= jac
            accv *= jac * jac
        oi[x] = acc
        ov[x] = accv
        om[x] = bits & ~no_data


def _target_box(gx, gy, step: int, source_shape, target_shape) -> tuple[int, int, int, int]:
    """The target pixels ``(y0, y1, x0, x1)`` (half-open) that a source of ``source_shape`` can cover.

    Within a cell of the coarse grid the source coordinates are bilinear in the node values, a convex
    combination of the cell's four corners, so they stay within the corners' range: a cell can reach the
    source's usable region (``2 ≤ s < n - 3``: the six taps inside) only where that range does. Cells with a
    NaN corner have no source position at all. Empty: ``(0, 0, 0, 0)``.
    """
    ny_s, nx_s = source_shape
    ny, nx = target_shape
    with np.errstate(invalid="ignore"):
        corners = np.stack([gx[:-1, :-1], gx[:-1, 1:], gx[1:, :-1], gx[1:, 1:]])
        lo_x, hi_x = corners.min(axis=0), corners.max(axis=0)
        corners = np.stack([gy[:-1, :-1], gy[:-1, 1:], gy[1:, :-1], gy[1:, 1:]])
        lo_y, hi_y = corners.min(axis=0), corners.max(axis=0)
        e = 1e-6  # the pixels' coordinates are rounded: a hair of margin
        reach = (hi_x >= 2 - e) & (lo_x < nx_s - 3 + e) & (hi_y >= 2 - e) & (lo_y < ny_s - 3 + e)  # False where NaN
    rows = np.flatnonzero(reach.any(axis=1))
    cols = np.flatnonzero(reach.any(axis=0))
    if rows.size == 0:
        return 0, 0, 0, 0
    ncy, ncx = gx.shape
    # cell j holds pixels [j step, (j + 1) step); the last cell runs to the last pixel
    y1 = ny if rows[-1] == ncy - 2 else min(ny, (int(rows[-1]) + 1) * step)
    x1 = nx if cols[-1] == ncx - 2 else min(nx, (int(cols[-1]) + 1) * step)
    return int(rows[0]) * step, y1, int(cols[0]) * step, x1


# --------------------------------------------------------------------------------------------- public
_LUT = _table(TABLE_SIZE).astype(np.float32)


def grid_nodes(shape: tuple[int, int], step: int) -> tuple[np.ndarray, np.ndarray]:
    """Target pixel coordinates ``(xs, ys)`` (1-D, float64) of the coarse grid for a target of ``shape``.

    Evaluate the source coordinates at ``np.meshgrid(xs, ys)``: arrays of shape ``(len(ys), len(xs))``.
    """
    if step < 1:
        raise ValueError(f"grid step must be at least 1 pixel, not {step}")
    ny, nx = shape
    ncx = max(int(math.ceil((nx - 1) / step)) + 1, 2)
    ncy = max(int(math.ceil((ny - 1) / step)) + 1, 2)
    return np.arange(ncx, dtype=float) * step, np.arange(ncy, dtype=float) * step


def warp_image(image, variance, mask, src_x, src_y, step: int, shape: tuple[int, int], *, conserve_flux: bool = True,
               variance_mode: str = "density", out: WarpResult | None = None) -> WarpResult:  # fmt: skip
    """Resample ``image`` (and ``variance``, ``mask``) onto a target grid with Lanczos-3.

    Parameters
    ----------
    image, variance : numpy.ndarray
        2-D source planes (any float/int dtype; NaN/inf allowed, they make the affected targets NO_DATA).
        Not modified.
    mask : numpy.ndarray or None
        Integer source mask (0 = good); the ``NO_DATA`` bit (2) marks unusable pixels, other bits propagate.
    src_x, src_y : numpy.ndarray
        Source coordinates (0-based pixels) of the coarse target nodes of :func:`grid_nodes`, shape
        ``(len(ys), len(xs))``; NaN for target nodes with no source position.
    step : int
        Spacing of the coarse grid in target pixels.
    shape : tuple of int
        ``(ny, nx)`` of the target.
    conserve_flux : bool
        Multiply by the Jacobian determinant (module docstring).
    variance_mode : {"density", "pixel"}
        What the variance plane holds (module docstring).
    out : WarpResult, optional
        Planes to fill in place (float32, float32, int32 of ``shape``): only their pixels that still carry
        ``NO_DATA`` and that this source covers are written — the way several overlapping source patches fill
        one target; the others keep their values (give NaN image and variance where ``NO_DATA``, as the
        planes this function makes, for the result to be NaN there).

    Returns
    -------
    WarpResult
        float32 image and variance, NaN where the target is ``NO_DATA``; int32 mask.
    """
    img = float_plane(image, "image")
    var = float_plane(variance, "variance", img.shape)
    if mask is None:
        msk = np.zeros((1, 1), np.int32)  # never read: no mask bits to check
    else:
        msk = np.asarray(mask)
        if msk.shape != img.shape or msk.dtype.kind not in "iu":
            raise ValueError(f"mask must be an integer array of shape {img.shape}, got {msk.dtype} {msk.shape}")
        msk = msk.astype(np.int32, copy=False)
    if variance_mode not in ("density", "pixel"):
        raise ValueError(f"variance_mode must be 'density' or 'pixel', not {variance_mode!r}")
    ny, nx = (int(s) for s in shape)
    if ny < 1 or nx < 1:
        raise ValueError(f"target shape must be positive, got {shape}")
    xs, ys = grid_nodes((ny, nx), int(step))
    gx = np.ascontiguousarray(src_x, dtype=np.float64)
    gy = np.ascontiguousarray(src_y, dtype=np.float64)
    if gx.shape != (len(ys), len(xs)) or gy.shape != gx.shape:
        raise ValueError(f"src_x and src_y must have the coarse grid's shape {(len(ys), len(xs))} for step {step}, "
                         f"got {gx.shape} and {gy.shape}; build them on grid_nodes(shape, step)")  # fmt: skip
    if out is None:
        out = WarpResult(np.full((ny, nx), np.nan, np.float32), np.full((ny, nx), np.nan, np.float32),
                         np.full((ny, nx), NO_DATA, np.int32))  # fmt: skip
    else:
        for a, dt in zip(out, (np.float32, np.float32, np.int32)):
            if a.shape != (ny, nx) or a.dtype != dt or not a.flags.writeable:
                raise ValueError(f"out planes must be writeable {shape} float32, float32, int32 arrays")
    # Summed-area tables answer "any unusable / flagged pixel among the 36 taps?" in four look-ups; they are
    # built only when the source has such pixels at all (a clean template patch needs neither).
    check_mask, check_bad = _source_flags(img, var, msk)
    bad_ii = mask_ii = None
    if check_bad:
        bad_ii = np.zeros((img.shape[0] + 1, img.shape[1] + 1), np.int32)
        _bad_integral(img, var, msk if msk.shape == img.shape else np.zeros(img.shape, np.int32), NO_DATA, bad_ii)
    if check_mask:
        mask_ii = np.zeros((img.shape[0] + 1, img.shape[1] + 1), np.int32)
        _mask_integral(msk, mask_ii)
    box = _target_box(gx, gy, int(step), img.shape, (ny, nx))
    _warp_into(img, var, msk, gx, gy, float(step), box, out.image, out.variance, out.mask, bad_ii, mask_ii,
               var if variance_mode == "pixel" else None, _LUT, NO_DATA, bool(conserve_flux))  # fmt: skip
    return out


def lanczos_weights(t: float) -> np.ndarray:
    """The six unit-sum Lanczos-3 weights of taps ``floor(s) - 2 … floor(s) + 3`` at fractional offset ``t``."""
    if not 0.0 <= t < 1.0:
        raise ValueError(f"fractional offset must be in [0, 1), not {t}")
    w = np.empty(6)
    _lanczos3(float(t), w)
    return w


def lanczos_noise_power(freqs: np.ndarray, n_phase: int = 64) -> np.ndarray:
    """Power transfer ``E_t |Σ_k w_k(t) e^{-2πi f k}|²`` of 1-D Lanczos-3 interpolation, averaged over
    uniform sub-pixel phases ``t``: the noise power spectrum (relative to white) of interpolated white noise
    at frequencies ``freqs`` (cycles per pixel). The 2-D spectrum is the product of the two axes'."""
    f = np.asarray(freqs, dtype=float)
    taps = np.arange(-2, 4)
    phase = np.exp(-2j * np.pi * np.multiply.outer(f, taps))
    total = np.zeros(f.shape)
    for t in (np.arange(n_phase) + 0.5) / n_phase:
        total += np.abs(phase @ lanczos_weights(t)) ** 2
    return total / n_phase
