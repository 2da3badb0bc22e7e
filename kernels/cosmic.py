"""Cosmic rays from the two snaps of a visit: detection, repair, and snap combination.

A visit is two back-to-back snaps of the same field. Stars, galaxies and the sky are in both (scaled by
exposure time); a cosmic ray hits one snap only. The scaled difference ``d = im0 - r * im1`` with
``r = t0 / t1`` and its significance ``z = d / sqrt(var0 + r**2 var1)`` find them:

* a **seed** is a pixel with ``z > nsigma`` (a cosmic ray in snap 0) or ``z < -nsigma`` (snap 1) whose jump is
  also a sizeable fraction of the other snap's value (``|d| > contrast * max(other, 0)``), which protects
  the cores of bright stars against small PSF or pointing changes between snaps;
* the ray is **grown** through the 8-connected pixels of the same sign with ``|z| > grow_nsigma``
  (the faint ends of a track);
* the result is **dilated** by ``dilate`` 3×3 steps (charge diffusion at the edges of the track).

Pixels masked in either snap (``bad_bits``) or non-finite never seed or grow a ray. Repair replaces a
ray's pixels in one snap by the other snap's value scaled by the exposure-time ratio (and its variance
likewise); the combination sums the repaired snaps, sums the variances and ORs the masks.
"""

from __future__ import annotations

import math

import numpy as np

from kernels.arrays import readonly
from kernels.config import njit

__all__ = ["find_snap_cosmic_rays", "combine_snaps"]


# The three passes over the planes below are branch-free (selects instead of early exits, `abs(v) < inf` for
# isfinite), so that they vectorise; _grow scans its seeds row by row instead of dividing each pixel's flat
# index. The same bits as before; timed ad hoc on a 4000×4072 snap pair with rays, NaN/inf and masked pixels
# (fastest of 4, this VM): _significance 114 → 80 ms, _grow 91 → 51 ms, _combine 160 → 87 ms.
@njit(error_model="numpy")
def _significance(im0, var0, m0, im1, var1, m1, r, bad_bits, nsigma, grow_nsigma, contrast, z, seed):
    """``z`` (NaN where unusable) and ``seed`` (1: ray in snap 0, 2: in snap 1, 0: none)."""
    ny, nx = im0.shape
    has_mask = m0.shape[0] == ny
    inf = np.inf
    nan = np.float32(np.nan)
    none, in0, in1 = np.uint8(0), np.uint8(1), np.uint8(2)
    for y in range(ny):
        for x in range(nx):
            a = im0[y, x]
            b = im1[y, x]
            v = var0[y, x] + r * r * var1[y, x]
            usable = (abs(a) < inf) & (abs(b) < inf) & (abs(v) < inf) & (v > 0)
            if has_mask:
                usable &= ((m0[y, x] | m1[y, x]) & bad_bits) == 0
            d = a - r * b
            zz = d / math.sqrt(v)  # (NaN where v ≤ 0: not usable anyway)
            z[y, x] = zz if usable else nan
            ray0 = usable & (zz > nsigma) & (d > contrast * max(r * b, 0.0))
            ray1 = usable & (zz < -nsigma) & (-d > contrast * max(a, 0.0))
            seed[y, x] = in0 if ray0 else (in1 if ray1 else none)


@njit
def _push(stack, top, value):
    if top == stack.shape[0]:
        bigger = np.empty(2 * stack.shape[0], np.int64)
        for k in range(top):
            bigger[k] = stack[k]
        stack = bigger
    stack[top] = value
    return stack


@njit
def _grow(z, seed, grow_nsigma, label):
    """Flood-fill from the seeds through same-sign pixels with ``|z| > grow_nsigma`` (8-connected)."""
    ny, nx = z.shape
    for y in range(ny):
        for x in range(nx):
            label[y, x] = seed[y, x]
    stack = np.empty(4096, np.int64)
    for y0 in range(ny):
        for x0 in range(nx):
            lab = seed[y0, x0]
            if lab == 0:
                continue
            sign = 1.0 if lab == 1 else -1.0
            stack[0] = y0 * nx + x0
            top = 1
            while top > 0:
                top -= 1
                p = stack[top]
                cy = p // nx
                cx = p - cy * nx
                for yy in range(max(cy - 1, 0), min(cy + 2, ny)):
                    for xx in range(max(cx - 1, 0), min(cx + 2, nx)):
                        if label[yy, xx] != 0:
                            continue
                        zz = z[yy, xx]
                        if sign * zz > grow_nsigma:  # False for NaN
                            label[yy, xx] = lab
                            stack = _push(stack, top, yy * nx + xx)
                            top += 1


