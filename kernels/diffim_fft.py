"""Image differencing in Fourier space: the spatially varying kernel applied by FFTs, and noise decorrelation.

The method is described in :mod:`kernels.diffim` (which re-exports everything here): the fitted
Alard–Lupton kernel is applied as ``Σ_p s_p(x, y) (K_p ⋆ Y)``, ``s_p`` the spatial polynomial terms of the
output position (:func:`spatial_terms`), each ``K_p ⋆ Y`` an FFT product whose kernel transform comes from a
separable DFT (:func:`kernel_spectrum`); :func:`decorrelation_filter` whitens the difference's noise (Reiss &
Lupton 2016).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft

from kernels.config import njit


# --------------------------------------------------------------------------------------------- spatial terms
def spatial_powers(order: int) -> list[tuple[int, int]]:
    """Exponents ``(i, j)`` of the spatial terms ``x̃^i ỹ^j``, ``i + j ≤ order``, constant first."""
    if order < 0:
        raise ValueError(f"spatial order must be ≥ 0, not {order}")
    return [(d - j, j) for d in range(order + 1) for j in range(d + 1)]


def spatial_terms(order: int, xn, yn) -> np.ndarray:
    """Values of the spatial terms at normalised positions (``x̃, ỹ`` in [-1, 1]): shape ``(n_terms, …)``."""
    xn, yn = np.asarray(xn, float), np.asarray(yn, float)
    return np.stack([xn**i * yn**j for i, j in spatial_powers(order)])


def normalised_position(x, y, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(x̃, ỹ)``: pixel positions mapped to [-1, 1] across an image of ``shape``."""
    ny, nx = shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    return (np.asarray(x, float) - cx) / max(cx, 0.5), (np.asarray(y, float) - cy) / max(cy, 0.5)


# --------------------------------------------------------------------------------------------- FFT
def fft_shape(shape: tuple[int, int], pad: int) -> tuple[int, int]:
    """Fast FFT sizes ≥ ``shape + pad`` (zero padding so that circular wrap only touches the border)."""
    return (scipy.fft.next_fast_len(shape[0] + pad, real=True), scipy.fft.next_fast_len(shape[1] + pad, real=True))


