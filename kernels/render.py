"""Image-formation kernels for the simulator: PSF stamps, sky and instrument composition with photon
noise, cosmic rays, saturation with bleed trails, and digitisation of amplifier segments.

Random numbers come from numba's per-thread generator, seeded by the caller for every call, so a given
seed always gives the same pixels (the kernels are serial: one thread, one stream).
"""

from __future__ import annotations

import math

import numpy as np

from kernels.config import njit

# ---------------------------------------------------------------------------------------------------
# PSF stamps
# ---------------------------------------------------------------------------------------------------


@njit
def _stamp_weights(w, dx, dy, alpha, beta, qxx, qxy, qyy, radius, sub):
    """Moffat weights on a (2R+1)² stamp centred at offset (dx, dy); returns their sum."""
    n = 2 * radius + 1
    total = 0.0
    core2 = (2.0 * alpha + 1.5) ** 2
    inv_sub = 1.0 / sub
    for j in range(n):
        yy = j - radius - dy
        for i in range(n):
            xx = i - radius - dx
            if xx * xx + yy * yy > (radius + 0.5) ** 2:
                w[j, i] = 0.0
                continue
            if xx * xx + yy * yy < core2 and sub > 1:
                acc = 0.0
                for sj in range(sub):
                    y = yy + (sj + 0.5) * inv_sub - 0.5
                    for si in range(sub):
                        x = xx + (si + 0.5) * inv_sub - 0.5
                        u = (qxx * x * x + 2.0 * qxy * x * y + qyy * y * y) / (alpha * alpha)
                        acc += math.exp(-beta * math.log1p(u))
                v = acc * inv_sub * inv_sub
            else:
                u = (qxx * xx * xx + 2.0 * qxy * xx * yy + qyy * yy * yy) / (alpha * alpha)
                v = math.exp(-beta * math.log1p(u))
            w[j, i] = v
            total += v
    return total


@njit
def _add_moffat_sources(image, xs, ys, fluxes, fwhms, betas, e1s, e2s, radii, sub):
    ny, nx = image.shape
    rmax = 0
    for k in range(xs.shape[0]):
        rmax = max(rmax, radii[k])
    w = np.empty((2 * rmax + 1, 2 * rmax + 1))
    for k in range(xs.shape[0]):
        r = radii[k]
        cx = int(math.floor(xs[k] + 0.5))
        cy = int(math.floor(ys[k] + 0.5))
        if cx + r < 0 or cy + r < 0 or cx - r >= nx or cy - r >= ny:
            continue
        beta = betas[k]
        alpha = fwhms[k] / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
        e1, e2 = e1s[k], e2s[k]
        det = math.sqrt(max(1.0 - e1 * e1 - e2 * e2, 1e-6))
        # Inverse of the unit-determinant shape matrix [[1+e1, e2], [e2, 1-e1]] / det.
        qxx, qxy, qyy = (1.0 - e1) / det, -e2 / det, (1.0 + e1) / det
        total = _stamp_weights(w, xs[k] - cx, ys[k] - cy, alpha, beta, qxx, qxy, qyy, r, sub)
        if total <= 0.0:
            continue
        scale = fluxes[k] / total
        for j in range(2 * r + 1):
            y = cy - r + j
            if y < 0 or y >= ny:
                continue
            for i in range(2 * r + 1):
                x = cx - r + i
                if 0 <= x < nx:
                    image[y, x] += w[j, i] * scale


