"""``lsstpipe subtract SCIENCE.fits TEMPLATE.fits --out DIFF.fits``: PSF-matched difference of two FITS images.

The two images must already be on the same pixel grid (no warping here: resample the template first). Works
on any 2-D FITS images (plain or tile-compressed, integer or float, any HDU), not only the simulator's: each
image gets a mesh background subtracted (unless ``--no-background``); its noise comes from a variance HDU
when one is named, else from the background's rms (plus the sources' Poisson noise with ``--gain``); the PSF
FWHMs are measured from the images' stars unless given. Both images must be in the same units up to a
photometric scale, which the kernel fit measures (``FSCALE`` in the output header).

Output (FITS): primary header with the kernel facts (``KMETHOD``, ``KSIDE``, ``KHALF``, ``NSTAMPS``,
``KCHI2``, ``FSCALE``, ``DFLAGS``) and the science image's header cards (its WCS included) on the HDUs
IMAGE (science − matched template), VARIANCE, MASK (int32, bits of :class:`lsstpipe.pipelines.exposure.MaskBit`)
and TEMPLATE (the matched template as subtracted).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lsstpipe.detect_cli import _hdu_key, _image_of, check_output, replace_atomically

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz")
#: Header cards that describe the stored data rather than the image (not copied to the outputs).
_STRUCTURAL = ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "BSCALE", "BZERO", "BLANK", "PCOUNT",
               "GCOUNT", "XTENSION", "EXTNAME", "CHECKSUM", "DATASUM", "TFIELDS")  # fmt: skip


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``subtract`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "subtract",
        help="PSF-matched difference of two FITS images on the same pixel grid",
        description=(
            "Subtract a mesh background from SCIENCE and TEMPLATE, fit an Alard-Lupton kernel (spatially "
            "varying, with the photometric scale) on bright isolated stars, convolve the image with the "
            "narrower PSF (see --mode), subtract, and decorrelate the noise. Writes the difference, its "
            "variance, mask and the matched template to OUT."
        ),
    )
    p.add_argument("science", help="science FITS image")
    p.add_argument("template", help="template FITS image on the same pixel grid")
    p.add_argument("--out", required=True, help="difference image to write (.fits)")
    p.add_argument("--hdu", default=None, help="HDU index or EXTNAME of the science image (default: first 2-D image)")
    p.add_argument("--template-hdu", default=None, help="HDU index or EXTNAME of the template image")
    p.add_argument("--variance-hdu", default=None, help="HDU of the science variance (default: from the noise)")
    p.add_argument("--template-variance-hdu", default=None, help="HDU of the template variance")
    p.add_argument("--mask-hdu", default=None, help="HDU of a science mask (non-zero = bad)")
    p.add_argument("--template-mask-hdu", default=None, help="HDU of a template mask (non-zero = no data)")
    p.add_argument("--fwhm", type=float, default=None, help="science PSF FWHM in pixels (default: measured)")
    p.add_argument("--template-fwhm", type=float, default=None, help="template PSF FWHM in pixels (default: measured)")
    p.add_argument("--gain", type=float, default=None,
                   help="e-/unit of the science image, adds its sources' Poisson noise (without a variance HDU)")  # fmt: skip
    p.add_argument("--template-gain", type=float, default=None, help="the same for the template")
    p.add_argument("--mode", choices=("auto", "convolve_template", "convolve_science"), default="auto",
                   help="which image to convolve (default auto: the template unless its PSF is much broader)")  # fmt: skip
    p.add_argument("--spatial-order", type=int, default=1, help="kernel spatial polynomial order 0-2 (default 1)")
    p.add_argument("--no-decorrelate", action="store_true", help="skip the noise decorrelation")
    p.add_argument("--no-background", action="store_true", help="the images are already background subtracted")
    p.add_argument("--box", type=int, default=128, help="background mesh cell size in pixels (default 128)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    return p


def _read(path: Path, hdu, var_hdu, mask_hdu, what: str):
    from astropy.io import fits

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what} image)")
    try:
        hdul = fits.open(path, memmap=False)
    except OSError as exc:
        raise ValueError(f"{path} is not a readable FITS file: {exc}") from None
    with hdul:
        image, header = _image_of(hdul, _hdu_key(hdu), str(path), what)
        variance = mask = None
        if var_hdu is not None:
            variance, _ = _image_of(hdul, _hdu_key(var_hdu), str(path), f"{what} variance")
        if mask_hdu is not None:
            mask, _ = _image_of(hdul, _hdu_key(mask_hdu), str(path), f"{what} mask")
        image = np.array(image, dtype=np.float32)
        for name, plane in (("variance", variance), ("mask", mask)):
            if plane is not None and plane.shape != image.shape:
                raise ValueError(f"{path}: the {what} {name} HDU is {plane.shape}, the image {image.shape}")
        header = header.copy()
    if not np.isfinite(image).any():
        raise ValueError(f"{path}: the {what} image has no finite pixel (all NaN/inf): nothing to subtract")
    return image, (None if variance is None else np.array(variance, np.float32)), mask, header


def _prepare(image, variance, mask, gain, box: int, subtract_bkg: bool, what: str):
    """Background-subtracted image, variance and a usable-pixel mask (True = bad)."""
    from kernels.background import estimate_background, subtract_background

    bad = ~np.isfinite(image)
    if mask is not None:
        bad |= np.asarray(mask) != 0
    if variance is not None:
        bad |= ~(np.isfinite(variance) & (variance >= 0))
    if bad.all():
        raise ValueError(f"the {what} image has no usable pixel (all NaN/inf or masked)")
    bkg = None
    if subtract_bkg or variance is None:
        bkg = estimate_background(image, mask=bad, box=box)
    data = subtract_background(image, bkg).astype(np.float32) if subtract_bkg else image
    if variance is None:
        variance = bkg.rms_image() ** 2
        if gain is not None:
            if not gain > 0:
                raise ValueError(f"the {what} gain must be positive, got {gain}")
            variance += np.where(bad, 0, np.maximum(np.nan_to_num(data), 0)) / np.float32(gain)
    return data, variance.astype(np.float32), bad


def _clean_header(header):
    out = header.copy()
    for key in list(out.keys()):
        if key in _STRUCTURAL or key.startswith(("ZIMAGE", "ZBITPIX", "ZNAXIS", "ZTILE", "ZCMPTYPE", "ZNAME", "ZVAL",
                                                  "ZQUANTIZ", "ZDITHER", "ZSIMPLE", "ZEXTEND", "ZTENSION")):  # fmt: skip
            del out[key]
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``lsstpipe subtract``; returns the exit status (bad inputs are raised as ValueError or OSError)."""
    from astropy.io import fits

    from lsstpipe.pipelines.difference import DifferenceConfig, subtract
    from lsstpipe.pipelines.exposure import Exposure, MaskBit

    out = Path(args.out)
    check_output(out, args.overwrite, FITS_SUFFIXES, "be a FITS file (.fits, .fit, .fits.gz)")
    config = DifferenceConfig(mode=args.mode, spatial_order=args.spatial_order, decorrelate=not args.no_decorrelate)
    s_img, s_var, s_mask, s_hdr = _read(Path(args.science), args.hdu, args.variance_hdu, args.mask_hdu, "science")
    t_img, t_var, t_mask, _ = _read(Path(args.template), args.template_hdu, args.template_variance_hdu,
                                    args.template_mask_hdu, "template")  # fmt: skip
    if s_img.shape != t_img.shape:
        raise ValueError(
            f"the science image is {s_img.shape[1]}x{s_img.shape[0]} pixels and the template "
            f"{t_img.shape[1]}x{t_img.shape[0]}: 'lsstpipe subtract' needs two images on the same pixel grid; "
            "resample the template onto the science image first"
        )
    s_data, s_var, s_bad = _prepare(s_img, s_var, s_mask, args.gain, args.box, not args.no_background, "science")
    t_data, t_var, t_bad = _prepare(t_img, t_var, t_mask, args.template_gain, args.box, not args.no_background,
                                    "template")  # fmt: skip
    mask = np.zeros(s_img.shape, np.int32)
    mask[s_bad] = int(MaskBit.BAD)
    mask[~np.isfinite(s_img)] = int(MaskBit.NO_DATA)
    t_mask_out = np.where(t_bad, int(MaskBit.NO_DATA), 0).astype(np.int32)
    science = Exposure(np.where(np.isfinite(s_data), s_data, 0).astype(np.float32), s_var, mask)
    diff = subtract(science, t_data, t_var, t_mask_out, args.fwhm, args.template_fwhm, config, template_warped=False)
    primary = fits.PrimaryHDU()
    info = diff.kernel_info
    primary.header.update({
        "KMETHOD": info.get("method", "none"), "KSIDE": info.get("matched_side", "none"),
        "KHALF": int(info.get("kernel_half", 0)), "NSTAMPS": int(info.get("n_stamps", 0)),
        "KCHI2": float(info.get("chi2", float("nan"))) if "chi2" in info else "n/a",
        "FSCALE": float(info.get("flux_scale", float("nan"))) if "flux_scale" in info else "n/a",
        "DFLAGS": ",".join(diff.flags) or "none", "TCOVER": float(diff.metrics.get("template_coverage", 0.0)),
        "ORIGIN": "lsstpipe subtract",
    })  # fmt: skip
    hdr = _clean_header(s_hdr)
    hdus = [primary]
    for name, data in (("IMAGE", diff.image), ("VARIANCE", diff.variance), ("MASK", diff.mask),
                       ("TEMPLATE", diff.template)):  # fmt: skip
        hdus.append(fits.ImageHDU(data, header=hdr, name=name))
    replace_atomically(out, lambda tmp: fits.HDUList(hdus).writeto(tmp, overwrite=True))
    if not args.quiet:
        m = diff.metrics
        print(
            f"{out.name}: {info.get('method')} kernel (half-width {info.get('kernel_half')} px, "
            f"{info.get('n_stamps', 0)} stars, {info.get('matched_side')} convolved, flux scale "
            f"{info.get('flux_scale', float('nan')):.4f}); difference rms {m.get('diff_rms_sigma', float('nan')):.3f} "
            f"sigma; flags: {', '.join(diff.flags) or 'none'}"
        )
    return 0


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m lsstpipe.subtract_cli``), with lsstpipe's error handling."""
    from lsstpipe.cli_support import standalone_main

    return standalone_main("subtract", add_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
