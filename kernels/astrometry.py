"""Astrometric calibration: match detected sources to a reference catalogue, fit a TAN-SIP WCS.

Matching (:func:`find_offset`, :func:`match_sources`) works in pixels, the references being placed on the
CCD by the initial WCS. An initial pointing error shifts every reference by about the same amount, so
the offsets of all (source, reference) pairs closer than ``max_shift`` pile up in one cell of a 2-D
histogram while chance pairs spread evenly; a small rotation error smears that peak towards the CCD's
corners, so the search also tries the references rotated about the CCD centre by a few trial angles and
keeps the sharpest peak. Nearest-neighbour matching then follows with radii that tighten as an affine
fit of the pairs absorbs what the offset left.

Fitting (:func:`fit_tan_sip`) projects the references gnomonically about ``CRVAL`` and fits the standard
coordinates (ξ, η) as full polynomials of ``(u, v) = pixel − CRPIX``: the linear terms are the CD matrix
and the rest the SIP ``A``, ``B`` coefficients, as in the FITS SIP convention; ``CRVAL`` is moved to the
fitted sky position of ``CRPIX`` and the fit repeated, with sigma clipping of the residuals. The inverse
polynomials ``AP``, ``BP`` are fitted on a grid over the CCD.
"""

from __future__ import annotations

import math

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from kernels.config import njit

MAS_PER_DEG = 3600e3


# --------------------------------------------------------------------------------------------- cores
@njit
def _offset_votes(hist, sx, sy, rx, ry, max_shift, bin_size):
    """Add every pair offset ``(sx − rx, sy − ry)`` with both components within ±max_shift to ``hist``.

    ``rx`` must be sorted ascending; ``hist`` is (n, n) with n = 2 ceil(max_shift / bin) + 1, offset 0 at
    the centre cell.
    """
    nb = hist.shape[0]
    half = nb // 2
    nr = rx.shape[0]
    for i in range(sx.shape[0]):
        lo = np.searchsorted(rx, sx[i] - max_shift)
        for j in range(lo, nr):
            dx = sx[i] - rx[j]
            if dx < -max_shift:
                break
            dy = sy[i] - ry[j]
            if abs(dy) > max_shift:
                continue
            bx = int(math.floor(dx / bin_size + 0.5)) + half
            by = int(math.floor(dy / bin_size + 0.5)) + half
            if 0 <= bx < nb and 0 <= by < nb:
                hist[by, bx] += 1


# -------------------------------------------------------------------------------------- public API
def offset_histogram(sx, sy, rx, ry, max_shift: float, bin_size: float) -> np.ndarray:
    """2-D histogram (rows: y offset) of source − reference offsets within ±``max_shift`` pixels.

    Cell ``(half + round(dy / bin), half + round(dx / bin))`` counts the pairs, ``half = ceil(max_shift / bin)``.
    """
    if not (max_shift > 0 and bin_size > 0):
        raise ValueError(f"max_shift and bin_size must be positive, got {max_shift}, {bin_size}")
    sx, sy, rx, ry = (np.ascontiguousarray(a, dtype=np.float64) for a in (sx, sy, rx, ry))
    if sx.shape != sy.shape or rx.shape != ry.shape or sx.ndim != 1 or rx.ndim != 1:
        raise ValueError("source and reference coordinates must be 1-D arrays of matching lengths")
    keep_s = np.isfinite(sx) & np.isfinite(sy)
    keep_r = np.isfinite(rx) & np.isfinite(ry)
    sx, sy, rx, ry = sx[keep_s], sy[keep_s], rx[keep_r], ry[keep_r]
    order = np.argsort(rx, kind="stable")
    n = 2 * int(math.ceil(max_shift / bin_size)) + 1
    hist = np.zeros((n, n), np.int64)
    _offset_votes(hist, sx, sy, np.ascontiguousarray(rx[order]), np.ascontiguousarray(ry[order]), float(max_shift),
                  float(bin_size))  # fmt: skip
    return hist