def moffat_fwhm_to_alpha(fwhm: float, beta: float) -> float:
    """Moffat core width ``alpha`` for a FWHM (same units) and index ``beta``."""
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def stamp_radius(flux, fwhm, beta, floor_e: float = 0.05, rmin: int = 4, rmax: int = 150) -> np.ndarray:
    """Stamp radius (pixels) where a Moffat source of total ``flux`` falls below ``floor_e`` electrons per pixel.

    The rendered flux is renormalised inside the stamp, so the stamp holds exactly ``flux``; the radius
    only decides how far the wings are drawn.
    """
    flux = np.asarray(flux, dtype=float)
    fwhm = np.broadcast_to(np.asarray(fwhm, dtype=float), flux.shape)
    beta = np.broadcast_to(np.asarray(beta, dtype=float), flux.shape)
    alpha = moffat_fwhm_to_alpha(fwhm, beta)
    peak = flux * (beta - 1.0) / (np.pi * alpha**2)
    ratio = np.maximum(peak / floor_e, 1.0)
    r = alpha * np.sqrt(np.maximum(ratio ** (1.0 / beta) - 1.0, 0.0))
    r = np.maximum(r, 2.5 * fwhm)
    return np.clip(np.ceil(r), rmin, rmax).astype(np.int64)


def add_moffat_sources(image, x, y, flux, fwhm, beta, e1, e2, radius=None, subsample: int = 3) -> None:
    """Add elliptical Moffat sources to ``image`` in place.

    Parameters
    ----------
    image : numpy.ndarray
        2-D float32 or float64 image, modified in place.
    x, y : array_like
        Source centres in 0-based pixel coordinates (pixel centres at integers).
    flux : array_like
        Total flux of each source, in the image's units; the stamp is normalised to hold exactly this flux
        (part of it falls off the image for sources near an edge).
    fwhm, beta, e1, e2 : array_like or float
        Moffat FWHM (pixels), index, and ellipticity components of each source.
    radius : array_like, optional
        Stamp radius per source; by default from :func:`stamp_radius`.
    subsample : int
        Sub-pixel sampling per axis in the core (pixel integration of the profile).
    """
    if image.ndim != 2 or image.dtype not in (np.float32, np.float64):
        raise ValueError(f"image must be a 2-D float32/float64 array, got {image.dtype} with shape {image.shape}")
    x = np.ascontiguousarray(x, dtype=np.float64)
    n = x.shape[0]

    def vec(a):
        return np.ascontiguousarray(np.broadcast_to(np.asarray(a, dtype=np.float64), (n,)))

    y, flux, fwhm, beta, e1, e2 = (vec(a) for a in (y, flux, fwhm, beta, e1, e2))
    if n == 0:
        return
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(np.isfinite(flux))):
        raise ValueError("source positions and fluxes must be finite; drop or fix the NaN/inf entries first")
    if np.any(fwhm <= 0) or np.any(beta <= 1.0):
        raise ValueError("PSF FWHM must be > 0 and Moffat beta > 1")
    if np.any(e1 * e1 + e2 * e2 >= 0.81):
        raise ValueError("ellipticity |e| must be < 0.9")
    r = stamp_radius(flux, fwhm, beta) if radius is None else np.broadcast_to(np.asarray(radius, np.int64), (n,))
    _add_moffat_sources(image, x, y, flux, fwhm, beta, e1, e2, np.ascontiguousarray(r), int(subsample))


# ---------------------------------------------------------------------------------------------------
# Sky, instrument and photon noise, fused
# ---------------------------------------------------------------------------------------------------


@njit
def _compose(out, signal, flat, dark_rate, fringe, sky_grid, step, exptime, dark_time, fringe_amp, seed, noise):
    if seed >= 0:
        np.random.seed(seed)
    ny, nx = out.shape
    gy, gx = sky_grid.shape
    has_fringe = fringe.shape[0] == ny
    inv = 1.0 / step
    for y in range(ny):
        fy = min(y * inv, gy - 1.000001)
        j = int(fy)
        ty = fy - j
        for x in range(nx):
            fx = min(x * inv, gx - 1.000001)
            i = int(fx)
            tx = fx - i
            sky = (
                (1 - ty) * ((1 - tx) * sky_grid[j, i] + tx * sky_grid[j, i + 1])
                + ty * ((1 - tx) * sky_grid[j + 1, i] + tx * sky_grid[j + 1, i + 1])
            ) * exptime
            if has_fringe:
                sky += fringe_amp * sky * fringe[y, x]
            lam = (signal[y, x] + sky) * flat[y, x] + dark_rate[y, x] * dark_time
            if lam < 0.0:
                lam = 0.0
            if noise:
                out[y, x] = np.random.poisson(lam)
            else:
                out[y, x] = lam


