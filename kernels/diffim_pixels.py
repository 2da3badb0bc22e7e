"""Per-pixel passes of the differencing (:mod:`kernels.diffim`): the science/template pair prepared in one
pass (zero-filled planes, a per-pixel code, the output mask), missing pixels zero-filled, the subtraction,
the final pass (scaling, variance, template side, NaN where missing, noise statistics), the quartiles of the
difference's pulls and mask dilation.

Each is a serial ``@njit`` core writing into the arrays it is given and a validating wrapper; every output
pixel depends only on the same input pixel (except the dilation), so outputs may be their own inputs —
what lets the stage reuse planes instead of allocating (issue 7). Imported into :mod:`kernels.diffim`,
whose names they are.
"""

from __future__ import annotations

import math

import numpy as np

from kernels.config import njit

NO_DATA = 2

# --------------------------------------------------------------------------------------------- pair passes
#: Bits of the per-pixel code of :func:`prepare_pair`.
CODE_SCIENCE_MISSING, CODE_TEMPLATE_MISSING, CODE_FLAGGED = 1, 2, 4


@njit
def _prepare_pair(s_img, s_var, s_mask, t_img, t_var, t_mask, nd, keep, flag, o_s, o_sv, o_t, o_tv, code, mask_out,
                  copy_science):  # fmt: skip
    ny, nx = s_img.shape
    ns = 0
    nt = 0
    for y in range(ny):
        for x in range(nx):
            c = 0
            a, av, am = s_img[y, x], s_var[y, x], s_mask[y, x]
            b, bv, bm = t_img[y, x], t_var[y, x], t_mask[y, x]
            if (am & nd) != 0 or not (np.isfinite(a) and np.isfinite(av)):
                c |= 1
                ns += 1
                if copy_science:
                    o_s[y, x] = 0.0
                    o_sv[y, x] = 0.0
            elif copy_science:
                o_s[y, x] = a
                o_sv[y, x] = av
            if (bm & nd) != 0 or not (np.isfinite(b) and np.isfinite(bv)):
                c |= 2
                nt += 1
                o_t[y, x] = 0.0
                o_tv[y, x] = 0.0
            else:
                o_t[y, x] = b
                o_tv[y, x] = bv
            m = (am | (bm & ~nd)) & keep
            if c != 0:
                m |= nd
            if ((am | bm) & flag) != 0:
                c |= 4
            code[y, x] = c
            mask_out[y, x] = m
    return ns, nt


def prepare_pair(s_img, s_var, s_mask, t_img, t_var, t_mask, no_data: int = NO_DATA, keep_bits: int = -1,
                 flag_bits: int = -1, out=None, copy_science: bool = True):  # fmt: skip
    """One pass over a science/template pair on the same grid.

    Returns float32 zero-filled copies ``(s, s_var, t, t_var)`` (missing pixels → 0), a uint8 ``code``
    (:data:`CODE_SCIENCE_MISSING` | :data:`CODE_TEMPLATE_MISSING` | :data:`CODE_FLAGGED` where either mask
    has a bit of ``flag_bits``), the int32 output mask (the ``keep_bits`` of the science mask and of the
    template mask, ``no_data`` where either side is missing — NaN/inf image or variance, or the ``no_data``
    bit), and the counts of missing pixels per side.

    ``out``: four float32 planes of the pair's shape (None entries are allocated) for ``(s, s_var, t,
    t_var)``; each may be its own input plane (every output pixel depends only on the same input pixel), so
    a caller that owns the template can zero-fill it in place instead of copying it.

    ``copy_science``: False skips the science copies (``s`` and ``s_var`` come back as None and their
    ``out`` entries must be None): for a caller that reads the science planes only where ``code`` says
    they are present, e.g. when the template is the convolved side (two image-sized planes less; issue 7).
    """
    shape = s_img.shape
    for name, a in (("s_var", s_var), ("s_mask", s_mask), ("t_img", t_img), ("t_var", t_var), ("t_mask", t_mask)):
        if a.shape != shape:
            raise ValueError(f"{name} has shape {a.shape}; the science image is {shape}")
    given = (None,) * 4 if out is None else tuple(out)
    if len(given) != 4:
        raise ValueError("out must hold four planes (s, s_var, t, t_var) or None entries")
    if not copy_science and (given[0] is not None or given[1] is not None):
        raise ValueError("with copy_science=False the science entries of out (s, s_var) must be None")
    out = [np.empty(shape if copy_science or k >= 2 else (0, 0), np.float32) if a is None else a
           for k, a in enumerate(given)]  # fmt: skip
    for a in out[0 if copy_science else 2 :]:
        if a.shape != shape or a.dtype != np.float32 or not a.flags.writeable:
            raise ValueError(f"out planes must be writeable float32 arrays of shape {shape}")
    code = np.empty(shape, np.uint8)
    mask = np.empty(shape, np.int32)
    ns, nt = _prepare_pair(s_img, s_var, s_mask, t_img, t_var, t_mask, int(no_data), int(keep_bits), int(flag_bits),
                           *out, code, mask, bool(copy_science))  # fmt: skip
    if not copy_science:
        out[0] = out[1] = None
    return (*out, code, mask, int(ns), int(nt))


