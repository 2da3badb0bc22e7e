"""``lsstpipe detect IMAGE.fits [--hdu N] --out CAT``: background, detection and measurement of any FITS image.

Works on any 2-D FITS image (plain or tile-compressed, any HDU), not only the simulator's: the PSF FWHM is
measured from the image's stars unless ``--fwhm`` is given, and the noise comes from a variance HDU when one
is named, else from the background's rms (plus the sources' Poisson noise with ``--gain``). The catalogue is
written as CSV (``.csv``) or a FITS binary table (``.fits``, ``.fit``, ``.fits.gz``); its columns are
described in :data:`lsstpipe.pipelines.detection.CATALOG_DTYPE` and the bits of ``flags`` in
:mod:`kernels.measure`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``detect`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "detect",
        help="detect and measure the sources of a FITS image into a CSV or FITS catalogue",
        description=(
            "Subtract a mesh background, detect sources with a PSF-matched filter at THRESHOLD sigma and "
            "measure them (centroid, aperture and PSF flux, shape a/b/theta, trail, flags). Columns: id, x, y "
            "(0-based pixels), flux (aperture), flux_err, psf_flux, psf_flux_err, a, b, theta (radians from "
            "+x), x2, y2, xy, trail_length, trail_angle, snr, npix, bbox_size, sign, flags."
        ),
    )
    p.add_argument("image", help="FITS file (plain or tile-compressed)")
    p.add_argument("--out", required=True, help="catalogue to write: .csv or .fits")
    p.add_argument("--hdu", default=None,
                   help="HDU index or EXTNAME of the image (default: the first HDU with a 2-D image)")  # fmt: skip
    p.add_argument("--variance-hdu", default=None, help="HDU index or EXTNAME of a variance plane")
    p.add_argument("--mask-hdu", default=None, help="HDU index or EXTNAME of a mask plane (non-zero = bad)")
    p.add_argument("--fwhm", type=float, default=None, help="PSF FWHM in pixels (default: measured)")
    p.add_argument("--threshold", type=float, default=5.0, help="detection threshold in sigma (default 5)")
    p.add_argument("--aperture", type=float, default=None, help="aperture radius in pixels (default 2 x FWHM)")
    p.add_argument("--negative", action="store_true", help="also detect negative sources (difference images)")
    p.add_argument("--no-background", action="store_true", help="do not subtract a background")
    p.add_argument("--box", type=int, default=128, help="background mesh cell size in pixels (default 128)")
    p.add_argument("--gain", type=float, default=None, help="e-/ADU, adds the sources' Poisson noise")
    p.add_argument("--saturation", type=float, default=None,
                   help="saturation level (default: the SATURATE header keyword, if any)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    return p


def _hdu_key(value: str | None):
    if value is None:
        return None
    return int(value) if value.lstrip("-").isdigit() else value


def _image_of(hdul, key, path: str, what: str) -> tuple[np.ndarray, object]:
    """The 2-D data of HDU ``key`` (or the first 2-D image), with its header."""
    if key is None:
        for hdu in hdul:
            if hdu.is_image and hdu.header.get("NAXIS", 0) >= 2:
                key = hdu
                break
        else:
            raise ValueError(f"{path} has no HDU with 2-D image data; is it a table-only file?")
    else:
        try:
            key = hdul[key]
        except (KeyError, IndexError):
            names = ", ".join(f"{i}:{h.name}" for i, h in enumerate(hdul))
            raise ValueError(f"{path} has no {what} HDU {key!r} (HDUs: {names})") from None
    hdu = key
    if not hdu.is_image:
        raise ValueError(f"{what} HDU {hdu.name!r} of {path} has no image data; choose another with --hdu")
    try:
        data = hdu.data
    except (ValueError, TypeError, IndexError, OSError, EOFError) as exc:  # astropy's errors on short/bad data
        raise ValueError(
            f"{path}: cannot read the pixels of {what} HDU {hdu.name!r} ({exc}): the file looks truncated or "
            "corrupt; check its size against the original, or copy or download it again"
        ) from None
    if data is None:
        raise ValueError(f"{what} HDU {hdu.name!r} of {path} has no image data; choose another with --hdu")
    data = np.asarray(data)
    while data.ndim > 2 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise ValueError(f"{what} HDU {hdu.name!r} of {path} is {data.ndim}-D {data.shape}, not a 2-D image")
    return data, hdu.header


def check_output(out: Path, overwrite: bool, suffixes: tuple[str, ...], must: str) -> None:
    """Check, before any work, that ``out`` can be written: its suffix (else "--out must ``must``"), not a
    directory, in an existing directory, and not an existing file unless ``overwrite``."""
    if not out.name.lower().endswith(suffixes):
        raise ValueError(f"--out must {must}, not {out.name!r}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name, e.g. {out / ('x' + suffixes[0])}")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the directory {out.parent} does not exist; create it first")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; use --overwrite to replace it")


def replace_atomically(out: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``out`` (with the same suffix), then move it onto
    ``out``: a failed write leaves an existing ``out`` as it was."""
    import os

    tmp = out.with_name(f".tmp{os.getpid()}.{out.name}")
    try:
        write(tmp)
        os.replace(tmp, out)
    except OSError as exc:  # name the file asked for, not the temporary one
        raise OSError(exc.errno, exc.strerror or str(exc), str(out)) from None
    finally:
        tmp.unlink(missing_ok=True)


