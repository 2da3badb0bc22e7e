"""Image differencing stage: warp the template onto the science grid, PSF-match, subtract, decorrelate.

A pure stage (arrays in, a :class:`Difference` out); the templates, their one I/O helper and the warp are
:mod:`lsstpipe.pipelines.templates`. The numerics live in :mod:`kernels.warp` (Lanczos-3 resampling) and
:mod:`kernels.diffim` (Alard–Lupton kernel fit, FFT convolution, Reiss & Lupton decorrelation; the module
docstring there says why). Units: the science exposure is in electrons; templates are in nJy and are converted with the
science zero point (the magnitude of a source giving 1 e⁻), ``e⁻ = nJy · 10^(-0.4 (31.4 - zp))``; any
residual photometric scale is fitted as the kernel's sum.

Never raises for bad *data*: missing template coverage, too few kernel stars or a singular fit give a
flagged, partial result (``flags``) with ``NO_DATA`` where nothing could be computed. Bad *arguments*
(shapes, dtypes, configuration) raise ``ValueError``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from astropy.wcs import WCS

from kernels import diffim as K
from kernels.warp import lanczos_noise_power
from lsstpipe.pipelines.exposure import Exposure, MaskBit
from lsstpipe.pipelines.templates import warp_template

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True)
class DifferenceConfig:
    """Settings of the differencing stage (validated).

    Attributes
    ----------
    mode : str
        ``"convolve_template"``, ``"convolve_science"`` or ``"auto"``: convolve the template unless its PSF
        is broader than ``auto_sharpen_ratio`` × the science's. The template, a deep coadd, may be sharpened
        a little at small noise cost; convolving the science instead makes the decorrelation a partial
        deconvolution of the template, which amplifies its warp and sampling errors at bright stars
        (measured on the simulator's mini CCDs at 0.6" seeing against the 0.75" template: 20 false
        5σ detections convolving the science, 1 convolving the template).
    auto_sharpen_ratio : float
        See ``mode`` (≥ 1).
    spatial_order : int
        Polynomial order of the kernel's spatial variation (0–2); lowered when there are too few stars.
    basis_sigma_factors, basis_degrees : tuple
        AL basis: Gaussians of σ = factor × the matching σ, with these polynomial degrees (Rubin's three
        Gaussians of degrees 4, 2, 2, and a fourth, wider one for the PSF wings).
    kernel_half : int or None
        Kernel half-width in pixels (None: :func:`kernels.diffim.kernel_sigmas`).
    kernel_star_snr : float
        Peak-pixel S/N of kernel stars in the science image.
    max_kernel_stars, min_kernel_stars : int
        At most / at least this many stamps (below the minimum: PSF-model kernel, ``KERNEL_FIT_FAILED``).
    clip : float
        Stamp rejection threshold (robust σ of the stamps' χ²).
    stamp_fwhm : float
        Half-size of the fitted stamp region, in PSF FWHMs (of the broader PSF).
    select_spatial_order : bool
        Lower the spatial order when the stars do not need it (:func:`kernels.diffim.fit_kernel`): each
        order beyond 0 costs FFTs.
    fit_background : bool
        Fit a differential background too (see :func:`kernels.diffim.fit_kernel`).
    decorrelate : bool
        Apply the Reiss & Lupton decorrelation.
    warp_step : int
        Coarse-grid spacing of the exact WCS evaluation in the warp (pixels).
    bad_mask_bits : tuple of str
        :class:`MaskBit` names whose pixels may not serve as kernel stars nor enter the noise metrics.
    clear_mask_bits : tuple of str
        Bits of the inputs not carried to the difference's mask (the calexp's detections).
    """

    mode: str = "auto"
    auto_sharpen_ratio: float = 1.3
    spatial_order: int = 1
    basis_sigma_factors: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    basis_degrees: tuple[int, ...] = (4, 2, 2, 0)
    kernel_half: int | None = None
    kernel_star_snr: float = 20.0
    max_kernel_stars: int = 100
    min_kernel_stars: int = 5
    clip: float = 3.0
    stamp_fwhm: float = 3.0
    select_spatial_order: bool = True
    fit_background: bool = False
    decorrelate: bool = True
    warp_step: int = 32
    bad_mask_bits: tuple[str, ...] = ("SAT", "NO_DATA", "BAD", "EDGE", "CR", "INTRP", "SUSPECT")
    clear_mask_bits: tuple[str, ...] = ("DETECTED", "DETECTED_NEGATIVE")

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "convolve_template", "convolve_science"):
            raise ValueError(f"mode must be auto, convolve_template or convolve_science, not {self.mode!r}")
        if not 1.0 <= self.auto_sharpen_ratio <= 3.0:
            raise ValueError(f"auto_sharpen_ratio must be within 1..3, not {self.auto_sharpen_ratio}")
        if self.spatial_order not in (0, 1, 2):
            raise ValueError(f"spatial_order must be 0, 1 or 2, not {self.spatial_order}")
        if len(self.basis_sigma_factors) != len(self.basis_degrees) or not self.basis_degrees:
            raise ValueError("basis_sigma_factors and basis_degrees must be non-empty and of equal length")
        if any(not f > 0 for f in self.basis_sigma_factors) or any(d < 0 or d > 6 for d in self.basis_degrees):
            raise ValueError("basis sigma factors must be positive and degrees within 0..6")
        if self.kernel_half is not None and not 2 <= self.kernel_half <= 40:
            raise ValueError(f"kernel_half must be within 2..40 pixels, not {self.kernel_half}")
        if not self.kernel_star_snr > 0 or not self.clip > 0 or not 1.0 <= self.stamp_fwhm <= 10.0:
            raise ValueError("kernel_star_snr and clip must be positive and stamp_fwhm within 1..10")
        if not 1 <= self.min_kernel_stars <= self.max_kernel_stars:
            raise ValueError("need 1 ≤ min_kernel_stars ≤ max_kernel_stars")
        for name in (*self.bad_mask_bits, *self.clear_mask_bits):
            if name not in MaskBit.__members__:
                raise ValueError(f"unknown mask bit {name!r}; choose among {', '.join(MaskBit.__members__)}")
        if not 1 <= self.warp_step <= 256:
            raise ValueError(f"warp_step must be within 1..256 pixels, not {self.warp_step}")


@dataclass(frozen=True)
class Difference:
    """The difference image (science − PSF-matched template, electrons) and what went into it."""

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    template: np.ndarray
    kernel_info: dict = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    metrics: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- subtract
def _bits(names) -> int:
    out = 0
    for n in names:
        out |= int(MaskBit[n])
    return out


def _median_level(v: np.ndarray, code: np.ndarray) -> float:
    """Median of the variance plane over clean pixels (every 7th row, 5th column)."""
    sub = v[::7, ::5][code[::7, ::5] == 0]
    return float(np.median(sub)) if sub.size else float("nan")


def _estimate_fwhm(image, variance, bad) -> float | None:
    from lsstpipe.pipelines.detection import estimate_psf_fwhm

    try:
        return float(estimate_psf_fwhm(image, variance, ~bad))
    except ValueError:
        return None


def _fit(x_img, x_var, y_img, y_var, code, fwhm_x, fwhm_y, config, shape):
    """Kernel stars, basis and AL fit; returns (solution or None, info, half)."""
    sig, half = K.kernel_sigmas(fwhm_x, fwhm_y, max(config.basis_sigma_factors))
    if config.kernel_half is not None:
        half = config.kernel_half
    r = int(math.ceil(config.stamp_fwhm * max(fwhm_x, fwhm_y)))
    border = r + half + 1
    info = {"match_sigma": sig, "kernel_half": half, "stamp_half": r}
    bad = code != 0
    xs, ys, vals = K.find_peaks(x_img, x_var, code, config.kernel_star_snr, border)
    # kernel stars must be stars of the other image too (not transients, variables or artefacts)
    present = y_img[ys, xs] >= 0.5 * config.kernel_star_snr * np.sqrt(np.maximum(y_var[ys, xs], 0))
    xs, ys, vals = xs[present], ys[present], vals[present]
    keep = K.select_isolated(xs, ys, vals, radius=r + half, n_max=4 * config.max_kernel_stars, shape=shape)
    ok = [
        k
        for k in keep
        if not bad[ys[k] - r - half : ys[k] + r + half + 1, xs[k] - r - half : xs[k] + r + half + 1].any()
    ]
    ok = np.array(ok[: config.max_kernel_stars], np.int64)
    info["n_candidates"] = int(len(xs))
    info["n_stars"] = int(len(ok))
    order = config.spatial_order
    while order > 0 and len(ok) < 3 * len(K.spatial_powers(order)):
        order -= 1
    info["spatial_order"] = order
    if len(ok) < config.min_kernel_stars:
        info["error"] = f"{len(ok)} kernel stars (need {config.min_kernel_stars})"
        return None, info, half
    gx, gy = K.al_basis([f * sig for f in config.basis_sigma_factors], config.basis_degrees, half)
    px, py = xs[ok], ys[ok]
    xn, yn = K.normalised_position(px, py, shape)
    try:
        sol = K.fit_kernel(K.cut_stamps(x_img, px, py, r), K.cut_stamps(x_var, px, py, r),
                           K.cut_stamps(y_img, px, py, r + half), K.cut_stamps(y_var, px, py, r + half), xn, yn,
                           gx, gy, spatial_order=order, clip=config.clip, fit_background=config.fit_background,
                           select_order=config.select_spatial_order,
                           min_stamps=min(config.min_kernel_stars, len(ok)))  # fmt: skip
    except ValueError as exc:
        info["error"] = str(exc)
        return None, info, half
    info.update(n_basis=int(gx.shape[0]), n_stamps=sol.n_stamps, chi2=sol.chi2, spatial_order=sol.spatial_order)
    return sol, info, half


def _convolve_template(fwhm_s: float | None, fwhm_t: float | None, config: DifferenceConfig) -> bool:
    """Whether the template is the convolved side (``config.mode``; "auto" decides from the PSF FWHMs and
    convolves the template when either is unknown)."""
    if config.mode != "auto":
        return config.mode == "convolve_template"
    return fwhm_s is None or fwhm_t is None or fwhm_t <= config.auto_sharpen_ratio * fwhm_s


def _check_own_planes(image, variance, mask) -> None:
    for name, a, dtype in (("image", image, np.float32), ("variance", variance, np.float32),
                           ("mask", mask, np.int32)):  # fmt: skip
        if not (a.flags.c_contiguous and a.flags.writeable) or a.dtype != dtype:
            raise ValueError(f"overwrite_template needs writeable C-contiguous template planes (float32 image and "
                             f"variance, int32 mask); the {name} is {a.dtype}, contiguous={a.flags.c_contiguous}, "
                             f"writeable={a.flags.writeable}")  # fmt: skip


def subtract(science: Exposure, template_image, template_variance, template_mask, science_psf_fwhm: float | None,
             template_psf_fwhm: float | None, config: DifferenceConfig = DifferenceConfig(), *,
             template_warped: bool = True, template_border: int = 0, overwrite_template: bool = False) -> Difference:  # fmt: skip
    """PSF-match the template (on the science grid, electrons) to the science exposure, or the reverse, and
    subtract and decorrelate.

    Parameters
    ----------
    science : Exposure
        Background-subtracted calexp (electrons) with variance and mask.
    template_image, template_variance : numpy.ndarray
        Template on the science grid (electrons, electrons²); NaN where missing.
    template_mask : numpy.ndarray or None
        Its mask (``NO_DATA`` = missing).
    science_psf_fwhm, template_psf_fwhm : float or None
        PSF FWHMs in pixels; measured from the images' stars when None (a blank image gives a delta kernel).
    config : DifferenceConfig
    template_warped : keyword, bool
        The template was Lanczos-resampled (its noise is filtered accordingly in the decorrelation); False
        for images already on the same grid.
    template_border : keyword, int
        The template planes extend this many pixels beyond the science frame on every side
        (:func:`warp_template` with ``border``): when the template is the convolved side and the border
        is at least the kernel half-width, the convolution is valid up to the frame's edge, and only a
        2-pixel ``EDGE`` margin is flagged instead of twice the kernel half-width.
    overwrite_template : keyword, bool
        The template planes are the caller's to discard (:func:`difference_exposure`'s fresh warp): their
        missing pixels are zero-filled in place and their buffers are reused for the difference, instead of
        copies (peak memory of a full-size CCD, issue 7). They must then be C-contiguous and writeable
        (image and variance float32; the mask int32 or None). Otherwise the inputs are not modified.

    Returns
    -------
    Difference
        ``image`` = science − matched template (NaN where ``NO_DATA``), its variance and mask, the
        template side as subtracted, kernel facts, flags and metrics.
    """
    return _subtract(science, [template_image, template_variance, template_mask], science_psf_fwhm,
                     template_psf_fwhm, config, template_warped, template_border, overwrite_template)  # fmt: skip


def _subtract(science: Exposure, planes: list, science_psf_fwhm, template_psf_fwhm, config: DifferenceConfig,
              template_warped: bool, template_border: int, overwrite_template: bool) -> Difference:  # fmt: skip
    """:func:`subtract` with the template planes in a list that it empties (so that, when the caller keeps no
    other reference, each plane is freed as soon as it is no longer needed)."""
    t_start = time.perf_counter()
    shape = science.shape
    timings: dict = {}
    b = int(template_border)
    full_shape = (shape[0] + 2 * b, shape[1] + 2 * b)
    tf_img, tf_var, tf_msk = np.asarray(planes[0]), np.asarray(planes[1]), planes[2]
    planes.clear()
    if b < 0 or tf_img.shape != full_shape or tf_var.shape != full_shape:
        raise ValueError(f"template planes {tf_img.shape}/{tf_var.shape} differ from the science image {shape} "
                         f"with a border of {b} pixels")  # fmt: skip
    tf_msk = np.zeros(full_shape, np.int32) if tf_msk is None else np.asarray(tf_msk, np.int32)
    if tf_msk.shape != full_shape:
        raise ValueError(f"template mask {tf_msk.shape} differs from the science image {shape} (border {b})")
    own = bool(overwrite_template)
    if own:
        _check_own_planes(tf_img, tf_var, tf_msk)
    inner = (slice(b, b + shape[0]), slice(b, b + shape[1]))
    t_img, t_var, t_msk = tf_img[inner], tf_var[inner], tf_msk[inner]
    for name, f in (("science_psf_fwhm", science_psf_fwhm), ("template_psf_fwhm", template_psf_fwhm)):
        if f is not None and not (math.isfinite(f) and f > 0):
            raise ValueError(f"{name} must be a positive number of pixels or None, not {f}")
    nd = int(MaskBit.NO_DATA)
    keep = ~_bits(config.clear_mask_bits)
    n_full_missing = 0
    if own:  # zero-fill the template (border included) where it is missing, in place: no copies
        n_full_missing = K.zero_missing(tf_img, tf_var, tf_msk, nd)
    # Known PSFs decide the side now; when the template is the convolved one, the science planes are read
    # only where ``code`` says they are present (kernel stars, subtraction, noise level, final variance), so
    # they need no zero-filled copies (two image-sized planes less at the differencing peak: issue 7).
    side_known = science_psf_fwhm is not None and (config.mode != "auto" or template_psf_fwhm is not None)
    copy_science = not (side_known and _convolve_template(science_psf_fwhm, template_psf_fwhm, config))
    s_img, s_var, tt_img, tt_var, code, mask, _, n_missing = K.prepare_pair(
        science.image, science.variance, science.mask, t_img, t_var, t_msk, nd, keep, _bits(config.bad_mask_bits),
        out=(None, None, t_img, t_var) if own else None, copy_science=copy_science,
    )  # fmt: skip
    if not copy_science:
        s_img, s_var = science.image, science.variance
    coverage = 1.0 - n_missing / float(t_img.size)
    flags: list[str] = []
    metrics: dict = {"template_coverage": coverage}
    timings["prepare"] = time.perf_counter() - t_start
    if n_missing == t_img.size:
        nan = np.full(shape, np.nan, np.float32)
        metrics["seconds"] = timings
        return Difference(nan, nan.copy(), science.mask | nd, nan.copy(), {"method": "none"},
                          ("NO_TEMPLATE_COVERAGE",), metrics)  # fmt: skip
    if n_missing:
        flags.append("PARTIAL_TEMPLATE_COVERAGE")
    t0 = time.perf_counter()
    sci_bad = (code & (K.CODE_SCIENCE_MISSING | K.CODE_FLAGGED)) != 0
    fwhm_s = science_psf_fwhm if science_psf_fwhm is not None else _estimate_fwhm(s_img, s_var, sci_bad)
    fwhm_t = template_psf_fwhm
    if fwhm_t is None:
        fwhm_t = _estimate_fwhm(tt_img, tt_var, (code & K.CODE_TEMPLATE_MISSING) != 0)
    timings["psf_fwhm"] = time.perf_counter() - t0
    conv_template = _convolve_template(fwhm_s, fwhm_t, config)
    if not conv_template and not copy_science:  # cannot happen: the side was known before prepare_pair
        raise AssertionError("the science side is convolved but was not zero-filled")
    if conv_template:
        x_img, x_var, y_img, y_var, fx, fy = s_img, s_var, tt_img, tt_var, fwhm_s, fwhm_t
    else:
        x_img, x_var, y_img, y_var, fx, fy = tt_img, tt_var, s_img, s_var, fwhm_t, fwhm_s

    t0 = time.perf_counter()
    info: dict = {"matched_side": "template" if conv_template else "science", "psf_fwhm_science": fwhm_s,
                  "psf_fwhm_template": fwhm_t}  # fmt: skip
    sol = None
    if fx is not None and fy is not None:
        sol, fit_info, half = _fit(x_img, x_var, y_img, y_var, code, fx, fy, config, shape)
        info.update(fit_info)
        if sol is not None and not sol.at(0.0, 0.0).sum() > 0:
            info["error"] = "the fitted kernel has a non-positive sum"
            sol = None
    if sol is not None:
        kernels, bg, order = sol.kernels, sol.background, sol.spatial_order
        info["method"] = "alard-lupton"
    else:
        flags.append("KERNEL_FIT_FAILED")
        if fx is not None and fy is not None:
            _, half = K.kernel_sigmas(fx, fy)
            sig = math.sqrt(max((fx / FWHM_PER_SIGMA) ** 2 - (fy / FWHM_PER_SIGMA) ** 2, 0.0))
            info["method"] = "gaussian-from-psf-fwhm"
        else:
            sig, half = 0.0, 2
            info["method"] = "delta"
        kernels, bg, order = K.gaussian_kernel(sig, half)[None], np.zeros(1), 0
    info["kernel_half"] = half
    # the difference carries the PSF of the side that was not convolved (the decorrelation keeps its flux)
    info["difference_psf_fwhm"] = fx
    timings["kernel_fit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fshape = K.fft_shape(shape, 2 * half)
    padded = conv_template and b >= half
    # The template's missing pixels near the frame, grown by the kernel's reach, go into the mask (their
    # NO_DATA is grown again with the rest below); done now, the template mask can go before the FFTs.
    n_ring_missing = n_full_missing
    if padded and not own:
        y_full, n_ring_missing = K.fill_missing(tf_img, tf_msk, nd)
    if padded and n_ring_missing:
        if own:  # zero_missing set NO_DATA wherever the template is missing; the mask is ours
            grown = np.bitwise_and(tf_msk, np.int32(nd), out=tf_msk)
        else:
            grown = np.where(~np.isfinite(tf_img) | ((tf_msk & nd) != 0), np.int32(nd), np.int32(0))
        K.dilate_bit(grown, nd, half)
        mask |= grown[inner]
        del grown
    del tf_msk, t_msk
    if padded:
        # the template beyond the frame: zero-filled where missing; its missing pixels near the frame
        # are grown into the frame below
        if own:
            y_full = tf_img
        matched = K.convolve_spatial(y_full, kernels, order, K.fft_shape(full_shape, 2 * half), background=bg,
                                     border=b)  # fmt: skip
        del y_full
    else:
        matched = K.convolve_spatial(y_img, kernels, order, fshape, background=bg)
    timings["convolution"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    k0 = sol.at(0.0, 0.0) if sol is not None else kernels[0]
    kappa = float(k0.sum())
    info["flux_scale"] = kappa
    s2x, s2y = _median_level(x_var, code), _median_level(y_var, code)
    warp_power = None
    if template_warped:
        warp_power = (lanczos_noise_power(np.fft.rfftfreq(fshape[1])), lanczos_noise_power(np.fft.fftfreq(fshape[0])))
    # from the kernel: its spectrum is built in blocks of rows, never as a whole plane
    phi, A, B = K.decorrelation_filter(k0, fshape, s2x, s2y, kappa, warp_power, convolved_warped=conv_template,
                                       decorrelate=config.decorrelate)  # fmt: skip
    # The difference goes into the template image's buffer when that is ours and no longer read (the
    # convolved side's image is dead once matched); the science copy likewise once subtracted.
    diff_buf = None
    if own and conv_template:
        diff_buf = tf_img.reshape(-1)[: shape[0] * shape[1]].reshape(shape)
        del y_img, tt_img, t_img
    diff = K.subtract_images(x_img, matched, code, out=diff_buf)
    del diff_buf
    if conv_template:
        del x_img, s_img
    timings["subtraction"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if config.decorrelate:
        diff = K.apply_filter(diff, phi, fshape, out=diff)
    del phi
    timings["decorrelation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    K.dilate_bit(mask, nd, 2 * half)
    K.border_bit(mask, int(MaskBit.EDGE), 2 if padded else 2 * half)
    scale = 1.0 if conv_template else -kappa
    t_src, t_scale = (matched, 1.0) if conv_template else (x_img, 1.0 / kappa)
    # variance into the science variance copy where there is one (ours), the matched template in place
    variance, template, (zmean, zrms) = K.finalize_difference(
        diff, x_var, y_var, A, B, scale, t_src, t_scale, mask, nd, variance_out=s_var if copy_science else None,
        template_out=matched if conv_template else None,
    )  # fmt: skip
    info.update(decorrelated=config.decorrelate, variance_factors=(A, B), noise_levels=(s2x, s2y))
    metrics.update(diff_mean_sigma=zmean, diff_rms_sigma=zrms, n_kernel_stars=int(info.get("n_stamps", 0)))
    timings["masks"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    metrics["seconds"] = timings
    return Difference(diff, variance, mask, template, info, tuple(flags), metrics)


def difference_exposure(science: Exposure, patches, wcs: WCS, zero_point: float, science_psf_fwhm: float | None,
                        config: DifferenceConfig = DifferenceConfig(), *, consume_patches: bool = False) -> Difference:  # fmt: skip
    """Warp the template patches onto the science grid and a border of the largest kernel half-width
    (:func:`warp_template`), and :func:`subtract`.

    ``consume_patches``: ``patches`` is a list the caller hands over; it is emptied once the patches are
    warped, so that they are freed for the rest of the differencing when the caller holds no other
    reference to them (a full-size CCD's patches are ~250 MB; issue 7).
    """
    t0 = time.perf_counter()
    if consume_patches and not isinstance(patches, list):
        raise ValueError(f"consume_patches needs the patches in a list (which is emptied), not a {type(patches)}")
    given = patches
    patches = list(patches)
    if consume_patches:
        given.clear()
    if not patches:
        nan = np.full(science.shape, np.nan, np.float32)
        return Difference(nan, nan.copy(), science.mask | int(MaskBit.NO_DATA), nan.copy(), {"method": "none"},
                          ("NO_TEMPLATE_COVERAGE",), {"template_coverage": 0.0, "seconds": {}})  # fmt: skip
    border = config.kernel_half if config.kernel_half is not None else K.MAX_KERNEL_HALF
    fwhms = [p.psf_fwhm_pix for p in patches if math.isfinite(p.psf_fwhm_pix) and p.psf_fwhm_pix > 0]
    planes = list(warp_template(patches, wcs, science.shape, zero_point, step=config.warp_step, border=border))
    del patches, given
    t_warp = time.perf_counter() - t0
    # the warped planes are ours: zero-filled in place, reused for the difference, freed when no longer needed
    result = _subtract(science, planes, science_psf_fwhm, float(np.median(fwhms)) if fwhms else None, config,
                       True, border, True)  # fmt: skip
    result.metrics.setdefault("seconds", {})["warp"] = t_warp
    return result