def compose_exposure(signal, flat, dark_rate, sky_grid, step, exptime, dark_time, fringe=None,
                     fringe_amp=0.0, seed=0, noise=True, out=None):  # fmt: skip
    """Electrons collected in one exposure, with Poisson noise.

    ``lambda = (signal + sky * (1 + fringe_amp * fringe)) * flat + dark_rate * dark_time`` per pixel, where
    ``sky`` (electrons per second) is bilinearly interpolated from ``sky_grid`` sampled every ``step`` pixels
    and multiplied by ``exptime``; the result is a Poisson draw (or ``lambda`` itself with ``noise=False``).

    Parameters
    ----------
    signal : numpy.ndarray
        Source electrons above the atmosphere-and-optics, before the flat field (2-D float32).
    flat, dark_rate : numpy.ndarray
        Relative response and dark current (electrons per second), same shape.
    sky_grid : numpy.ndarray
        Sky electrons per second per pixel on a coarse grid covering the image (``ceil(n/step)+1`` nodes).
    fringe : numpy.ndarray, optional
        Fringe pattern relative to the sky (red bands); ``fringe_amp`` scales it for this exposure.
    seed : int
        Seed of the photon-noise stream (>= 0).

    Returns
    -------
    numpy.ndarray
        float32 electrons, integer valued when ``noise`` is true.
    """
    ny, nx = signal.shape
    for name, a in (("flat", flat), ("dark_rate", dark_rate)):
        if a.shape != signal.shape:
            raise ValueError(f"{name} has shape {a.shape}, expected the signal's {signal.shape}")
    gy, gx = sky_grid.shape
    if (gy - 1) * step < ny - 1 or (gx - 1) * step < nx - 1:
        raise ValueError(f"sky grid {sky_grid.shape} at step {step} does not cover an image of {signal.shape}")
    if fringe is None:
        fringe = np.zeros((0, 0), np.float32)
    elif fringe.shape != signal.shape:
        raise ValueError(f"fringe has shape {fringe.shape}, expected {signal.shape}")
    out = np.empty(signal.shape, np.float32) if out is None else out
    _compose(out, signal, flat, dark_rate, fringe, np.ascontiguousarray(sky_grid, np.float64), float(step),
             float(exptime), float(dark_time), float(fringe_amp), int(seed), bool(noise))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------
# Cosmic rays and saturation
# ---------------------------------------------------------------------------------------------------


@njit
def _add_tracks(image, x0, y0, x1, y1, charge):
    ny, nx = image.shape
    for k in range(x0.shape[0]):
        length = math.hypot(x1[k] - x0[k], y1[k] - y0[k])
        nstep = max(int(length * 4.0), 1)
        q = charge[k] / nstep
        for s in range(nstep):
            t = (s + 0.5) / nstep
            x = int(math.floor(x0[k] + t * (x1[k] - x0[k]) + 0.5))
            y = int(math.floor(y0[k] + t * (y1[k] - y0[k]) + 0.5))
            if 0 <= x < nx and 0 <= y < ny:
                image[y, x] += q


def add_tracks(image, x0, y0, x1, y1, charge) -> None:
    """Deposit ``charge`` electrons uniformly along each straight track (cosmic rays), in place."""
    arrs = [np.ascontiguousarray(a, dtype=np.float64) for a in (x0, y0, x1, y1, charge)]
    if len({a.shape for a in arrs}) != 1:
        raise ValueError("track arrays x0, y0, x1, y1 and charge must have the same length")
    _add_tracks(image, *arrs)