@njit
def _fill_missing(image, mask, nd, out):
    ny, nx = image.shape
    n = 0
    for y in range(ny):
        for x in range(nx):
            v = image[y, x]
            if (mask[y, x] & nd) != 0 or not np.isfinite(v):
                out[y, x] = 0.0
                n += 1
            else:
                out[y, x] = v
    return n


def fill_missing(image, mask, no_data: int = NO_DATA):
    """float32 copy of ``image`` with NaN/inf or ``no_data``-flagged pixels set to 0, and their count."""
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image's {image.shape}")
    out = np.empty(image.shape, np.float32)
    return out, int(_fill_missing(image, mask, int(no_data), out))


@njit
def _zero_missing(image, variance, mask, nd):
    ny, nx = image.shape
    n = 0
    for y in range(ny):
        for x in range(nx):
            if (mask[y, x] & nd) != 0 or not (np.isfinite(image[y, x]) and np.isfinite(variance[y, x])):
                image[y, x] = 0.0
                variance[y, x] = 0.0
                mask[y, x] |= nd
                n += 1
    return n


def zero_missing(image, variance, mask, no_data: int = NO_DATA) -> int:
    """In place: where ``mask`` has ``no_data`` or the image or variance is NaN/inf, set both to 0 and the
    ``no_data`` bit; returns how many pixels that was (the in-place form of :func:`fill_missing` for
    planes the caller owns, e.g. a freshly warped template)."""
    for name, a, kind in (("image", image, "f"), ("variance", variance, "f"), ("mask", mask, "iu")):
        if a.shape != image.shape or a.dtype.kind not in kind or not a.flags.writeable:
            raise ValueError(f"{name} must be a writeable {'float' if kind == 'f' else 'integer'} array of shape "
                             f"{image.shape}, got {a.dtype} {a.shape}")  # fmt: skip
    return int(_zero_missing(image, variance, mask, int(no_data)))


@njit
def _subtract(diff, x, matched, code):
    ny, nx = diff.shape
    for y in range(ny):
        for xx in range(nx):
            diff[y, xx] = 0.0 if (code[y, xx] & 3) != 0 else x[y, xx] - matched[y, xx]


def subtract_images(x, matched, code, out: np.ndarray | None = None) -> np.ndarray:
    """``x - matched`` (float32), 0 where ``code`` says either side is missing (so FFTs stay finite).

    ``out``: a float32 array of ``x``'s shape to write into (may be ``x`` or ``matched``)."""
    diff = np.empty(x.shape, np.float32) if out is None else out
    if diff.shape != x.shape or diff.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {x.shape}, got {diff.dtype} {diff.shape}")
    _subtract(diff, x, matched, code)
    return diff


@njit
def _finalize(diff, variance, template, t_src, x_var, y_var, a, b, inv_scale, t_scale, mask, nd, stats):
    ny, nx = diff.shape
    nan = np.float32(np.nan)
    s1 = 0.0
    s2 = 0.0
    n = 0
    for y in range(ny):
        for x in range(nx):
            if (mask[y, x] & nd) != 0:
                diff[y, x] = nan
                variance[y, x] = nan
                template[y, x] = nan
                continue
            d = diff[y, x] * inv_scale
            v = (a * x_var[y, x] + b * y_var[y, x]) * inv_scale * inv_scale
            diff[y, x] = d
            variance[y, x] = v
            template[y, x] = t_src[y, x] * t_scale
            if mask[y, x] == 0 and v > 0:
                z = d / math.sqrt(v)
                s1 += z
                s2 += z * z
                n += 1
    stats[0] = s1
    stats[1] = s2
    stats[2] = n