@njit
def _dilate(src, dst, value):
    """``dst[y, x] = 1`` where any 3×3 neighbour of ``src`` equals ``value`` (``dst`` zeroed first)."""
    ny, nx = src.shape
    for y in range(ny):
        for x in range(nx):
            dst[y, x] = 0
    for y in range(ny):
        for x in range(nx):
            if src[y, x] != value:
                continue
            for yy in range(max(y - 1, 0), min(y + 2, ny)):
                for xx in range(max(x - 1, 0), min(x + 2, nx)):
                    dst[yy, xx] = 1


def _check_pair(im0, var0, im1, var1, mask0, mask1):
    arrs = [np.asarray(a) for a in (im0, var0, im1, var1)]
    shape = arrs[0].shape
    if arrs[0].ndim != 2:
        raise ValueError(f"snap images must be 2-D, got shape {shape}")
    for name, a in zip(("var0", "im1", "var1"), arrs[1:]):
        if a.shape != shape:
            raise ValueError(f"{name} has shape {a.shape}; im0 is {shape}")
    masks = []
    for name, m in (("mask0", mask0), ("mask1", mask1)):
        if m is None:
            masks.append(np.zeros((0, 0), np.int32))
        else:
            m = np.asarray(m)
            if m.shape != shape or m.dtype.kind not in "iu":
                raise ValueError(f"{name} must be an integer array of shape {shape}, got {m.dtype} {m.shape}")
            masks.append(readonly(np.ascontiguousarray(m, np.int32)))
    if (masks[0].shape[0] == 0) != (masks[1].shape[0] == 0):
        masks = [m if m.shape[0] else readonly(np.zeros(shape, np.int32)) for m in masks]
    masks = [readonly(m) for m in masks]
    return [readonly(np.ascontiguousarray(a, np.float32)) for a in arrs], masks


def _ratio(t0: float, t1: float) -> float:
    if not (math.isfinite(t0) and math.isfinite(t1) and t0 > 0 and t1 > 0):
        raise ValueError(f"snap exposure times must be positive and finite, got {t0} and {t1}")
    return float(t0) / float(t1)


def find_snap_cosmic_rays(im0, var0, im1, var1, t0: float = 1.0, t1: float = 1.0, *, mask0=None, mask1=None,
                          bad_bits: int = 0, nsigma: float = 5.0, grow_nsigma: float = 2.5, contrast: float = 0.1,
                          dilate: int = 1):  # fmt: skip
    """Cosmic-ray masks of two snaps of the same field.

    Parameters
    ----------
    im0, var0, im1, var1 : numpy.ndarray
        Images (electrons) and variances of snap 0 and snap 1, same shape; not modified.
    t0, t1 : float
        Exposure times of the snaps (the scene scales with them).
    mask0, mask1 : numpy.ndarray, optional
        Integer mask planes; a pixel with any of ``bad_bits`` in either is never a ray seed or grown into.
    nsigma : float
        Seed threshold on ``|z|``.
    grow_nsigma : float
        Growth threshold on ``|z|`` (same sign as the seed), ``<= nsigma``.
    contrast : float
        A seed's jump must exceed this fraction of the other snap's (scaled) value.
    dilate : int
        Number of 3×3 dilations of the grown rays.

    Returns
    -------
    cr0, cr1 : numpy.ndarray
        Boolean masks of the rays in snap 0 and in snap 1.
    """
    (a, va, b, vb), (m0, m1) = _check_pair(im0, var0, im1, var1, mask0, mask1)
    r = _ratio(t0, t1)
    if not (0 < grow_nsigma <= nsigma):
        raise ValueError(f"need 0 < grow_nsigma <= nsigma, got {grow_nsigma} and {nsigma}")
    if dilate < 0 or contrast < 0:
        raise ValueError("dilate and contrast must be ≥ 0")
    shape = a.shape
    z = np.empty(shape, np.float32)
    seed = np.empty(shape, np.uint8)
    _significance(a, va, m0, b, vb, m1, r, int(bad_bits), float(nsigma), float(grow_nsigma), float(contrast), z, seed)
    label = np.empty(shape, np.uint8)
    _grow(z, seed, float(grow_nsigma), label)
    out = []
    for value in (1, 2):  # the first dilation reads the labels, the result (0 or 1) is the boolean mask itself
        if dilate == 0:
            out.append(label == value)
            continue
        cur = np.empty(shape, np.uint8)
        _dilate(label, cur, value)
        tmp = np.empty(shape, np.uint8) if dilate > 1 else None  # (a second plane only to swap with)
        for _ in range(dilate - 1):
            _dilate(cur, tmp, 1)
            cur, tmp = tmp, cur
        out.append(cur.view(np.bool_))
    return out[0], out[1]