@njit
def _bleed(image, full_well, mask):
    """Spill charge above ``full_well`` up and down each column (the parallel direction)."""
    ny, nx = image.shape
    # Find the columns with saturated pixels in one row-major pass, then work column by column on those.
    hit = np.zeros(nx, np.bool_)
    for yy in range(ny):
        for xx in range(nx):
            if image[yy, xx] > full_well:
                hit[xx] = True
    for x in range(nx):
        if not hit[x]:
            continue
        y = 0
        while y < ny:
            if image[y, x] <= full_well:
                y += 1
                continue
            y0 = y
            excess = 0.0
            while y < ny and image[y, x] > full_well:
                excess += image[y, x] - full_well
                image[y, x] = full_well
                y += 1
            lo, hi = y0 - 1, y
            # Share the run's excess between the pixels below and above, filling each to full well.
            while excess > 0.0 and (lo >= 0 or hi < ny):
                sides = (1 if lo >= 0 else 0) + (1 if hi < ny else 0)
                share = excess / sides
                if lo >= 0:
                    take = min(max(full_well - image[lo, x], 0.0), share)
                    image[lo, x] += take
                    excess -= take
                    if image[lo, x] >= full_well:
                        lo -= 1
                if hi < ny:
                    take = min(max(full_well - image[hi, x], 0.0), share)
                    image[hi, x] += take
                    excess -= take
                    if image[hi, x] >= full_well:
                        hi += 1
        for yy in range(ny):
            if image[yy, x] >= full_well:
                mask[yy, x] = 1


def bleed_saturation(image, full_well: float) -> np.ndarray:
    """Clip pixels at ``full_well`` electrons, moving the excess charge along their columns (bleed trails).

    Charge is conserved except what leaves the top and bottom of the CCD. Returns the boolean mask of
    saturated pixels; ``image`` is modified in place.
    """
    if image.ndim != 2:
        raise ValueError("image must be 2-D")
    mask = np.zeros(image.shape, np.uint8)
    _bleed(image, float(full_well), mask)
    return mask.astype(bool)


# ---------------------------------------------------------------------------------------------------
# Digitisation of amplifier segments
# ---------------------------------------------------------------------------------------------------


@njit
def _digitize(out, segs, bias, row_offsets, col_pattern, read_noise, noise, adc_max):
    namp, h, w = segs.shape
    for a in range(namp):
        rn = read_noise[a]
        for y in range(h):
            level = bias[a] + row_offsets[a, y]
            for x in range(w):
                v = segs[a, y, x] + level + col_pattern[a, x] + rn * noise[a, y, x]
                v = min(max(v, 0.0), adc_max)
                # v >= 0, so truncation of v + 0.5 rounds half up.
                out[a, y, x] = np.int32(v + 0.5)


def digitize_segments(segs, bias, row_offsets, col_pattern, read_noise, seed: int, adc_max: int = 2**18 - 1):
    """Signal in ADU per segment → raw int32 counts with bias level, bias structure and read noise.

    Parameters
    ----------
    segs : numpy.ndarray
        float32 (namp, h, w) signal in ADU, in readout (raw segment) order.
    bias, read_noise : numpy.ndarray
        Per-amplifier bias level and read noise, ADU.
    row_offsets, col_pattern : numpy.ndarray
        Bias structure: per-row offsets (namp, h) shared by the data and the serial overscan of that row,
        and a fixed column pattern (namp, w).
    seed : int
        Seed of the read-noise stream (numpy PCG64; its ziggurat normals are several times faster than a
        per-pixel draw inside the loop).
    adc_max : int
        Largest value the 18-bit ADC can produce; values are clipped to [0, adc_max].
    """
    namp, h, w = segs.shape
    if row_offsets.shape != (namp, h) or col_pattern.shape != (namp, w):
        raise ValueError("row_offsets must be (namp, rows) and col_pattern (namp, cols) of the segments")
    noise = np.random.Generator(np.random.PCG64(seed)).standard_normal(segs.shape, dtype=np.float32)
    out = np.empty(segs.shape, np.int32)
    _digitize(out, segs, np.asarray(bias, np.float64), np.asarray(row_offsets, np.float64),
              np.asarray(col_pattern, np.float64), np.asarray(read_noise, np.float64), noise,
              float(adc_max))  # fmt: skip
    return out