def finalize_difference(diff, x_var, y_var, a: float, b: float, scale: float, t_src, t_scale: float, mask,
                        no_data: int = NO_DATA, variance_out=None, template_out=None):  # fmt: skip
    """In one pass: ``diff /= scale``; variance ``(a x_var + b y_var) / scale²``; the template side
    ``t_src · t_scale``; NaN in all three where ``mask`` has ``no_data``. ``diff`` is modified in place.

    Returns ``(variance, template, (mean, rms))`` — the mean and rms of ``diff / sqrt(variance)`` over
    pixels with an empty mask (NaN when there are none). ``variance_out``, ``template_out``: float32 planes
    of ``diff``'s shape to write them into instead of new arrays; each may be one of its own inputs
    (``x_var`` or ``y_var``; ``t_src``), as every output pixel depends only on the same input pixel.
    """
    variance = np.empty(diff.shape, np.float32) if variance_out is None else variance_out
    template = np.empty(diff.shape, np.float32) if template_out is None else template_out
    for name, plane in (("variance_out", variance), ("template_out", template)):
        if plane.shape != diff.shape or plane.dtype != np.float32 or not plane.flags.writeable:
            raise ValueError(f"{name} must be a writeable float32 array of shape {diff.shape}")
    stats = np.zeros(3)
    _finalize(diff, variance, template, t_src, x_var, y_var, float(a), float(b), 1.0 / float(scale), float(t_scale),
              mask, int(no_data), stats)  # fmt: skip
    if stats[2] == 0:
        return variance, template, (float("nan"), float("nan"))
    mean = stats[0] / stats[2]
    return variance, template, (float(mean), float(math.sqrt(max(stats[1] / stats[2] - mean * mean, 0.0))))


# --------------------------------------------------------------------------------------------- pull quartiles
#: Histogram of :func:`pull_quartiles`: 8192 bins of 1/256 σ over ±16 σ, plus one below and one above.
_PULL_LO, _PULL_SCALE, _PULL_BINS = -16.0, 256.0, 8192


@njit(inline="always")
def _pull_bin(image, variance, mask, bad, y, x, lo, scale, nb):
    """``(bin, pull)`` of one pixel — ``image / sqrt(variance)`` in float32 to the bit of numpy's (a float32
    quotient and square root rounded once from float64: exact) — or ``(-1, 0)`` if it is not used."""
    v = variance[y, x]
    d = image[y, x]
    if (mask[y, x] & bad) != 0 or not v > 0 or not np.isfinite(d):
        return -1, np.float32(0.0)
    z = np.float32(np.float64(d) / np.float64(np.float32(math.sqrt(np.float64(v)))))
    u = (np.float64(z) - lo) * scale
    if u < 0:
        return 0, z
    if u >= nb:
        return nb + 1, z
    return 1 + int(u), z


@njit
def _pull_histogram(image, variance, mask, bad, lo, scale, hist):
    ny, nx = image.shape
    nb = hist.shape[0] - 2
    for y in range(ny):
        for x in range(nx):
            b, _ = _pull_bin(image, variance, mask, bad, y, x, lo, scale, nb)
            if b >= 0:
                hist[b] += 1


@njit
def _pull_collect(image, variance, mask, bad, lo, scale, nb, slot, start, out):
    """The pulls of the bins with ``slot[bin] >= 0``, each bin's at ``out[start[slot]:]``."""
    ny, nx = image.shape
    fill = start.copy()
    for y in range(ny):
        for x in range(nx):
            b, z = _pull_bin(image, variance, mask, bad, y, x, lo, scale, nb)
            if b >= 0 and slot[b] >= 0:
                out[fill[slot[b]]] = z
                fill[slot[b]] += 1


