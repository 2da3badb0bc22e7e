"""Instrument signature removal and snap combination: pure stages from raw segments to an :class:`Exposure`.

No I/O happens in :func:`run_isr` or :func:`combine_snaps`; :func:`isr_from_truth` and
:func:`raw_metadata` are the helpers that read a simulated repository (the simulator's truth calibrations
stand in for master calibrations until the Calibration Products Production exists).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kernels import cosmic
from kernels.fringe import fit_fringe
from kernels.isr import AmpLayout, isr_ccd, mask_boxes
from kernels.overscan import overscan_levels
from lsstpipe.camera import Detector, get_camera
from lsstpipe.pipelines.exposure import Exposure, MaskBit

__all__ = ["IsrCalibs", "IsrConfig", "SnapConfig", "run_isr", "combine_snaps", "isr_from_truth", "raw_metadata",
           "amp_layout", "overscan_input", "bias_from_column_pattern", "FRINGE_BANDS"]  # fmt: skip

#: Bands whose sky shows interference fringes.
FRINGE_BANDS = ("z", "y")


@dataclass(frozen=True)
class IsrCalibs:
    """Master calibrations of one detector (any may be None to skip that step).

    Attributes
    ----------
    bias : numpy.ndarray or None
        ADU after overscan subtraction, assembled ``detector.shape`` (the 2-D bias structure).
    dark : numpy.ndarray or None
        Dark current, electrons per second, assembled.
    flat : numpy.ndarray or None
        Relative response in the exposure's band, assembled (non-positive → NO_DATA).
    defects : numpy.ndarray
        ``(n, 4)`` int boxes ``(y0, y1, x0, x1)`` (half-open, assembled) flagged BAD.
    crosstalk : numpy.ndarray or None
        16×16 coefficients, source × victim, HDU order.
    fringe : numpy.ndarray or None
        Fringe pattern (assembled, per unit amplitude) for the z and y bands.
    """

    bias: np.ndarray | None = None
    dark: np.ndarray | None = None
    flat: np.ndarray | None = None
    defects: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    crosstalk: np.ndarray | None = None
    fringe: np.ndarray | None = None


@dataclass(frozen=True)
class IsrConfig:
    """Settings of :func:`run_isr`."""

    overscan_nsigma: float = 3.0
    """Clipping of the per-row overscan mean, in robust standard deviations."""
    overscan_smooth: int = 0
    """Half-width in rows of a running mean of the overscan levels (0: row by row)."""
    crosstalk_tolerance: float = 0.1
    """Largest crosstalk-correction error allowed per pixel, ADU (≪ the ADC's 0.29 ADU rms rounding); weak
    couplings from faint rows are skipped within it (:func:`kernels.isr.isr_ccd`). 0: exact."""
    fringe_step: int = 2
    """The fringe amplitude is fitted on every ``fringe_step``-th pixel in x and y."""
    parallel: bool = False
    """Use numba threads (the worker normally runs one CCD per core instead)."""

    def __post_init__(self) -> None:
        if not self.overscan_nsigma > 0:
            raise ValueError(f"overscan_nsigma must be positive, got {self.overscan_nsigma}")
        if not self.crosstalk_tolerance >= 0:
            raise ValueError(f"crosstalk_tolerance must be ≥ 0 ADU, got {self.crosstalk_tolerance}")
        if self.overscan_smooth < 0 or self.fringe_step < 1:
            raise ValueError("overscan_smooth must be ≥ 0 and fringe_step ≥ 1")


@dataclass(frozen=True)
class SnapConfig:
    """Settings of :func:`combine_snaps` (see :func:`kernels.cosmic.find_snap_cosmic_rays`)."""

    nsigma: float = 5.0
    grow_nsigma: float = 2.5
    contrast: float = 0.1
    dilate: int = 1


def amp_layout(detector: Detector) -> AmpLayout:
    """Where each amplifier of ``detector`` lands in the assembled image (for :func:`kernels.isr.isr_ccd`)."""
    amps = sorted(detector.amps, key=lambda a: a.hdu)
    rows, cols = amps[0].raw_data
    if any(a.raw_data != amps[0].raw_data or a.raw_serial_overscan != amps[0].raw_serial_overscan for a in amps):
        raise ValueError(f"detector {detector.name}: amplifiers with different raw layouts are not supported")
    return AmpLayout(rows, cols, [(a.bbox[0], a.bbox[2]) for a in amps], [a.flip_x for a in amps],
                     [a.flip_y for a in amps], detector.shape)  # fmt: skip


def overscan_input(raw: np.ndarray, detector: Detector, nsigma: float, smooth: int = 0, parallel: bool = False):
    """``(oscan, levels)`` for :func:`kernels.isr.isr_ccd`: the serial overscan columns (the fused pass measures
    each row's level where it reads the row; ``levels`` a float64 array to receive them) when the levels are
    not smoothed and the overscan rows are the data rows, else the levels from
    :func:`~kernels.overscan.overscan_levels` (``oscan`` is ``levels``)."""
    amps = sorted(detector.amps, key=lambda a: a.hdu)
    orows, ocols = amps[0].raw_serial_overscan
    r0, r1, _ = orows.indices(raw.shape[1])
    if smooth == 0 and (r0, r1, 1) == amps[0].raw_data[0].indices(raw.shape[1]):
        return ocols, np.empty((len(amps), r1 - r0))
    levels = overscan_levels(raw, orows, ocols, nsigma, smooth, parallel)
    return levels, levels


def run_isr(raw_segments: np.ndarray, detector: Detector, calibs: IsrCalibs, metadata: dict,
            config: IsrConfig = IsrConfig(), out: Exposure | None = None) -> Exposure:  # fmt: skip
    """Instrument signature removal of one CCD exposure.

    Overscan (robust, row by row), crosstalk, assembly, bias, gain, dark, flat, variance, SAT/NO_DATA/BAD
    masks in one fused pass (:func:`kernels.isr.isr_ccd`), then the fringe fit and subtraction in z and y.

    Parameters
    ----------
    raw_segments : numpy.ndarray
        Integer ``(16, raw_rows, raw_cols)`` segments in HDU order (``RawExposure.stack()``). Not modified.
    detector : Detector
        The CCD (amplifier layout, gains, read noise, saturation).
    calibs : IsrCalibs
        Master calibrations of this detector and band.
    metadata : dict
        At least ``exptime`` and ``dark_time`` (seconds) and ``band``; copied into the result.
    config : IsrConfig
    out : Exposure, optional
        An exposure of this detector whose planes are overwritten (a worker reuses them from one CCD to the
        next: fresh 200 MB planes cost their page faults, ~20 ms). Not for an exposure still in use.

    Returns
    -------
    Exposure
        Electrons (flat-fielded), variance, mask; metadata gains ``fringe_amplitude`` (electrons per unit
        fringe, z/y only) and ``overscan_mean_adu`` (per amplifier).
    """
    for key in ("exptime", "dark_time", "band"):
        if key not in metadata:
            raise ValueError(f"ISR metadata needs {key!r} (exposure time, dark time, band); got {sorted(metadata)}")
    raw = np.asarray(raw_segments)
    shape = (len(detector.amps), *detector.raw_shape)
    if raw.shape != shape:
        raise ValueError(f"raw segments have shape {raw.shape}; detector {detector.name} reads {shape}")
    layout = amp_layout(detector)
    amps = sorted(detector.amps, key=lambda a: a.hdu)
    ocols = amps[0].raw_serial_overscan[1]
    oscan, levels = overscan_input(raw, detector, config.overscan_nsigma, config.overscan_smooth, config.parallel)
    n_os = (ocols.stop - ocols.start) * (2 * config.overscan_smooth + 1)
    image, variance, mask = isr_ccd(
        raw, layout, oscan, [a.gain for a in amps], [a.read_noise for a in amps], [a.saturation for a in amps],
        bias=calibs.bias, dark=calibs.dark, flat=calibs.flat, crosstalk=calibs.crosstalk,
        crosstalk_tolerance=config.crosstalk_tolerance, dark_time=float(metadata["dark_time"]),
        sat_bit=int(MaskBit.SAT), nodata_bit=int(MaskBit.NO_DATA), oscan_noise_rows=n_os,
        oscan_nsigma=config.overscan_nsigma, levels_out=None if oscan is levels else levels, parallel=config.parallel,
        out=None if out is None else (out.image, out.variance, out.mask),
    )  # fmt: skip
    if len(calibs.defects):
        mask_boxes(mask, calibs.defects, int(MaskBit.BAD))
    meta = dict(metadata)
    meta["overscan_mean_adu"] = levels.mean(axis=1).tolist()
    if calibs.fringe is not None and metadata["band"] in FRINGE_BANDS:
        bad = int(MaskBit.SAT | MaskBit.NO_DATA | MaskBit.BAD)
        amp = fit_fringe(image, calibs.fringe, mask, bad_bits=bad, step=config.fringe_step)
        image -= np.float32(amp) * np.asarray(calibs.fringe, np.float32)  # our own plane: in place
        meta["fringe_amplitude"] = amp
    return Exposure(image, variance, mask, meta)


def combine_snaps(exp0: Exposure, exp1: Exposure, config: SnapConfig = SnapConfig(), *,
                  overwrite: bool = False) -> Exposure:  # fmt: skip
    """Find the cosmic rays of two snaps, repair each from the other and sum them.

    Returns an :class:`Exposure` of the visit (electrons over ``exptime0 + exptime1``) with CR (ray) and
    INTRP (repaired) bits; metadata from snap 0 with ``exptime``/``dark_time`` summed and ``n_cr_pixels``.
    With ``overwrite`` the visit is written into ``exp0``'s planes (which then hold the visit, not the snap:
    a worker saves a third set of full-frame planes); otherwise neither snap is modified.
    """
    if exp0.shape != exp1.shape:
        raise ValueError(f"snaps have different shapes {exp0.shape} and {exp1.shape}")
    t0, t1 = float(exp0.metadata.get("exptime", 1.0)), float(exp1.metadata.get("exptime", 1.0))
    bad = int(MaskBit.SAT | MaskBit.NO_DATA | MaskBit.BAD)
    cr0, cr1 = cosmic.find_snap_cosmic_rays(
        exp0.image, exp0.variance, exp1.image, exp1.variance, t0, t1, mask0=exp0.mask, mask1=exp1.mask,
        bad_bits=bad, nsigma=config.nsigma, grow_nsigma=config.grow_nsigma, contrast=config.contrast,
        dilate=config.dilate,
    )  # fmt: skip
    image, variance, mask = cosmic.combine_snaps(
        exp0.image, exp0.variance, exp0.mask, exp1.image, exp1.variance, exp1.mask, cr0, cr1, t0, t1,
        cr_bit=int(MaskBit.CR), intrp_bit=int(MaskBit.INTRP),
        out=(exp0.image, exp0.variance, exp0.mask) if overwrite else None,
    )  # fmt: skip
    meta = dict(exp0.metadata)
    meta["exptime"] = t0 + t1
    meta["dark_time"] = float(exp0.metadata.get("dark_time", t0)) + float(exp1.metadata.get("dark_time", t1))
    meta["n_cr_pixels"] = [int(cr0.sum()), int(cr1.sum())]
    meta["snaps"] = 2
    return Exposure(image, variance, mask, meta)


# ---------------------------------------------------------------------------------------------------
# Helpers that read a simulated repository (not used inside the stages)
# ---------------------------------------------------------------------------------------------------


def raw_metadata(raw) -> dict:
    """ISR metadata (``exptime``, ``dark_time``, ``band``, ``obsid``, ``detector``) from a RawExposure's header."""
    hdr = raw.header
    band = str(hdr.get("FILTER", "NONE")).strip()
    return {
        "exptime": float(hdr["EXPTIME"]), "dark_time": float(hdr.get("DARKTIME", hdr["EXPTIME"])), "band": band,
        "obsid": str(hdr.get("OBSID", "")), "detector": raw.detector_name, "mjd": float(hdr.get("MJD-OBS", np.nan)),
    }  # fmt: skip


def _assemble(blocks: np.ndarray, detector: Detector) -> np.ndarray:
    """Place per-amplifier data blocks ``(16, h, w)`` (raw-segment orientation) in the assembled frame."""
    out = np.empty(detector.shape, np.float32)
    for amp in detector.amps:
        y0, y1, x0, x1 = amp.bbox
        out[y0:y1, x0:x1] = blocks[amp.hdu - 1][:: 1 if amp.flip_y else -1, :: -1 if amp.flip_x else 1]
    return out


def isr_from_truth(repo: str | os.PathLike, detector_name: str, band: str, camera: str | None = None) -> tuple:
    """Master calibrations of one detector from the simulator's instrument truth.

    The bias is the fixed column pattern (``BIAS_COLS``) of each amplifier's data columns minus the mean of
    its serial-overscan columns — what a stack of overscan-corrected bias frames converges to (the row
    pattern and drift are shared with the overscan and removed by it); dark rate, flat of ``band``,
    crosstalk, fringe (z, y) and the bad columns as defects come as written.

    Returns
    -------
    (Detector, IsrCalibs)
    """
    from astropy.io import fits

    from lsstpipe.io.fitsfile import read_image
    from lsstpipe.repo import Repository

    repository = Repository(repo)
    cam = get_camera(camera or repository.read_config()["camera"])
    det = cam[detector_name]
    path = Path(repository.instrument_truth_path(det.name))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no instrument truth for {det.name}; simulate it with --detectors {det.name}")
    with fits.open(path, memmap=False) as hdul:
        names = {h.name.upper() for h in hdul}
        if f"FLAT_{band}".upper() not in names:
            have = ", ".join(sorted(n[5:].lower() for n in names if n.startswith("FLAT_")))
            raise ValueError(f"{path}: no flat in band {band!r} (bands simulated: {have or 'none'})")
        flat = read_image(hdul[f"FLAT_{band}"])  # the planes in bands of rows: no memory map held
        dark = read_image(hdul["DARK_RATE"])
        cols = np.asarray(hdul["BIAS_COLS"].data, np.float64)
        xt = np.asarray(hdul["CROSSTALK"].data, np.float64)
        fringe = read_image(hdul["FRINGE"]) if "FRINGE" in names and band in FRINGE_BANDS else None
        table = hdul["DEFECTS"].data
        defects = np.array([[y0, y1, x, x + 1] for x, y0, y1 in zip(table["x"], table["y0"], table["y1"])], np.int64)
    calibs = IsrCalibs(bias=bias_from_column_pattern(cols, det), dark=dark, flat=flat, defects=defects.reshape(-1, 4),
                       crosstalk=xt, fringe=fringe)  # fmt: skip
    return det, calibs


def bias_from_column_pattern(cols: np.ndarray, detector: Detector) -> np.ndarray:
    """Master bias (ADU after overscan subtraction, assembled) of a bias that varies only along columns.

    ``cols`` is ``(16, raw_cols)`` per amplifier in raw-segment coordinates (the simulator's
    ``BIAS_COLS``); the result is each data column's value minus the mean of the serial-overscan columns.
    """
    amps = sorted(detector.amps, key=lambda a: a.hdu)
    cols = np.asarray(cols, np.float64)
    if cols.shape != (len(amps), detector.raw_shape[1]):
        raise ValueError(f"column pattern must be (namp, raw cols) = {(len(amps), detector.raw_shape[1])}")
    rows, dcols = amps[0].raw_data
    ocols = amps[0].raw_serial_overscan[1]
    h = rows.stop - rows.start
    level = cols[:, ocols].mean(axis=1)
    blocks = np.broadcast_to((cols[:, dcols] - level[:, None])[:, None, :], (len(amps), h, dcols.stop - dcols.start))
    return _assemble(blocks, detector)
