"""Crosstalk matrices: per-CCD estimates from exposures with bright sources, pooled per vendor over MPI.

Per CCD, :func:`measure_ccd_crosstalk` subtracts the serial overscan row by row and fits the 16×16
coefficients with :func:`kernels.xtalk_fit.fit_crosstalk` (ratio victim / source at the pixels where one
amplifier is bright; pixels of all amplifiers at the same raw ``[y, x]`` are read at the same instant).
:func:`pool_crosstalk` combines the estimates of all CCDs of all ranks per vendor, inverse-variance
weighted, with the same bits for any number of ranks.

File format (read by the camera DAQ and by our ISR, :func:`read_crosstalk`)
---------------------------------------------------------------------------
A FITS file, written atomically, byte-identical for the same inputs (no timestamps):

* HDU 0 (primary, no data): ``FORMAT = 'LSSTPIPE-CROSSTALK'``, ``FMTVER = 1``, ``NAMP = 16``,
  ``VENDORS`` (comma-separated EXTNAMEs), ``AMPORDER`` (the HDU order of the amplifiers: the raw files'
  segment EXTNAMEs, comma-separated, :data:`~lsstpipe.camera.geometry.SEGMENT_ORDER`).
* One image HDU per vendor, ``EXTNAME`` = the vendor name (``ITL``, ``E2V``), sorted by name: float64
  (BITPIX = -64), 16×16. Row ``i`` (FITS axis 2, numpy first index) is the **source** amplifier, column
  ``j`` (FITS axis 1, numpy second index) the **victim**, both in HDU order; ``C[i, j]`` is the fraction
  of the overscan-subtracted signal of amplifier ``i`` that appears in amplifier ``j`` at the same raw
  ``[y, x]``: ``victim_j += C[i, j] * source_i``. The diagonal is zero; unmeasured pairs are zero.
  Keywords ``CTYPE1 = 'VICTIM'``, ``CTYPE2 = 'SOURCE'``, ``BUNIT = 'ADU/ADU'``.
* HDU ``PROVENANCE``: a binary table of ``KEY`` / ``VALUE`` strings, one row per provenance entry,
  sorted by key, each value JSON-encoded.
* Every HDU carries CHECKSUM/DATASUM with a fixed comment; the reader verifies them.

Apply a matrix with :func:`kernels.crosstalk.remove_crosstalk` (the DAQ) or as
``IsrCalibs(crosstalk=...)`` (our ISR); :func:`matrix_for_detector` picks a detector's vendor matrix.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy import ndimage

from kernels.overscan import overscan_levels
from kernels.xtalk_fit import fit_crosstalk
from lsstpipe.camera import Detector
from lsstpipe.camera.geometry import SEGMENT_ORDER
from lsstpipe.io.fitsfile import write_fits_atomic

__all__ = ["CrosstalkEstimate", "measure_ccd_crosstalk", "pool_crosstalk", "write_crosstalk", "read_crosstalk",
           "matrix_for_detector", "CrosstalkFormatError", "FORMAT", "NAMP"]  # fmt: skip

FORMAT = "LSSTPIPE-CROSSTALK"
FORMAT_VERSION = 1
NAMP = 16
#: Largest value of the camera's 18-bit ADCs: a pixel there has an unknown signal.
ADC_MAX = 2**18 - 1
#: Smallest error assigned to a coefficient (noise-free inputs would give infinite weights).
ERROR_FLOOR = 1e-9
_CHECKSUM_COMMENT = "computed by lsstpipe.calib.crosstalk"


class CrosstalkFormatError(ValueError):
    """A crosstalk file is missing, corrupt or not in the documented format; the message names the file."""


@dataclass(frozen=True)
class CrosstalkEstimate:
    """Crosstalk of one CCD.

    Attributes
    ----------
    coeffs : numpy.ndarray
        float64 (16, 16), source × victim, HDU order; 0 where unmeasured and on the diagonal.
    weights : numpy.ndarray
        float64 (16, 16) inverse variances of ``coeffs``; 0 where unmeasured.
    n_sources : int
        Bright regions (connected pixels above the threshold, per amplifier and exposure) used.
    """

    coeffs: np.ndarray
    weights: np.ndarray
    n_sources: int

    def __post_init__(self) -> None:
        for name in ("coeffs", "weights"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.shape != (NAMP, NAMP) or a.dtype != np.float64:
                raise ValueError(f"CrosstalkEstimate.{name} must be a float64 {NAMP}×{NAMP} array, got {_describe(a)}")
            if not np.all(np.isfinite(a)):
                raise ValueError(
                    f"CrosstalkEstimate.{name} has NaN or infinite values; use 0 (weight 0) where unmeasured"
                )
        if np.any(self.weights < 0):
            raise ValueError("CrosstalkEstimate.weights must be ≥ 0 (inverse variances)")
        if int(self.n_sources) != self.n_sources or self.n_sources < 0:
            raise ValueError(f"CrosstalkEstimate.n_sources must be a non-negative integer, got {self.n_sources!r}")


def _describe(a: object) -> str:
    return f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__


def _as_stack(segments: object) -> np.ndarray:
    """A ``(16, rows, cols)`` array from an array, a ``RawExposure`` or a dict of segment name → array."""
    if hasattr(segments, "stack") and callable(segments.stack):
        return np.asarray(segments.stack())
    if isinstance(segments, Mapping):
        missing = [n for n in SEGMENT_ORDER if n not in segments]
        if missing:
            raise ValueError(f"segment dict lacks {missing}; pass all 16 segments (RawExposure.segments)")
        return np.stack([np.asarray(segments[n]) for n in SEGMENT_ORDER])
    return np.asarray(segments)


def _data_region(segments: object, detector: Detector, overscan_corrected: bool) -> np.ndarray:
    """Overscan-corrected float32 data regions ``(16, data_rows, data_cols)``; ADC-clipped pixels NaN."""
    a = _as_stack(segments)
    amps = sorted(detector.amps, key=lambda amp: amp.hdu)
    rows, cols = amps[0].raw_data
    raw_shape = (NAMP, *detector.raw_shape)
    data_shape = (NAMP, rows.stop - rows.start, cols.stop - cols.start)
    if not overscan_corrected:
        if a.shape != raw_shape or a.dtype.kind not in "iu":
            raise ValueError(
                f"detector {detector.name}: raw segments must be integer {raw_shape} (RawExposure.stack()), got "
                f"{a.dtype} {a.shape}; pass overscan_corrected=True for float overscan-subtracted segments"
            )
        orows, ocols = amps[0].raw_serial_overscan
        levels = overscan_levels(a, orows, ocols)
        raw = a[:, rows, cols]
        out = raw.astype(np.float32) - levels.astype(np.float32)[:, :, None]
        out[raw >= ADC_MAX] = np.nan
        return out
    if a.dtype.kind != "f" or a.shape not in (raw_shape, data_shape):
        raise ValueError(
            f"detector {detector.name}: overscan-corrected segments must be float {raw_shape} or data regions "
            f"{data_shape}, got {a.dtype} {a.shape}"
        )
    return a[:, rows, cols] if a.shape == raw_shape else a


def measure_ccd_crosstalk(
    segments_list: Sequence,
    detector: Detector,
    overscan_corrected: bool = False,
    bright: float = 20000.0,
    min_pixels: int = 20,
) -> CrosstalkEstimate:
    """Crosstalk coefficients of one CCD from its exposures with bright (saturated) sources.

    Parameters
    ----------
    segments_list : sequence
        One entry per exposure: the raw segments as :func:`lsstpipe.io.raw.read_raw` gives them
        (``RawExposure``, its ``segments`` dict, or ``RawExposure.stack()``: integer ``(16, raw_rows,
        raw_cols)``, HDU order). With ``overscan_corrected``: float arrays of the raw shape or of the data
        region, overscan already subtracted. Not modified.
    detector : Detector
        The CCD (raw layout).
    overscan_corrected : bool
        Whether the overscan is already subtracted (otherwise it is, row by row).
    bright : float
        Source signal (ADU above the overscan) from which a pixel is used.
    min_pixels : int
        Pairs measured on fewer pixels get weight 0.

    Returns
    -------
    CrosstalkEstimate

    Raises
    ------
    ValueError
        No exposures, or segments of the wrong shape or type for ``detector``.
    """
    if not len(segments_list):
        raise ValueError(f"detector {detector.name}: no exposures given; crosstalk needs exposures with bright sources")
    if len(detector.amps) != NAMP:
        raise ValueError(f"detector {detector.name} has {len(detector.amps)} amplifiers; crosstalk expects {NAMP}")
    stacks = [_data_region(s, detector, overscan_corrected) for s in segments_list]
    fit = fit_crosstalk(stacks, bright=bright)
    n_sources = 0
    for st in stacks:
        with np.errstate(invalid="ignore"):
            mask = st >= bright
        n_sources += sum(ndimage.label(mask[a])[1] for a in range(NAMP))
    good = np.isfinite(fit.coeff) & (fit.npix >= min_pixels) & np.isfinite(fit.error)
    np.fill_diagonal(good, False)
    coeffs = np.where(good, fit.coeff, 0.0)
    err = np.maximum(np.where(good, fit.error, 1.0), ERROR_FLOOR)
    weights = np.where(good, 1.0 / err**2, 0.0)
    return CrosstalkEstimate(coeffs=coeffs + 0.0, weights=weights + 0.0, n_sources=int(n_sources))


def _check_estimates(estimates: object) -> str | None:
    """Why the local pooling input is invalid, or None."""
    if not isinstance(estimates, Sequence):
        return f"estimates must be a list of (vendor, CrosstalkEstimate), got {type(estimates).__name__}"
    for k, item in enumerate(estimates):
        if not (isinstance(item, tuple) and len(item) == 2):
            return f"estimates[{k}] must be a (vendor, CrosstalkEstimate) tuple, got {item!r:.80}"
        vendor, est = item
        if not isinstance(vendor, str) or not vendor or not vendor.isascii() or len(vendor) > 60:
            return f"estimates[{k}]: vendor must be a non-empty ASCII name such as 'ITL', got {vendor!r}"
        if not isinstance(est, CrosstalkEstimate):
            return f"estimates[{k}]: expected a CrosstalkEstimate, got {type(est).__name__}"
    return None


def pool_crosstalk(comm, estimates: list[tuple[str, CrosstalkEstimate]]) -> dict[str, np.ndarray]:
    """Inverse-variance-weighted crosstalk matrix per vendor over all CCDs of all ranks (a collective).

    Every rank calls it with its own CCDs' estimates, each tagged with the CCD's vendor name
    (``detector.vendor.name``). The estimates go into slots of one buffer (rank ``r``'s after those of
    ranks ``< r``) that an ``Allreduce`` sums: every slot has exactly one non-zero contributor, so the sum
    is exact. Each rank then sums ``w C`` and ``w`` per vendor in an order fixed by the estimates' contents,
    not by where they were computed, so the result has the same bits for any number of ranks.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm or None
        The communicator (None: serial).
    estimates : list of (str, CrosstalkEstimate)
        This rank's estimates, tagged with their vendor.

    Returns
    -------
    dict of str to numpy.ndarray
        Vendor → float64 16×16 pooled matrix (source × victim; 0 where no CCD measured a pair), on every
        rank. Vendors with no estimate on any rank are absent.

    Raises
    ------
    ValueError
        On every rank, if the input of any rank is invalid.
    """
    problem = _check_estimates(estimates)
    if comm is None:
        problems, counts = [problem], [len(estimates)] if problem is None else [0]
    else:
        problems = comm.allgather(problem)
        counts = comm.allgather(len(estimates) if problem is None else 0)
    bad = [f"rank {r}: {p}" for r, p in enumerate(problems) if p is not None]
    if bad:
        raise ValueError("pool_crosstalk: invalid estimates; " + "; ".join(bad))
    rank = 0 if comm is None else comm.rank
    vendors_local = [v for v, _ in estimates]
    vendors = vendors_local if comm is None else [v for part in comm.allgather(vendors_local) for v in part]
    total, offset = sum(counts), sum(counts[:rank])
    buf = np.zeros((total, 2, NAMP, NAMP))
    for k, (_, est) in enumerate(estimates):
        buf[offset + k, 0] = est.coeffs + 0.0  # + 0.0 turns -0.0 into +0.0: the sum with zeros is then exact
        buf[offset + k, 1] = est.weights + 0.0
    if comm is not None and comm.size > 1:
        from mpi4py import MPI

        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    pooled = {}
    for vendor in sorted(set(vendors)):
        idx = [k for k in range(total) if vendors[k] == vendor]
        idx.sort(key=lambda k: (buf[k, 0].tobytes(), buf[k, 1].tobytes()))
        wsum = np.zeros((NAMP, NAMP))
        wcsum = np.zeros((NAMP, NAMP))
        for k in idx:
            wsum += buf[k, 1]
            wcsum += buf[k, 1] * buf[k, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            m = np.where(wsum > 0, wcsum / np.where(wsum > 0, wsum, 1.0), 0.0)
        np.fill_diagonal(m, 0.0)
        pooled[vendor] = m + 0.0
    return pooled


def matrix_for_detector(matrices: Mapping[str, np.ndarray], detector: Detector) -> np.ndarray:
    """The matrix of ``detector``'s vendor (for ``IsrCalibs.crosstalk`` or the DAQ's correction)."""
    name = detector.vendor.name
    if name not in matrices:
        raise KeyError(f"no crosstalk matrix for vendor {name!r} (detector {detector.name}); have {sorted(matrices)}")
    return matrices[name]


def _checked_matrix(vendor: object, m: object) -> np.ndarray:
    if not isinstance(vendor, str) or not vendor or not vendor.isascii() or len(vendor) > 60 or "," in vendor:
        raise ValueError(f"vendor names must be non-empty ASCII without commas, got {vendor!r}")
    a = np.asarray(m)
    if a.shape != (NAMP, NAMP) or a.dtype.kind != "f":
        raise ValueError(
            f"crosstalk matrix of {vendor} must be float {NAMP}×{NAMP} (source × victim), got {_describe(a)}"
        )
    if not np.all(np.isfinite(a)):
        raise ValueError(f"crosstalk matrix of {vendor} has NaN or infinite values; write 0 for unmeasured pairs")
    if np.any(np.diag(a) != 0):
        raise ValueError(
            f"crosstalk matrix of {vendor} has a non-zero diagonal; an amplifier does not couple to itself"
        )
    return a.astype(">f8")


def write_crosstalk(path: str | os.PathLike, matrices: Mapping[str, np.ndarray], provenance: Mapping,
                    overwrite: bool = False) -> None:  # fmt: skip
    """Write vendor crosstalk matrices in the documented format (module docstring), atomically.

    Parameters
    ----------
    path : str or os.PathLike
        The file; its directory must exist.
    matrices : dict of str to numpy.ndarray
        Vendor → 16×16 matrix, source × victim, HDU order.
    provenance : dict
        str keys, JSON-serialisable values (inputs, software version, parameters). No timestamps unless
        the caller wants them in the bytes.
    overwrite : bool
        Replace an existing file (otherwise :class:`FileExistsError`).
    """
    path = Path(path)
    if not matrices:
        raise ValueError("no crosstalk matrices to write; pool at least one vendor's estimates first")
    data = {v: _checked_matrix(v, matrices[v]) for v in sorted(matrices)}
    if not isinstance(provenance, Mapping) or not all(isinstance(k, str) for k in provenance):
        raise ValueError("provenance must be a dict with str keys")
    try:
        prov_rows = [(k, json.dumps(provenance[k], sort_keys=True)) for k in sorted(provenance)]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"provenance values must be JSON-serialisable: {exc}") from None
    if path.exists() and not overwrite:
        raise FileExistsError(f"crosstalk file {path} already exists; write a new version or pass overwrite=True")
    primary = fits.PrimaryHDU()
    primary.header["FORMAT"] = (FORMAT, "lsstpipe crosstalk matrices")
    primary.header["FMTVER"] = (FORMAT_VERSION, "format version")
    primary.header["NAMP"] = (NAMP, "amplifiers per CCD")
    primary.header["VENDORS"] = (",".join(data), "EXTNAMEs of the matrix HDUs")
    primary.header["AMPORDER"] = (",".join(SEGMENT_ORDER), "HDU order of the amplifiers (rows and columns)")
    hdus = [primary]
    for vendor, m in data.items():
        hdr = fits.Header()
        hdr["EXTNAME"] = (vendor, "CCD vendor")
        hdr["CTYPE1"] = ("VICTIM", "axis 1 (columns): victim amplifier, HDU order")
        hdr["CTYPE2"] = ("SOURCE", "axis 2 (rows): source amplifier, HDU order")
        hdr["BUNIT"] = ("ADU/ADU", "victim signal per source signal")
        hdus.append(fits.ImageHDU(data=m, header=hdr))
    keys = [k for k, _ in prov_rows]
    vals = [v for _, v in prov_rows]
    kw = max([1, *(len(k.encode()) for k in keys)])
    vw = max([1, *(len(v.encode()) for v in vals)])
    hdus.append(fits.BinTableHDU.from_columns(
        [fits.Column("KEY", f"{kw}A", array=keys), fits.Column("VALUE", f"{vw}A", array=vals)], name="PROVENANCE"))  # fmt: skip
    write_fits_atomic(path, fits.HDUList(hdus), _CHECKSUM_COMMENT)


def read_crosstalk(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a file written by :func:`write_crosstalk`.

    Returns
    -------
    matrices : dict of str to numpy.ndarray
        Vendor → native float64 16×16 matrix (source × victim, HDU order).
    provenance : dict

    Raises
    ------
    CrosstalkFormatError
        Missing file, failed checksum, or not the documented format (the message says what).
    """
    path = Path(path)
    if not path.is_file():
        raise CrosstalkFormatError(f"crosstalk file {path} does not exist; run the calibration products production")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # astropy reports checksum failures as warnings
            with fits.open(path, memmap=False, checksum=True) as hdul:
                hdr = hdul[0].header
                if hdr.get("FORMAT") != FORMAT or hdr.get("FMTVER") != FORMAT_VERSION:
                    raise CrosstalkFormatError(
                        f"{path} is not a {FORMAT} v{FORMAT_VERSION} file (FORMAT={hdr.get('FORMAT')!r}, "
                        f"FMTVER={hdr.get('FMTVER')!r})"
                    )
                if hdr.get("NAMP") != NAMP or hdr.get("AMPORDER") != ",".join(SEGMENT_ORDER):
                    raise CrosstalkFormatError(
                        f"{path}: amplifier count or order differs from the raw files' HDU order"
                    )
                matrices = {}
                for vendor in str(hdr.get("VENDORS", "")).split(","):
                    if vendor not in hdul:
                        raise CrosstalkFormatError(f"{path}: VENDORS lists {vendor!r} but there is no such HDU")
                    m = np.array(hdul[vendor].data, dtype=np.float64)
                    if m.shape != (NAMP, NAMP) or not np.all(np.isfinite(m)):
                        raise CrosstalkFormatError(f"{path}: HDU {vendor} is not a finite {NAMP}×{NAMP} matrix")
                    matrices[vendor] = m
                table = hdul["PROVENANCE"].data
                provenance = {str(k): json.loads(v) for k, v in zip(table["KEY"], table["VALUE"])}
    except CrosstalkFormatError:
        raise
    except (OSError, KeyError, ValueError, Warning) as exc:
        raise CrosstalkFormatError(f"cannot read crosstalk file {path}: {exc}") from None
    return matrices, provenance