def _write(cat: np.ndarray, out: Path, overwrite: bool) -> None:
    from astropy.table import Table

    check_output(out, overwrite, (".csv", *FITS_SUFFIXES), "end in .csv or .fits")
    table = Table(cat)
    fmt = "ascii.csv" if out.name.lower().endswith(".csv") else "fits"
    replace_atomically(out, lambda tmp: table.write(tmp, format=fmt, overwrite=True))


def run(args: argparse.Namespace) -> int:
    """Run ``lsstpipe detect``; returns the exit status (bad inputs are raised as ValueError or OSError)."""
    from astropy.io import fits

    from lsstpipe.pipelines.detection import detect_and_measure

    path = Path(args.image)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    out = Path(args.out)
    check_output(out, args.overwrite, (".csv", *FITS_SUFFIXES), "end in .csv or .fits")  # before the work
    try:
        hdul = fits.open(path, memmap=False)
    except OSError as exc:
        raise ValueError(f"{path} is not a readable FITS file: {exc}") from None
    with hdul:
        image, header = _image_of(hdul, _hdu_key(args.hdu), str(path), "image")
        variance = mask = None
        if args.variance_hdu is not None:
            variance, _ = _image_of(hdul, _hdu_key(args.variance_hdu), str(path), "variance")
        if args.mask_hdu is not None:
            mask, _ = _image_of(hdul, _hdu_key(args.mask_hdu), str(path), "mask")
        saturation = args.saturation
        if saturation is None and isinstance(header.get("SATURATE"), (int, float)):
            saturation = float(header["SATURATE"])
        image = image.astype(np.float32) if image.dtype != np.float64 else image
        if not np.isfinite(image).any():
            raise ValueError(f"{path}: the image has no finite pixel (all NaN/inf): nothing to detect")
        cat, summary = detect_and_measure(
            image, variance, mask, psf_fwhm=args.fwhm, threshold=args.threshold, negative=args.negative,
            subtract_background=not args.no_background, box=args.box, aperture_radius=args.aperture,
            saturation=saturation, gain=args.gain, return_summary=True,
        )  # fmt: skip
    _write(cat, out, args.overwrite)
    if not args.quiet:
        how = "measured" if summary.psf_fwhm_estimated else "given"
        print(
            f"{path.name}: {cat.size} sources ({summary.n_positive} positive, {summary.n_negative} negative) "
            f"at {summary.threshold:g} sigma; PSF FWHM {summary.psf_fwhm:.2f} px ({how}); background "
            f"{summary.background_level:.6g} ± {summary.background_rms:.4g}; catalogue {out}"
        )
    return 0


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m lsstpipe.detect_cli``), with lsstpipe's error handling."""
    from lsstpipe.cli_support import standalone_main

    return standalone_main("detect", add_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