def find_offset(sx, sy, rx, ry, centre: tuple[float, float], max_shift: float, bin_size: float = 2.0,
                rotations_deg=(0.0,), min_peak: int = 5) -> dict | None:  # fmt: skip
    """The shift (and rotation about ``centre``) that best brings references onto sources.

    Returns ``{"dx", "dy", "rotation_deg", "peak", "background", "significance"}`` (source ≈ R(ref) + d)
    for the trial rotation with the most significant peak (2 × 2 cells summed, against the mean count of
    such blocks), or None when no peak reaches ``min_peak`` pairs and 5 σ above the chance level.
    """
    best = None
    cx, cy = centre
    rx, ry = np.asarray(rx, dtype=float), np.asarray(ry, dtype=float)
    for rot in rotations_deg:
        c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
        qx, qy = cx + c * (rx - cx) - s * (ry - cy), cy + s * (rx - cx) + c * (ry - cy)
        h = offset_histogram(sx, sy, qx, qy, max_shift, bin_size)
        # 2 × 2 blocks: a peak split between neighbouring cells counts whole, and a smeared one (wrong
        # rotation) does not, so the sharpest rotation wins
        b = h[:-1, :-1] + h[1:, :-1] + h[:-1, 1:] + h[1:, 1:]
        if b.size == 0:
            continue
        j, i = np.unravel_index(int(np.argmax(b)), b.shape)
        peak = float(b[j, i])
        bkg = float(b.mean())
        sig = (peak - bkg) / math.sqrt(max(bkg, 1.0))
        if best is None or sig > best["significance"]:
            half = h.shape[0] // 2
            best = {"dx": (i + 0.5 - half) * bin_size, "dy": (j + 0.5 - half) * bin_size, "rotation_deg": float(rot),
                    "peak": peak, "background": bkg, "significance": sig, "qx": qx, "qy": qy}  # fmt: skip
    if best is None or best["peak"] < min_peak or best["significance"] < 5.0:
        return None
    # refine: mean offset of the pairs within 1.5 bins of the peak
    from scipy.spatial import cKDTree

    tree = cKDTree(np.column_stack([best["qx"] + best["dx"], best["qy"] + best["dy"]]))
    dist, k = tree.query(np.column_stack([sx, sy]), distance_upper_bound=1.5 * bin_size)
    ok = np.isfinite(dist)
    if ok.sum() >= min_peak:
        best["dx"] += float(np.median(np.asarray(sx)[ok] - (best["qx"][k[ok]] + best["dx"])))
        best["dy"] += float(np.median(np.asarray(sy)[ok] - (best["qy"][k[ok]] + best["dy"])))
    del best["qx"], best["qy"]
    return best


