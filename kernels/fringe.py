"""Fringes in the red bands: a robust least-squares amplitude of a fringe frame, and its subtraction."""

from __future__ import annotations

import math

import numpy as np

from kernels.arrays import readonly
from kernels.config import njit

__all__ = ["fit_fringe", "subtract_fringe"]


# ---------------------------------------------------------------------------------------------------


@njit
def _fringe_normal(image, fringe, mask, badbits, step, lo, hi, a0, a1, a2, a3, cut, ata, atb):
    """Normal equations of ``image ≈ a0 + a1 x' + a2 y' + a3 fringe`` over good pixels of a ``step`` grid
    whose residual from the current model lies within ``cut`` (infinite on the first pass)."""
    ny, nx = image.shape
    has_mask = mask.shape[0] == ny
    basis = np.empty(4)
    n = 0
    ssq = 0.0
    for y in range(0, ny, step):
        yn = 2.0 * y / max(ny - 1, 1) - 1.0
        for x in range(0, nx, step):
            if has_mask and (mask[y, x] & badbits) != 0:
                continue
            v = float(image[y, x])
            fr = float(fringe[y, x])
            if not (math.isfinite(v) and math.isfinite(fr)) or v < lo or v > hi:
                continue
            xn = 2.0 * x / max(nx - 1, 1) - 1.0
            r = v - (a0 + a1 * xn + a2 * yn + a3 * fr)
            if abs(r) > cut:
                continue
            basis[0] = 1.0
            basis[1] = xn
            basis[2] = yn
            basis[3] = fr
            for i in range(4):
                atb[i] += basis[i] * v
                for j in range(4):
                    ata[i, j] += basis[i] * basis[j]
            ssq += r * r
            n += 1
    return n, ssq


def fit_fringe(image, fringe, mask=None, bad_bits: int = 0, step: int = 2, nclip: float = 3.0, niter: int = 4):
    """Robust least-squares amplitude of a fringe frame in an image.

    Fits ``image ≈ c0 + cx x + cy y + amplitude * fringe`` (a plane for the sky and its gradient) by least
    squares on every ``step``-th pixel, excluding masked (``mask & bad_bits``), non-finite and, after the
    first pass, pixels more than ``nclip`` standard deviations from the model (stars, cosmic rays), over
    ``niter`` passes. The first pass also ignores pixels outside the 5-95 % percentile range.

    Parameters
    ----------
    image, fringe : numpy.ndarray
        2-D images of the same shape (the fringe frame in the image's units per unit amplitude).
    mask : numpy.ndarray, optional
        Integer mask plane; pixels with any of ``bad_bits`` are ignored.

    Returns
    -------
    float
        The amplitude (``image`` units per unit of ``fringe``).

    Raises
    ------
    ValueError
        Shapes differ, or too few good pixels to fit (fewer than 16).
    """
    image = readonly(np.asarray(image))
    fringe = readonly(np.asarray(fringe))
    if image.ndim != 2 or image.shape != fringe.shape:
        raise ValueError(f"image {image.shape} and fringe {fringe.shape} must be 2-D of the same shape")
    if mask is None:
        mask = np.zeros((0, 0), np.int32)
    elif mask.shape != image.shape:
        raise ValueError(f"mask has shape {mask.shape}, expected {image.shape}")
    mask = readonly(mask)
    if step < 1:
        raise ValueError("step must be ≥ 1")
    sub = image[::step, ::step]
    good = np.isfinite(sub) & np.isfinite(fringe[::step, ::step])
    if mask.shape[0]:
        good &= (mask[::step, ::step] & bad_bits) == 0
    if good.sum() < 16:
        raise ValueError("fewer than 16 good pixels to fit the fringe amplitude; is the image all masked or NaN?")
    lo, hi = np.percentile(sub[good], [5.0, 95.0])
    coef = np.zeros(4)
    cut = np.inf
    for it in range(max(1, niter)):
        ata = np.zeros((4, 4))
        atb = np.zeros(4)
        lo_i, hi_i = (lo, hi) if it == 0 else (-np.inf, np.inf)
        n, ssq = _fringe_normal(image, fringe, mask, int(bad_bits), int(step), float(lo_i), float(hi_i), *coef,
                                float(cut), ata, atb)  # fmt: skip
        if n < 16:
            raise ValueError("fewer than 16 good pixels to fit the fringe amplitude after clipping")
        coef = np.linalg.lstsq(ata, atb, rcond=None)[0]
        # Residual scatter of this fit for the next pass's clipping.
        _, ssq = _fringe_normal(image, fringe, mask, int(bad_bits), int(step), float(lo_i), float(hi_i), *coef,
                                float(cut), np.zeros((4, 4)), np.zeros(4))  # fmt: skip
        cut = nclip * math.sqrt(ssq / max(n - 4, 1))
    return float(coef[3])


def subtract_fringe(image: np.ndarray, fringe: np.ndarray, amplitude: float) -> np.ndarray:
    """``image - amplitude * fringe`` as a new float32 array (NaN stays NaN)."""
    if image.shape != fringe.shape:
        raise ValueError(f"image {image.shape} and fringe {fringe.shape} must have the same shape")
    out = np.asarray(image, np.float32).copy()
    out -= np.float32(amplitude) * np.asarray(fringe, np.float32)
    return out