@njit(error_model="numpy")
def _combine(im0, var0, m0, im1, var1, m1, cr0, cr1, r, cr_bit, intrp_bit, image, variance, mask):
    ny, nx = im0.shape
    r2 = r * r
    inf = np.inf
    for y in range(ny):
        for x in range(nx):
            a, va = im0[y, x], var0[y, x]
            b, vb = im1[y, x], var1[y, x]
            ok0 = (abs(a) < inf) & (abs(va) < inf)
            ok1 = (abs(b) < inf) & (abs(vb) < inf)
            c0 = cr0[y, x] != 0
            c1 = cr1[y, x] != 0
            from1 = (c0 | ~ok0) & ~c1 & ok1  # snap 0's pixel repaired from snap 1
            from0 = (c1 | ~ok1) & ~c0 & ok0  # and the other way (the two exclude each other)
            image[y, x] = (r * b if from1 else a) + (a / r if from0 else b)
            variance[y, x] = (r2 * vb if from1 else va) + (va / r2 if from0 else vb)
            mask[y, x] = m0[y, x] | m1[y, x] | (cr_bit if c0 | c1 else 0) | (intrp_bit if from1 | from0 else 0)


def combine_snaps(im0, var0, mask0, im1, var1, mask1, cr0, cr1, t0: float = 1.0, t1: float = 1.0, *, cr_bit: int,
                  intrp_bit: int, out=None):  # fmt: skip
    """Repair the cosmic rays of each snap from the other, and sum the snaps.

    Where a pixel is a ray (or non-finite) in one snap only, that snap's value is replaced by the other's
    scaled by ``t0 / t1`` (or its inverse) and its variance by the other's times the ratio squared, and
    ``intrp_bit`` is set. Every ray pixel gets ``cr_bit``; a pixel that is a ray in both snaps keeps its
    values (it stays flagged CR).

    ``out``: optional ``(image, variance, mask)`` planes (C-contiguous float32, float32, int32 of the snaps'
    shape) to write the result into. They may be the planes of either snap (each output pixel depends only
    on the same pixel of the inputs): a worker combines in place into snap 0 and saves a third set of planes.
    Otherwise the inputs are not modified.

    Returns
    -------
    image, variance, mask : numpy.ndarray
        float32 sum of the snaps, float32 sum of the variances, int32 OR of the masks with the new bits.
    """
    (a, va, b, vb), (m0, m1) = _check_pair(im0, var0, im1, var1, mask0, mask1)
    shape = a.shape
    if m0.shape[0] == 0:
        m0 = m1 = readonly(np.zeros(shape, np.int32))
    crs = []
    for name, c in (("cr0", cr0), ("cr1", cr1)):
        c = np.asarray(c)
        if c.shape != shape:
            raise ValueError(f"{name} has shape {c.shape}; the snaps are {shape}")
        crs.append(readonly(np.ascontiguousarray(c, np.uint8)))
    r = _ratio(t0, t1)
    if out is None:
        image, variance, mask = np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, np.int32)
    else:
        image, variance, mask = out
        for name, arr, dtype in (("image", image, np.float32), ("variance", variance, np.float32),
                                 ("mask", mask, np.int32)):  # fmt: skip
            if not isinstance(arr, np.ndarray) or arr.shape != shape or arr.dtype != dtype or \
                    not arr.flags.c_contiguous or not arr.flags.writeable:  # fmt: skip
                raise ValueError(f"out {name} must be a writeable C-contiguous {np.dtype(dtype)} array of shape "
                                 f"{shape}")  # fmt: skip
    _combine(a, va, m0, b, vb, m1, crs[0], crs[1], r, np.int32(cr_bit), np.int32(intrp_bit), image, variance, mask)
    return image, variance, mask