def pull_quartiles(image, variance, mask, bad_bits: int) -> tuple[float, float, int]:
    """The 25th and 75th percentiles of the pulls ``image / sqrt(variance)`` over the pixels without
    ``bad_bits`` in ``mask``, a positive variance and a finite image, and how many pixels that is —
    ``np.percentile(pulls, [25, 75])`` (linear interpolation) without the pulls' array or its partition.

    Two passes: a histogram of the pulls (1/256 σ bins over ±16 σ) finds the bins of the four order
    statistics the two percentiles interpolate between; the second keeps only those bins' pulls, sorted to
    find them. A quartile outside ±16 σ (no use as a noise estimate, but still answered exactly) falls back to
    numpy. NaN, NaN, 0 when no pixel is used.
    """
    for name, a in (("image", image), ("variance", variance), ("mask", mask)):
        if a.shape != image.shape or a.ndim != 2:
            raise ValueError(f"{name} must be 2-D with the image's shape {image.shape}, got {a.shape}")
    if mask.dtype.kind not in "iu":
        raise ValueError(f"mask must be an integer array, got {mask.dtype}")
    nb = _PULL_BINS
    hist = np.zeros(nb + 2, np.int64)
    _pull_histogram(image, variance, mask, int(bad_bits), _PULL_LO, _PULL_SCALE, hist)
    n = int(hist.sum())
    if n == 0:
        return math.nan, math.nan, 0
    ranks = []
    for q in (0.25, 0.75):
        idx = q * (n - 1)
        k = int(math.floor(idx))
        ranks.append((k, min(k + 1, n - 1), idx - k))
    cum = np.cumsum(hist)
    need = sorted({int(np.searchsorted(cum, r, side="right")) for k0, k1, _ in ranks for r in (k0, k1)})
    if need[0] == 0 or need[-1] == nb + 1:  # a quartile beyond ±16 σ
        good = ((mask & bad_bits) == 0) & (variance > 0) & np.isfinite(image)
        q25, q75 = np.percentile(image[good] / np.sqrt(variance[good]), [25, 75])
        return float(q25), float(q75), n
    slot = np.full(nb + 2, -1, np.int64)
    start = np.zeros(len(need), np.int64)
    total = 0
    for i, b in enumerate(need):
        slot[b] = i
        start[i] = total
        total += int(hist[b])
    vals = np.empty(total, np.float32)
    _pull_collect(image, variance, mask, int(bad_bits), _PULL_LO, _PULL_SCALE, nb, slot, start, vals)
    for i, b in enumerate(need):
        vals[start[i] : start[i] + hist[b]].sort()  # each bin's pulls in order, in place

    def order_stat(r: int) -> float:
        b = int(np.searchsorted(cum, r, side="right"))
        return float(vals[start[slot[b]] + r - int(cum[b - 1])])

    out = []
    for k0, k1, t in ranks:
        a, b = order_stat(k0), order_stat(k1)
        out.append(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)  # numpy's linear interpolation
    return out[0], out[1], n


# --------------------------------------------------------------------------------------------- masks
@njit
def _dilate_rows(src, bit, r, dst):
    ny, nx = src.shape
    for y in range(ny):
        last = -(10**9)
        for x in range(nx):  # distance to the last flagged pixel on the left
            if (src[y, x] & bit) != 0:
                last = x
            if x - last <= r:
                dst[y, x] = 1
        last = 10**9
        for x in range(nx - 1, -1, -1):
            if (src[y, x] & bit) != 0:
                last = x
            if last - x <= r:
                dst[y, x] = 1


@njit
def _dilate_cols(src, r, out, bit):
    ny, nx = src.shape
    for x in range(nx):
        last = -(10**9)
        for y in range(ny):
            if src[y, x] != 0:
                last = y
            if y - last <= r:
                out[y, x] |= bit
        last = 10**9
        for y in range(ny - 1, -1, -1):
            if src[y, x] != 0:
                last = y
            if last - y <= r:
                out[y, x] |= bit


def dilate_bit(mask: np.ndarray, bit: int, radius: int) -> None:
    """Grow the pixels carrying ``bit`` by a (2 radius + 1)² square, in place."""
    if radius <= 0 or not (mask & bit).any():
        return
    tmp = np.zeros(mask.shape, np.uint8)
    _dilate_rows(mask, bit, int(radius), tmp)
    _dilate_cols(tmp, int(radius), mask, bit)


def border_bit(mask: np.ndarray, bit: int, width: int) -> None:
    """Set ``bit`` on the ``width``-pixel border of ``mask``, in place."""
    if width <= 0:
        return
    mask[:width] |= bit
    mask[-width:] |= bit
    mask[:, :width] |= bit
    mask[:, -width:] |= bit
