"""Slow, obvious references for :mod:`kernels.diffim`: direct convolution loops, 2-D basis images, numpy FFTs."""

import numpy as np
from scipy import ndimage, signal


def spatial_terms(order, xn, yn):
    return np.array([xn**i * yn**j for d in range(order + 1) for j in range(d + 1) for i in [d - j]])


def convolve_spatially_varying(image, kernels, order, background=None, border=0):
    """out[y, x] = Σ_{v,u} K(x̃, ỹ)[v, u] image[y - v, x - u] (zero outside) + b(x̃, ỹ), pixel by pixel;
    with ``border``, over the inner frame only (x̃, ỹ of the inner frame)."""
    if border:
        b = border
        ny, nx = image.shape[0] - 2 * b, image.shape[1] - 2 * b
        L = kernels.shape[1]
        h = L // 2
        out = np.zeros((ny, nx))
        cx, cy = (nx - 1) / 2, (ny - 1) / 2
        pad = np.zeros((image.shape[0] + 2 * h, image.shape[1] + 2 * h))
        pad[h:-h, h:-h] = image
        for y in range(ny):
            for x in range(nx):
                s = spatial_terms(order, (x - cx) / max(cx, 0.5), (y - cy) / max(cy, 0.5))
                k = np.tensordot(s, kernels, axes=(0, 0))
                window = pad[y + b : y + b + L, x + b : x + b + L][::-1, ::-1]
                out[y, x] = (k * window).sum() + (0.0 if background is None else s @ background)
        return out
    ny, nx = image.shape
    L = kernels.shape[1]
    h = L // 2
    pad = np.zeros((ny + 2 * h, nx + 2 * h))
    pad[h : h + ny, h : h + nx] = image
    out = np.zeros((ny, nx))
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    for y in range(ny):
        for x in range(nx):
            s = spatial_terms(order, (x - cx) / max(cx, 0.5), (y - cy) / max(cy, 0.5))
            k = np.tensordot(s, kernels, axes=(0, 0))
            window = pad[y : y + L, x : x + L][::-1, ::-1]  # window[v, u] = image[y - (v - h), x - (u - h)]
            out[y, x] = (k * window).sum() + (0.0 if background is None else s @ background)
    return out


def basis_images(gx, gy):
    return np.einsum("mv,mu->mvu", gy, gx)


def convolve_stamps(stamps, gx, gy):
    """Every 2-D basis image convolved with every stamp (scipy.signal.convolve2d, valid region)."""
    out = []
    for b in basis_images(gx, gy):
        out.append([signal.convolve2d(s, b, mode="valid") for s in stamps])
    return np.array(out)


def peaks(image, variance, mask, threshold, border):
    ny, nx = image.shape
    found = []
    for y in range(border, ny - border):
        for x in range(border, nx - border):
            v = image[y, x]
            if not v > 0 or mask[y, x] or not variance[y, x] > 0 or v * v < threshold**2 * variance[y, x]:
                continue
            nb = image[y - 1 : y + 2, x - 1 : x + 2].copy()
            before = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], bool)  # ties go to the first in raster order
            if (nb > v).any() or ((nb == v) & before).any():
                continue
            found.append((x, y, v))
    found.sort(key=lambda t: -t[2])
    return found


def dilate(mask, bit, radius):
    grown = ndimage.binary_dilation((mask & bit) != 0, structure=np.ones((2 * radius + 1, 2 * radius + 1), bool))
    return np.where(grown, mask | bit, mask)


def decorrelation(kernel, fshape, s2x, s2y, kappa):
    """φ̂ on the full complex FFT plane, and A = Σ φ², B = Σ (φ ⋆ K)² in real space (no warp)."""
    L = kernel.shape[0]
    h = L // 2
    kpad = np.zeros(fshape)
    kpad[:L, :L] = kernel
    kpad = np.roll(kpad, (-h, -h), axis=(0, 1))
    khat = np.fft.fft2(kpad)
    phi_hat = np.sqrt((s2x + kappa**2 * s2y) / (s2x + s2y * np.abs(khat) ** 2))
    phi = np.real(np.fft.ifft2(phi_hat))
    phik = np.real(np.fft.ifft2(phi_hat * khat))
    return phi_hat, float((phi**2).sum()), float((phik**2).sum())