def kernel_spectrum(kernel: np.ndarray, fshape: tuple[int, int]) -> np.ndarray:
    """``rfft2`` of ``kernel`` (centre at the origin, wrapped) on an ``fshape`` grid, by a separable DFT."""
    L = kernel.shape[0]
    h = L // 2
    Ny, Nx = fshape
    u = np.arange(-h, h + 1)
    ex = np.exp(-2j * np.pi * np.outer(u, np.arange(Nx // 2 + 1)) / Nx).astype(np.complex64)
    ey = np.exp(-2j * np.pi * np.outer(np.arange(Ny), u) / Ny).astype(np.complex64)
    return ey @ (kernel.astype(np.complex64) @ ex)


def rfft_weights(fshape: tuple[int, int]) -> np.ndarray:
    """Multiplicity of each ``rfft2`` column in the full plane (1 for DC/Nyquist, else 2), over ``Ny·Nx``."""
    Ny, Nx = fshape
    w = np.full(Nx // 2 + 1, 2.0)
    w[0] = 1.0
    if Nx % 2 == 0:
        w[-1] = 1.0
    return w / (Ny * Nx)


def multiply_spectrum(image_hat: np.ndarray, kernel: np.ndarray, fshape, out: np.ndarray, rows: int = 512) -> None:
    """``out = image_hat · K̂`` with ``K̂`` = :func:`kernel_spectrum` of ``kernel`` on ``fshape``, built ``rows``
    frequency rows at a time (never the whole ``K̂`` plane: one image-sized complex buffer less at the peak of
    the convolution). ``out`` may be ``image_hat`` itself."""
    L = kernel.shape[0]
    h = L // 2
    Ny, Nx = fshape
    if image_hat.shape != (Ny, Nx // 2 + 1) or out.shape != image_hat.shape:
        raise ValueError(f"spectra must be {(Ny, Nx // 2 + 1)} for an FFT shape {fshape}, got {image_hat.shape}, "
                         f"{out.shape}")  # fmt: skip
    u = np.arange(-h, h + 1)
    ex = np.exp(-2j * np.pi * np.outer(u, np.arange(Nx // 2 + 1)) / Nx).astype(np.complex64)
    kx = kernel.astype(np.complex64) @ ex
    for r0 in range(0, Ny, rows):
        r1 = min(r0 + rows, Ny)
        ey = np.exp(-2j * np.pi * np.outer(np.arange(r0, r1), u) / Ny).astype(np.complex64)
        np.multiply(image_hat[r0:r1], ey @ kx, out=out[r0:r1])


@njit
def _decorrelation(khat, px, py_x, py_y, sx, sy, kappa2, phi, wcol, convolved_warped):
    """φ̂ of the module docstring on the rfft grid; returns (A, B) Parseval averages. ``py_x``/``py_y``: the
    warp's noise transfer along x (rfft frequencies) and y (full frequencies of these rows)."""
    Ny, Nc = phi.shape
    A = 0.0
    B = 0.0
    num = sx + kappa2 * sy
    for ky in range(Ny):
        for kx in range(Nc):
            p = py_x[kx] * py_y[ky]
            k2 = khat[ky, kx].real ** 2 + khat[ky, kx].imag ** 2
            if convolved_warped:
                px_ = 1.0
                py_ = p
            else:
                px_ = p
                py_ = 1.0
            den = sx * px_ + sy * py_ * k2
            f2 = num / den if den > 0 else 1.0
            phi[ky, kx] = math.sqrt(f2)
            A += wcol[kx] * f2 * px_
            B += wcol[kx] * f2 * py_ * k2
    return A, B


def decorrelation_filter(khat, fshape, sigma2_x: float, sigma2_y: float, kappa: float, warp_power=None,
                         convolved_warped: bool = True, decorrelate: bool = True):  # fmt: skip
    """The decorrelation filter ``φ̂`` (float32, rfft grid) and the variance factors ``(A, B)``.

    ``khat``: the kernel's spectrum on the rfft grid (:func:`kernel_spectrum`), or the kernel itself (a
    square 2-D array of odd size): its spectrum is then built a block of rows at a time, never as a whole
    (one complex image-sized plane less in memory).
    ``warp_power``: ``(P(fx), P(fy))`` 1-D noise transfers of the warp (None: an unwarped template, P = 1);
    ``convolved_warped``: whether the warped template is the convolved side. With ``decorrelate`` False,
    φ̂ = 1 and (A, B) are the plain variance factors of ``X - K ⋆ Y``.
    """
    Ny, Nx = fshape
    if khat.shape != (Ny, Nx // 2 + 1) and decorrelate:
        return _decorrelation_from_kernel(khat, fshape, sigma2_x, sigma2_y, kappa, warp_power, convolved_warped)
    if khat.shape != (Ny, Nx // 2 + 1):
        khat = kernel_spectrum(khat, fshape)
    if warp_power is None:
        px, py = np.ones(Nx // 2 + 1), np.ones(Ny)
    else:
        px, py = (np.ascontiguousarray(p, float) for p in warp_power)
    phi = np.empty((Ny, Nx // 2 + 1), np.float32)
    s2x, s2y = (sigma2_x, sigma2_y) if decorrelate else (1.0, 0.0)
    A, B = _decorrelation(khat, px, px, py, float(s2x), float(s2y), float(kappa) ** 2 if decorrelate else 0.0,
                          phi, rfft_weights(fshape), bool(convolved_warped))  # fmt: skip
    if not decorrelate:
        phi[:] = 1.0
        wcol = rfft_weights(fshape)
        k2 = np.abs(khat) ** 2
        pp = np.outer(py, px)
        ones = np.ones_like(pp)
        A = float(np.sum((ones if convolved_warped else pp) * wcol))
        B = float(np.sum(k2 * (pp if convolved_warped else ones) * wcol))
    return phi, float(A), float(B)


#: Rows per block of the row-wise (last-axis) transforms: the padded image and full-size inverse transforms
#: are never materialised, only blocks of this many rows.
FFT_ROWS = 256


def rfft2_padded(image: np.ndarray, fshape) -> np.ndarray:
    """``scipy.fft.rfft2(image, s=fshape)`` without its zero-padded copy of the image: the row transforms
    are done ``FFT_ROWS`` rows at a time into the output, the column transforms in place (complex64 for a
    float32 image). Peak memory: the output alone."""
    Ny, Nx = (int(v) for v in fshape)
    ny, nx = image.shape
    if ny > Ny or nx > Nx:
        raise ValueError(f"image {image.shape} is larger than the FFT shape {fshape}")
    out = np.empty((Ny, Nx // 2 + 1), np.result_type(image.dtype, np.complex64))
    for r0 in range(0, ny, FFT_ROWS):
        r1 = min(r0 + FFT_ROWS, ny)
        out[r0:r1] = scipy.fft.rfft(image[r0:r1], n=Nx, axis=1, workers=1)
    out[ny:] = 0
    return scipy.fft.fft(out, axis=0, workers=1, overwrite_x=True)


def _irfft_row_blocks(spec: np.ndarray, fshape, r0: int, r1: int):
    """Rows ``r0 … r1`` of ``irfft2(spec, s=fshape)`` in blocks ``(start, rows)``; ``spec`` must already be
    inverse-transformed along the columns (``scipy.fft.ifft(spec, axis=0)``)."""
    Nx = int(fshape[1])
    for a in range(r0, r1, FFT_ROWS):
        b = min(a + FFT_ROWS, r1)
        yield a, scipy.fft.irfft(spec[a:b], n=Nx, axis=1, workers=1)


def _decorrelation_from_kernel(kernel, fshape, sigma2_x, sigma2_y, kappa, warp_power, convolved_warped):
    """:func:`decorrelation_filter` from the kernel, its spectrum built ``FFT_ROWS`` frequency rows at a time."""
    kernel = np.asarray(kernel)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 != 1:
        raise ValueError(f"give the kernel's spectrum on the rfft grid of {tuple(fshape)} or a square odd-sized "
                         f"kernel, not an array of shape {kernel.shape}")  # fmt: skip
    Ny, Nx = fshape
    if warp_power is None:
        px, py = np.ones(Nx // 2 + 1), np.ones(Ny)
    else:
        px, py = (np.ascontiguousarray(p, float) for p in warp_power)
    h = kernel.shape[0] // 2
    u = np.arange(-h, h + 1)
    ex = np.exp(-2j * np.pi * np.outer(u, np.arange(Nx // 2 + 1)) / Nx).astype(np.complex64)
    kx = kernel.astype(np.complex64) @ ex
    phi = np.empty((Ny, Nx // 2 + 1), np.float32)
    wcol = rfft_weights(fshape)
    A = B = 0.0
    for r0 in range(0, Ny, FFT_ROWS):
        r1 = min(r0 + FFT_ROWS, Ny)
        ey = np.exp(-2j * np.pi * np.outer(np.arange(r0, r1), u) / Ny).astype(np.complex64)
        a, b = _decorrelation(ey @ kx, px, px, py[r0:r1], float(sigma2_x), float(sigma2_y), float(kappa) ** 2,
                              phi[r0:r1], wcol, bool(convolved_warped))  # fmt: skip
        A += a
        B += b
    return phi, float(A), float(B)


@njit
def _accumulate(out, part, tx, ty, px, py, first, off):
    """out (=, +=) x̃^px ỹ^py · part[y, x + off], over out's shape (``part``: the matching rows of the padded
    inverse transform; ``ty`` the rows' terms)."""
    ny, nx = out.shape
    for y in range(ny):
        sy = ty[py, y]
        for x in range(nx):
            v = tx[px, x] * sy * part[y, x + off]
            if first:
                out[y, x] = v
            else:
                out[y, x] += v


def convolve_spatial(image: np.ndarray, kernels: np.ndarray, spatial_order: int, fshape, background=None,
                     image_hat=None, border: int = 0) -> np.ndarray:  # fmt: skip
    """``Σ_p s_p(x̃, ỹ) (kernels[p] ⋆ image) + Σ_p s_p background[p]`` by FFTs (zero outside the image).

    ``image`` must be finite (zero-fill missing pixels first). ``image_hat``: its ``rfft2`` on ``fshape``
    if already computed (not modified). ``border``: the image carries that many extra pixels on every side (a
    template warped beyond the science frame, so that the convolution is valid up to the frame's edge); the
    result and the spatial terms ``x̃, ỹ`` are those of the inner frame. One inverse FFT per spatial term,
    accumulated in place. Returns float32 of the (inner) frame's shape.

    Memory: the transforms are complex64 (float32 images); besides the result, at most two image-sized
    buffers are alive at once (the image's transform and one product), one for the last (or only) spatial
    term, whose product overwrites the image's own transform; the padded image and the real inverse
    transforms only exist ``FFT_ROWS`` rows at a time.
    """
    ny, nx = image.shape[0] - 2 * border, image.shape[1] - 2 * border
    if ny < 1 or nx < 1:
        raise ValueError(f"border {border} leaves nothing of an image of shape {image.shape}")
    own_hat = image_hat is None
    if own_hat:
        image_hat = rfft2_padded(image, fshape)
    powers = spatial_powers(spatial_order)
    if kernels.shape[0] != len(powers):
        raise ValueError(f"{kernels.shape[0]} kernel terms for spatial order {spatial_order}; need {len(powers)}")
    xn, yn = normalised_position(np.arange(nx), np.arange(ny), (ny, nx))
    tx = np.stack([xn**i for i in range(spatial_order + 1)])
    ty = np.stack([yn**i for i in range(spatial_order + 1)])
    out = np.empty((ny, nx), np.float32)
    buf = None
    for p, (i, j) in enumerate(powers):
        last = p == len(powers) - 1
        if last and own_hat:
            buf = None  # the product overwrites the image's transform, no longer needed
            prod = image_hat
        else:
            prod = buf = np.empty_like(image_hat) if buf is None else buf
        multiply_spectrum(image_hat, kernels[p], fshape, prod)
        prod = scipy.fft.ifft(prod, axis=0, workers=1, overwrite_x=True)  # in place: the column transforms
        if buf is not None and not last:
            buf = prod
        for r0, part in _irfft_row_blocks(prod, fshape, border, border + ny):
            a = r0 - border
            b = a + part.shape[0]
            _accumulate(out[a:b], part, tx, np.ascontiguousarray(ty[:, a:b]), i, j, p == 0, border)
        del prod, part
    del buf, image_hat
    if background is not None and np.any(background):
        out += (
            spatial_terms(spatial_order, xn[None, :], yn[:, None])
            .T.dot(np.asarray(background, float))
            .T.astype(np.float32)
        )
    return out


def apply_filter(image: np.ndarray, phi: np.ndarray, fshape, out: np.ndarray | None = None) -> np.ndarray:
    """``irfft2(rfft2(image) · φ̂)`` cropped to the image (float32); ``image`` must be finite.

    ``out``: a float32 array of the image's shape to write the result into (it may be ``image`` itself).
    Memory: one complex transform besides the image and the result (no padded copies).
    """
    ny, nx = image.shape
    if out is None:
        out = np.empty((ny, nx), np.float32)
    elif out.shape != image.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {image.shape}, got {out.dtype} {out.shape}")
    f = rfft2_padded(image, fshape)  # the image is read here, before out is written
    f *= phi
    f = scipy.fft.ifft(f, axis=0, workers=1, overwrite_x=True)
    for r0, rows in _irfft_row_blocks(f, fshape, 0, ny):
        out[r0 : r0 + rows.shape[0]] = rows[:, :nx]
    return out