def match_sources(sx, sy, rx, ry, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one nearest-neighbour matches within ``radius`` pixels.

    Each reference takes its nearest source; a source claimed by several references keeps the closest.
    Returns ``(source_index, reference_index, distance)``, sorted by reference index.
    """
    from scipy.spatial import cKDTree

    sx, sy, rx, ry = (np.asarray(a, dtype=float) for a in (sx, sy, rx, ry))
    empty = np.zeros(0, np.int64)
    fs = np.flatnonzero(np.isfinite(sx) & np.isfinite(sy))
    fr = np.flatnonzero(np.isfinite(rx) & np.isfinite(ry))
    if fs.size == 0 or fr.size == 0:
        return empty, empty, np.zeros(0)
    dist, k = cKDTree(np.column_stack([sx[fs], sy[fs]])).query(np.column_stack([rx[fr], ry[fr]]),
                                                                distance_upper_bound=radius)  # fmt: skip
    ok = np.isfinite(dist)
    ref, src, dist = fr[ok], fs[k[ok]], dist[ok]
    order = np.lexsort((dist, src))
    first = np.ones(order.size, bool)
    first[1:] = src[order][1:] != src[order][:-1]
    keep = np.sort(order[first])
    return src[keep], ref[keep], dist[keep]


def fit_affine(x, y, u, v, weights=None) -> np.ndarray:
    """Least-squares affine map ``(u, v) ≈ M @ (1, x, y)``; returns M (2 × 3)."""
    a = np.column_stack([np.ones_like(x), x, y])
    w = np.ones_like(x) if weights is None else np.sqrt(weights)
    cu = np.linalg.lstsq(a * w[:, None], u * w, rcond=None)[0]
    cv = np.linalg.lstsq(a * w[:, None], v * w, rcond=None)[0]
    return np.vstack([cu, cv])


def gnomonic(ra, dec, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Standard coordinates (ξ east, η north) in degrees of (ra, dec) about (ra0, dec0).

    Raises ValueError for a position 90° or more from the centre (the tangent plane does not reach it)."""
    ra, dec = np.deg2rad(np.asarray(ra, dtype=float)), np.deg2rad(np.asarray(dec, dtype=float))
    a0, d0 = math.radians(ra0), math.radians(dec0)
    cosc = math.sin(d0) * np.sin(dec) + math.cos(d0) * np.cos(dec) * np.cos(ra - a0)
    if np.any(cosc <= 1e-6):
        raise ValueError("a position is 90° or more from the projection centre; the tangent plane cannot reach it")
    xi = np.cos(dec) * np.sin(ra - a0) / cosc
    eta = (math.cos(d0) * np.sin(dec) - math.sin(d0) * np.cos(dec) * np.cos(ra - a0)) / cosc
    return np.rad2deg(xi), np.rad2deg(eta)


def inverse_gnomonic(xi, eta, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees of standard coordinates (ξ, η) in degrees about (ra0, dec0)."""
    x, y = np.deg2rad(np.asarray(xi, dtype=float)), np.deg2rad(np.asarray(eta, dtype=float))
    a0, d0 = math.radians(ra0), math.radians(dec0)
    rho = np.hypot(x, y)
    c = np.arctan(rho)
    with np.errstate(invalid="ignore", divide="ignore"):
        dec = np.arcsin(np.cos(c) * math.sin(d0) + np.where(rho > 0, y * np.sin(c) * math.cos(d0) / rho, 0.0))
    ra = a0 + np.arctan2(x * np.sin(c), rho * math.cos(d0) * np.cos(c) - y * math.sin(d0) * np.sin(c))
    return np.rad2deg(ra) % 360.0, np.rad2deg(dec)


def poly_terms(lo: int, hi: int) -> list[tuple[int, int]]:
    """The monomials ``u^p v^q`` of degrees ``lo`` to ``hi`` as ``(p, q)``, by degree, ``p`` descending."""
    return [(p, d - p) for d in range(lo, hi + 1) for p in range(d, -1, -1)]


def poly_design(u, v, terms) -> np.ndarray:
    """The least-squares design matrix: one column ``u**p * v**q`` per term."""
    return np.column_stack([u**p * v**q for p, q in terms])


def tan_sip_header(cx, cy, terms, crpix0: tuple[float, float], crval: tuple[float, float], inverse_order: int,
                   inverse_grid: tuple[np.ndarray, np.ndarray], scale: float) -> fits.Header:  # fmt: skip
    """FITS cards of the TAN(-SIP) WCS of a polynomial fit of standard coordinates on pixel offsets.

    Parameters
    ----------
    cx, cy : numpy.ndarray
        ``ξ = Σ cx[k] u^p v^q`` and ``η = Σ cy[k] u^p v^q`` (degrees) over ``terms[k] = (p, q)``, with ``(u,
        v)`` the 0-based pixel offsets from ``crpix0``; a constant term, if any, is left out (the tangent
        point is ``crval``). The linear terms give the CD matrix, the terms of degree ≥ 2 the SIP ``A``, ``B``
        polynomials (none when the highest degree is 1: a plain TAN WCS).
    crpix0, crval : (float, float)
        0-based reference pixel and its sky position (deg).
    inverse_order : int
        Order of the inverse polynomials ``AP``, ``BP``, fitted by least squares at ``inverse_grid``.
    inverse_grid : (numpy.ndarray, numpy.ndarray)
        Pixel offsets ``(u, v)`` spanning the CCD where the inverse is fitted.
    scale : float
        Offsets are divided by it in the least-squares designs (conditioning; e.g. half the CCD's size).

    Raises
    ------
    ValueError
        When the CD matrix is singular.
    """
    order = max(p + q for p, q in terms)
    lin = [terms.index((1, 0)), terms.index((0, 1))]
    cd = np.array([[cx[lin[0]], cx[lin[1]]], [cy[lin[0]], cy[lin[1]]]])
    if not abs(np.linalg.det(cd)) > 0:
        raise ValueError("the fitted CD matrix is singular: the points do not span the CCD")
    sip = np.linalg.solve(cd, np.vstack([cx, cy]))  # rows: A, B coefficients (linear parts = identity)
    hdr = fits.Header()
    hdr["WCSAXES"] = 2
    sipsuf = "-SIP" if order >= 2 else ""
    hdr["CTYPE1"], hdr["CTYPE2"] = "RA---TAN" + sipsuf, "DEC--TAN" + sipsuf
    hdr["CUNIT1"], hdr["CUNIT2"] = "deg", "deg"
    hdr["CRPIX1"], hdr["CRPIX2"] = crpix0[0] + 1.0, crpix0[1] + 1.0
    hdr["CRVAL1"], hdr["CRVAL2"] = float(crval[0]), float(crval[1])
    for i in range(2):
        for j in range(2):
            hdr[f"CD{i + 1}_{j + 1}"] = float(cd[i, j])
    hdr["RADESYS"] = "ICRS"
    if order < 2:
        return hdr
    for name, row in (("A", sip[0]), ("B", sip[1])):
        hdr[f"{name}_ORDER"] = order
        for (p, q), c in zip(terms, row):
            if p + q >= 2:
                hdr[f"{name}_{p}_{q}"] = float(c)
    # Inverse: u = U + AP(U, V), with U = u + A(u, v)
    gu, gv = inverse_grid
    hi = [(p, q) for p, q in terms if p + q >= 2]
    fu = gu + sum(sip[0][terms.index(t)] * gu ** t[0] * gv ** t[1] for t in hi)
    fv = gv + sum(sip[1][terms.index(t)] * gu ** t[0] * gv ** t[1] for t in hi)
    iterms = poly_terms(1, inverse_order)
    idesign = poly_design(fu / scale, fv / scale, iterms)
    iscales = np.array([scale ** (p + q) for p, q in iterms])
    for name, target in (("AP", gu - fu), ("BP", gv - fv)):
        c = np.linalg.lstsq(idesign, target, rcond=None)[0] / iscales
        hdr[f"{name}_ORDER"] = inverse_order
        for (p, q), val in zip(iterms, c):
            hdr[f"{name}_{p}_{q}"] = float(val)
    return hdr


def fit_tan_sip(x, y, ra, dec, shape: tuple[int, int], order: int = 3, inverse_order: int | None = None,
                weights=None, nsigma: float = 4.0, iters: int = 6, crval: tuple[float, float] | None = None):  # fmt: skip
    """Fit a TAN-SIP WCS to matched pairs.

    Parameters
    ----------
    x, y : array_like
        0-based pixel positions of the matched sources.
    ra, dec : array_like
        Their reference positions (deg).
    shape : (ny, nx)
        CCD shape; ``CRPIX`` is its centre and the inverse polynomials are fitted over it.
    order : int
        Forward SIP order (1: a plain TAN WCS with no SIP terms; 2 to 5).
    inverse_order : int, optional
        Order of AP, BP (default ``order + 1``).
    weights : array_like, optional
        Relative weights (e.g. 1 / centroid variance); uniform by default.
    nsigma, iters : float, int
        Pairs whose residual exceeds ``nsigma`` × the robust rms (1.4826 × median |r| per axis) are
        rejected, for at most ``iters`` rounds.
    crval : (float, float), optional
        Starting tangent point; the sky position of the first pair by default.

    Returns
    -------
    (astropy.wcs.WCS, dict)
        The WCS (pixel origin 0 for 0-based pixels) and ``{"n_used", "n_input", "rms_mas", "used"}``:
        ``rms_mas`` the rms of the angular residuals of the used pairs, ``used`` a boolean mask.

    Raises
    ------
    ValueError
        With fewer than ``2 × nterms`` usable pairs.
    """
    x, y, ra, dec = (np.asarray(a, dtype=float) for a in (x, y, ra, dec))
    if not (x.shape == y.shape == ra.shape == dec.shape) or x.ndim != 1:
        raise ValueError("x, y, ra and dec must be 1-D arrays of the same length")
    if not 1 <= order <= 5:
        raise ValueError(f"SIP order must be within 1..5, got {order}")
    inverse_order = order + 1 if inverse_order is None else int(inverse_order)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float)
    used = np.isfinite(x) & np.isfinite(y) & np.isfinite(ra) & np.isfinite(dec) & np.isfinite(w) & (w > 0)
    terms = poly_terms(0, order)
    if used.sum() < 2 * len(terms):
        raise ValueError(f"{int(used.sum())} usable pairs cannot constrain a TAN-SIP fit of order {order} "
                         f"({len(terms)} terms per axis); match more stars or lower the order")  # fmt: skip
    ny, nx = shape
    x0, y0 = (nx - 1) / 2.0, (ny - 1) / 2.0
    s = max(nx, ny) / 2.0
    u, v = x - x0, y - y0
    design = poly_design(u / s, v / s, terms)
    scales = np.array([s ** (p + q) for p, q in terms])
    k0 = int(np.flatnonzero(used)[0])
    ra0, dec0 = (float(ra[k0]), float(dec[k0])) if crval is None else (float(crval[0]), float(crval[1]))
    cx = cy = np.zeros(len(terms))
    for it in range(iters + 1):
        for _ in range(5):  # fit, then move the tangent point to CRPIX's fitted sky position, until it stays
            xi, eta = gnomonic(ra, dec, ra0, dec0)
            sw = np.sqrt(w[used])
            cx = np.linalg.lstsq(design[used] * sw[:, None], xi[used] * sw, rcond=None)[0]
            cy = np.linalg.lstsq(design[used] * sw[:, None], eta[used] * sw, rcond=None)[0]
            if abs(cx[0]) < 1e-10 and abs(cy[0]) < 1e-10:
                break
            ra0, dec0 = (float(a) for a in inverse_gnomonic(cx[0], cy[0], ra0, dec0))
        rx, ry = (xi - design @ cx) * MAS_PER_DEG, (eta - design @ cy) * MAS_PER_DEG
        sx = 1.4826 * np.median(np.abs(rx[used]))
        sy = 1.4826 * np.median(np.abs(ry[used]))
        new = used & (np.abs(rx) <= nsigma * max(sx, 1e-3)) & (np.abs(ry) <= nsigma * max(sy, 1e-3))
        if np.array_equal(new, used) or new.sum() < 2 * len(terms) or it == iters:
            break
        used = new
    g = np.linspace(-0.5, nx - 0.5, 25) - x0, np.linspace(-0.5, ny - 0.5, 25) - y0
    gu, gv = (a.ravel() for a in np.meshgrid(*g))
    hdr = tan_sip_header(cx / scales, cy / scales, terms, (x0, y0), (ra0, dec0), inverse_order, (gu, gv), s)
    wcs = WCS(hdr)
    wra, wdec = wcs.all_pix2world(x, y, 0)
    sep = angular_separation_mas(ra, dec, wra, wdec)
    rms = float(np.sqrt(np.mean(sep[used] ** 2)))
    return wcs, {"n_used": int(used.sum()), "n_input": int(x.size), "rms_mas": rms, "used": used,
                 "residual_mas": sep}  # fmt: skip


def angular_separation_deg(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Angular separation (degrees) of two sets of positions in degrees, broadcast (Vincenty's formula:
    accurate from micro-arcseconds to 180°, where the law of cosines loses small separations)."""
    a1, d1, a2, d2 = (np.deg2rad(np.asarray(a, dtype=float)) for a in (ra1, dec1, ra2, dec2))
    da = a2 - a1
    num = np.hypot(np.cos(d2) * np.sin(da), np.cos(d1) * np.sin(d2) - np.sin(d1) * np.cos(d2) * np.cos(da))
    den = np.sin(d1) * np.sin(d2) + np.cos(d1) * np.cos(d2) * np.cos(da)
    return np.rad2deg(np.arctan2(num, den))


def angular_separation_mas(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Angular separation (mas) of two sets of positions in degrees (:func:`angular_separation_deg`)."""
    return angular_separation_deg(ra1, dec1, ra2, dec2) * MAS_PER_DEG
