"""Master calibrations of one CCD: bias, dark, flat (per filter), fringe (z, y) and defects.

Pure stages: each takes the CCD's :class:`CalibFrame` s (raw segments and their header values) and the
masters it depends on, and returns a :class:`Master`; reading raws and writing files is the runtime's job
(:mod:`lsstpipe.calib.cpp`), apart from :func:`write_master`/:func:`read_master` which define the file.

Every frame is first reduced with the ISR kernels (:func:`kernels.overscan.overscan_levels`, then
:func:`kernels.isr.isr_ccd`: overscan row by row, crosstalk if a matrix is given, assembly, bias and dark
where they exist, gain for everything but the bias); saturated pixels become NaN. The reduced frames go
into a :class:`FrameStore` (memory, or ``.npy`` files memory-mapped from a scratch directory for large
CCDs) and are combined block of rows by block of rows (:func:`kernels.combine.combine_streaming`), so
N full frames are never in memory at once. Clipping uses the frames' own noise model (read noise and
Poisson noise, :class:`MasterConfig`), the efficient choice for the 5-10 frames of a calibration set.

* **bias**: ADU after overscan subtraction, assembled — :attr:`IsrCalibs.bias`.
* **dark**: electrons per second, bias removed (frames scaled to a common dark time, then divided by it).
* **flat**: frames in electrons, bias and dark removed, scaled to a common level, combined and normalised
  to mean 1 over the good pixels (finite, not a defect).
* **fringe**: from science exposures of a fringe band (the simulator puts fringes only in the sky of
  science frames): ISR with the masters, a plane fitted to the sky and removed, sources masked, divided by
  the sky level; the frames are combined, smoothed over ``fringe_smooth`` pixels and scaled to unit rms.
* **defects**: bad columns and pixels of the flat (response outside ``[bad_flat_low, bad_flat_high]``) and
  hot pixels and columns of the dark, as boxes ``(y0, y1, x0, x1)`` (column runs).

Every master carries its variance, the number of frames used per pixel and the defects it revealed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from kernels.combine import combine_streaming
from kernels.isr import isr_ccd
from lsstpipe.camera import Detector
from lsstpipe.io.fitsfile import read_image
from lsstpipe.pipelines.isr import FRINGE_BANDS, amp_layout, overscan_input

__all__ = ["CalibFrame", "FrameStore", "Master", "MasterConfig", "TooFewFrames", "make_bias", "make_dark",
           "make_flat", "make_fringe", "make_defects", "defect_boxes", "write_master", "read_master",
           "read_master_image", "read_master_defects"]  # fmt: skip

_SAT_BIT, _NODATA_BIT = 1, 2


class TooFewFrames(ValueError):
    """Fewer good frames than :attr:`MasterConfig.min_frames` for a master: it is not made."""


@dataclass(frozen=True)
class MasterConfig:
    """Settings of the master-making stages (recorded as provenance with every master)."""

    nsigma: float = 4.0
    """Clipping threshold of the combination, in standard deviations of the frames' noise model."""
    maxiter: int = 5
    """Largest number of clipping passes."""
    min_frames: int = 3
    """A bias, dark or flat needs at least this many good input frames."""
    min_fringe_frames: int = 1
    """A fringe frame needs at least this many science exposures of its band."""
    block_rows: int = 128
    """Rows per block of the streaming combination."""
    overscan_nsigma: float = 3.0
    """Clipping of the per-row overscan mean (:func:`kernels.overscan.overscan_levels`)."""
    hot_dark_rate: float = 0.1
    """Dark current above which (e-/s, and ``defect_nsigma`` above the noise) a pixel is hot."""
    defect_nsigma: float = 6.0
    """Significance of a hot pixel in the master dark, robust standard deviations."""
    bad_flat_low: float = 0.5
    """Flat response below which a pixel is bad."""
    bad_flat_high: float = 1.5
    """Flat response above which a pixel is bad."""
    fringe_source_nsigma: float = 4.0
    """Pixels this many sky-noise standard deviations above the sky (dilated by 2) are masked as sources."""
    fringe_smooth: int = 2
    """Half-width of the box that smooths the fringe frame (fringes have periods of tens of pixels)."""

    def __post_init__(self) -> None:
        if not (self.nsigma > 0 and self.defect_nsigma > 0 and self.fringe_source_nsigma > 0):
            raise ValueError("nsigma, defect_nsigma and fringe_source_nsigma must be positive")
        if min(self.maxiter, self.min_frames, self.min_fringe_frames, self.block_rows) < 1 or self.fringe_smooth < 0:
            raise ValueError("maxiter, min_frames, min_fringe_frames and block_rows must be ≥ 1, fringe_smooth ≥ 0")
        if not 0 < self.bad_flat_low < 1 < self.bad_flat_high:
            raise ValueError(
                f"need 0 < bad_flat_low < 1 < bad_flat_high, got {self.bad_flat_low}, {self.bad_flat_high}"
            )

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CalibFrame:
    """One raw exposure of the CCD: integer segments ``(16, rows, cols)`` in HDU order and header values."""

    exposure_id: int
    segments: np.ndarray = field(repr=False)
    imgtype: str
    band: str
    exptime: float
    dark_time: float


@dataclass(frozen=True)
class Master:
    """A master calibration of one CCD (assembled float32 planes)."""

    kind: str
    detector: str
    band: str | None
    image: np.ndarray = field(repr=False)
    variance: np.ndarray = field(repr=False)
    n_used: np.ndarray = field(repr=False)
    defects: np.ndarray = field(repr=False)
    inputs: tuple[int, ...] = ()
    metadata: dict = field(default_factory=dict)


class FrameStore:
    """Reduced frames waiting to be combined: in memory, or ``.npy`` files memory-mapped from ``scratch``."""

    def __init__(self, scratch: str | os.PathLike | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(dir=scratch, prefix="cpp-") if scratch is not None else None
        self.frames: list[np.ndarray] = []

    def add(self, frame: np.ndarray) -> None:
        if self._dir is None:
            self.frames.append(frame)
            return
        path = Path(self._dir.name) / f"{len(self.frames)}.npy"
        np.save(path, frame)
        self.frames.append(np.load(path, mmap_mode="r"))

    def __len__(self) -> int:
        return len(self.frames)

    def rows(self, i: int, r0: int, r1: int) -> np.ndarray:
        return self.frames[i][r0:r1]

    def close(self) -> None:
        self.frames = []
        if self._dir is not None:
            self._dir.cleanup()


def _amps(detector: Detector):
    return sorted(detector.amps, key=lambda a: a.hdu)


def reduce_frame(frame: CalibFrame, detector: Detector, config: MasterConfig, *, electrons: bool,
                 bias: np.ndarray | None = None, dark: np.ndarray | None = None, flat: np.ndarray | None = None,
                 crosstalk: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Overscan, crosstalk, assembly, bias, (gain, dark, flat): float32 assembled, NaN where saturated."""
    amps = _amps(detector)
    raw = np.asarray(frame.segments)
    if raw.shape != (len(amps), *detector.raw_shape):
        raise ValueError(f"exposure {frame.exposure_id}: segments {raw.shape} do not match {detector.name}'s raw "
                         f"layout {(len(amps), *detector.raw_shape)}")  # fmt: skip
    levels = overscan_input(raw, detector, config.overscan_nsigma)[0]  # columns: measured in the fused pass
    gains = [a.gain if electrons else 1.0 for a in amps]
    # Absent calibrations as neutral planes: one compiled variant of the fused kernel instead of one per
    # combination of present/absent planes (compilation costs more than the arithmetic on small CCDs).
    zeros = np.zeros(detector.shape, np.float32)
    image, _, mask = isr_ccd(raw, amp_layout(detector), levels, gains, [a.read_noise for a in amps],
                             [a.saturation for a in amps], bias=zeros if bias is None else bias,
                             dark=dark if (electrons and dark is not None) else zeros,
                             flat=np.ones(detector.shape, np.float32) if flat is None else flat,
                             crosstalk=crosstalk, dark_time=frame.dark_time, sat_bit=_SAT_BIT,
                             nodata_bit=_NODATA_BIT, oscan_nsigma=config.overscan_nsigma)  # fmt: skip
    image[(mask & (_SAT_BIT | _NODATA_BIT)) != 0] = np.nan
    return image


def _check_count(kind: str, detector: Detector, n: int, config: MasterConfig, band: str | None = None) -> None:
    least = config.min_fringe_frames if kind.startswith("science") else config.min_frames
    if n < least:
        what = f"{kind}{f' in band {band}' if band else ''}"
        raise TooFewFrames(f"{detector.name}: {n} good {what} frame(s), at least {least} needed "
                           f"(min_frames); take more {what} exposures or lower --min-frames")  # fmt: skip


def _combine(store: FrameStore, detector: Detector, config: MasterConfig, noise: tuple[float, float]):
    return combine_streaming(store.rows, len(store), detector.shape, "clipped_mean", nsigma=config.nsigma,
                             maxiter=config.maxiter, stdfunc="model", noise_model=noise,
                             block_rows=config.block_rows)  # fmt: skip


def _read_noise_e2(detector: Detector) -> float:
    """Largest per-pixel read variance in electrons² (read noise and the ADC's rounding)."""
    return max(a.read_noise**2 + a.gain**2 / 12.0 for a in detector.amps)


def make_bias(frames: Iterable[CalibFrame], detector: Detector, config: MasterConfig = MasterConfig(), *,
              crosstalk: np.ndarray | None = None, scratch: str | os.PathLike | None = None) -> Master:  # fmt: skip
    """Master bias: overscan-corrected zero-second frames, clipped mean, ADU (``IsrCalibs.bias``)."""
    store, ids = FrameStore(scratch), []
    try:
        for f in frames:
            store.add(reduce_frame(f, detector, config, electrons=False, crosstalk=crosstalk))
            ids.append(f.exposure_id)
        _check_count("bias", detector, len(store), config)
        noise = max((a.read_noise / a.gain) ** 2 + 1.0 / 12.0 for a in detector.amps)
        res = _combine(store, detector, config, (noise, 0.0))
    finally:
        store.close()
    return Master("bias", detector.name, None, res.image, res.variance, res.n_used, np.zeros((0, 4), np.int64),
                  tuple(ids), {"unit": "adu", "n_frames": len(ids)})  # fmt: skip


def make_dark(frames: Iterable[CalibFrame], detector: Detector, bias: Master, config: MasterConfig = MasterConfig(),
              *, crosstalk: np.ndarray | None = None, scratch: str | os.PathLike | None = None) -> Master:  # fmt: skip
    """Master dark: bias-removed frames in electrons scaled to their median dark time, clipped mean, per second.
    Hot pixels and columns found in it are its defects."""
    ids, times = [], []
    store = FrameStore(scratch)
    try:
        for f in frames:
            if not f.dark_time > 0:
                raise ValueError(f"exposure {f.exposure_id}: dark frame with dark time {f.dark_time} s; "
                                 "check its DARKTIME/EXPTIME header")  # fmt: skip
            img = reduce_frame(f, detector, config, electrons=True, bias=bias.image, crosstalk=crosstalk)
            times.append(f.dark_time)
            store.add(img / np.float32(f.dark_time))
            ids.append(f.exposure_id)
        _check_count("dark", detector, len(store), config)
        t_ref = float(np.median(times))
        # Rates: clip with the noise of a frame of t_ref seconds (read noise, Poisson), in (e-/s)².
        res = _combine(store, detector, config, (_read_noise_e2(detector) / t_ref**2, 1.0 / t_ref))
    finally:
        store.close()
    defects = defect_boxes(_hot(res.image, res.variance, config))
    return Master("dark", detector.name, None, res.image, res.variance, res.n_used, defects, tuple(ids),
                  {"unit": "electron/s", "n_frames": len(ids), "dark_time": t_ref})  # fmt: skip


def _hot(dark: np.ndarray, variance: np.ndarray, config: MasterConfig) -> np.ndarray:
    finite = np.isfinite(dark)
    med = float(np.median(dark[finite])) if finite.any() else 0.0
    mad = float(np.median(np.abs(dark[finite] - med))) * 1.482602218505602 if finite.any() else 0.0
    cut = max(config.hot_dark_rate, med + config.defect_nsigma * mad)
    with np.errstate(invalid="ignore"):
        return ~finite | (dark > cut)


def make_flat(frames: Iterable[CalibFrame], detector: Detector, band: str, bias: Master, dark: Master | None,
              config: MasterConfig = MasterConfig(), *, crosstalk: np.ndarray | None = None,
              scratch: str | os.PathLike | None = None) -> Master:  # fmt: skip
    """Master flat of ``band``: bias- and dark-removed frames in electrons, each scaled to the frames' mean
    level, clipped mean, normalised to mean 1 over the good pixels. Its defects are the bad pixels."""
    store, ids, levels = FrameStore(scratch), [], []
    try:
        for f in frames:
            if f.band != band:
                raise ValueError(f"exposure {f.exposure_id} is a {f.band!r} flat, not {band!r}")
            img = reduce_frame(f, detector, config, electrons=True, bias=bias.image,
                               dark=None if dark is None else dark.image, crosstalk=crosstalk)  # fmt: skip
            level = float(np.nanmedian(img))
            if not level > 0:
                raise ValueError(f"exposure {f.exposure_id}: flat with median level {level} e-; is the lamp on?")
            store.add(img / np.float32(level))
            ids.append(f.exposure_id)
            levels.append(level)
        _check_count("flat", detector, len(store), config, band)
        ref = float(np.mean(levels))
        # Frames are in units of their level; the noise of one is (read² + ref·x) / ref² at value x.
        res = _combine(store, detector, config, (_read_noise_e2(detector) / ref**2, 1.0 / ref))
    finally:
        store.close()
    image, variance = res.image, res.variance
    bad = _bad_flat(image, config)
    norm = float(np.mean(image[~bad], dtype=np.float64))
    image = image / np.float32(norm)
    variance = variance / np.float32(norm**2)
    bad = _bad_flat(image, config)  # again, on the normalised scale
    return Master("flat", detector.name, band, image, variance, res.n_used, defect_boxes(bad), tuple(ids),
                  {"unit": "relative", "n_frames": len(ids), "mean_level_e": ref})  # fmt: skip


def _bad_flat(flat: np.ndarray, config: MasterConfig) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(flat) | (flat < config.bad_flat_low) | (flat > config.bad_flat_high)


def make_fringe(frames: Iterable[CalibFrame], detector: Detector, band: str, bias: Master, dark: Master | None,
                flat: Master, config: MasterConfig = MasterConfig(), *, crosstalk: np.ndarray | None = None,
                scratch: str | os.PathLike | None = None) -> Master:  # fmt: skip
    """Fringe frame of ``band`` (z or y) from science exposures (see the module docstring): unit rms."""
    from scipy import ndimage

    if band not in FRINGE_BANDS:
        raise ValueError(f"fringes are made for bands {', '.join(FRINGE_BANDS)}, not {band!r}")
    store, ids = FrameStore(scratch), []
    defects = make_defects(detector, [m for m in (dark, flat) if m is not None])
    try:
        for f in frames:
            img = reduce_frame(f, detector, config, electrons=True, bias=bias.image,
                               dark=None if dark is None else dark.image, flat=flat.image, crosstalk=crosstalk)  # fmt: skip
            for y0, y1, x0, x1 in defects:
                img[y0:y1, x0:x1] = np.nan
            store.add(_sky_fraction(img, config, ndimage))
            ids.append(f.exposure_id)
        _check_count("science (fringe)", detector, len(store), config, band)
        res = combine_streaming(store.rows, len(store), detector.shape, "clipped_mean", nsigma=3.0,
                                maxiter=config.maxiter, stdfunc="mad_then_std", block_rows=config.block_rows)  # fmt: skip
    finally:
        store.close()
    image, variance = res.image, res.variance
    if config.fringe_smooth:
        image = _smooth(image, config.fringe_smooth, ndimage)
    good = np.isfinite(image)
    scale = float(np.sqrt(np.mean(np.square(image[good], dtype=np.float64)))) if good.any() else 0.0
    if not scale > 0:
        raise ValueError(f"{detector.name}: the fringe frame of band {band} is empty or flat")
    image = np.where(good, image / np.float32(scale), np.float32(0.0)).astype(np.float32)
    return Master("fringe", detector.name, band, image, (variance / np.float32(scale**2)).astype(np.float32),
                  res.n_used, np.zeros((0, 4), np.int64), tuple(ids),
                  {"unit": "unit rms", "n_frames": len(ids), "smooth": config.fringe_smooth})  # fmt: skip


def _sky_fraction(img: np.ndarray, config: MasterConfig, ndimage) -> np.ndarray:
    """``(image − sky plane) / sky level`` with sources masked (NaN)."""
    ny, nx = img.shape
    yy, xx = np.mgrid[0:ny:4, 0:nx:4]
    sample = img[::4, ::4]
    level = float(np.nanmedian(sample))
    if not level > 0:
        raise ValueError(f"science exposure with sky level {level} e-: cannot measure fringes against it")
    keep = np.isfinite(sample) & (np.abs(sample - level) < 5.0 * np.sqrt(level))
    a = np.stack([np.ones(keep.sum()), xx[keep] / nx, yy[keep] / ny], axis=1)
    coef = np.linalg.lstsq(a, sample[keep].astype(np.float64), rcond=None)[0]
    y, x = np.mgrid[0:ny, 0:nx]
    plane = (coef[0] + coef[1] * x / nx + coef[2] * y / ny).astype(np.float32)
    resid = img - plane
    with np.errstate(invalid="ignore"):
        src = resid > config.fringe_source_nsigma * np.sqrt(level)
    src = ndimage.binary_dilation(src, iterations=2)
    resid[src] = np.nan
    return resid / np.float32(level)


def _smooth(image: np.ndarray, half: int, ndimage) -> np.ndarray:
    """Box mean over ``(2 half + 1)²`` of the finite pixels (normalised convolution)."""
    good = np.isfinite(image)
    size = 2 * half + 1
    num = ndimage.uniform_filter(np.where(good, image, 0.0).astype(np.float64), size, mode="nearest")
    den = ndimage.uniform_filter(good.astype(np.float64), size, mode="nearest")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan).astype(np.float32)


def make_defects(detector: Detector, masters: Iterable[Master]) -> np.ndarray:
    """The union of the masters' defect boxes, as boxes of column runs ``(y0, y1, x0, x1)``."""
    bad = np.zeros(detector.shape, bool)
    for m in masters:
        for y0, y1, x0, x1 in m.defects:
            bad[y0:y1, x0:x1] = True
    return defect_boxes(bad)


def defect_boxes(bad: np.ndarray) -> np.ndarray:
    """Runs of bad pixels along each column as ``(n, 4)`` int64 boxes ``(y0, y1, x0, x1)`` (half-open),
    sorted by column then row."""
    bad = np.asarray(bad, bool)
    pad = np.zeros((bad.shape[0] + 2, bad.shape[1]), np.int8)
    pad[1:-1] = bad
    d = np.diff(pad, axis=0)
    sx, sy = np.nonzero(d.T == 1)
    ex, ey = np.nonzero(d.T == -1)
    out = np.stack([sy, ey, sx, sx + 1], axis=1).astype(np.int64) if len(sx) else np.zeros((0, 4), np.int64)
    assert np.array_equal(sx, ex)
    return out.reshape(-1, 4)


# ---------------------------------------------------------------------------------------------------
# The file of a master
# ---------------------------------------------------------------------------------------------------


def write_master(path: str | os.PathLike, master: Master, provenance: dict) -> None:
    """Write ``master`` as FITS: primary header (kind, detector, band, unit, provenance), IMAGE, VARIANCE,
    NUSED and a DEFECTS table. No dates or checksums with times in them: the same master gives the same bytes."""
    hdr = fits.Header()
    hdr["CALTYPE"] = master.kind
    hdr["DETNAME"] = master.detector
    hdr["FILTER"] = master.band or "NONE"
    hdr["BUNIT"] = str(master.metadata.get("unit", ""))
    hdr["NINPUTS"] = len(master.inputs)
    for key, value in sorted(provenance.items()):
        hdr[f"HIERARCH CPP {key.upper()}"] = value if isinstance(value, int | float | str | bool) else str(value)
    d = master.defects
    hdus = [
        fits.PrimaryHDU(header=hdr),
        fits.ImageHDU(np.asarray(master.image, np.float32), name="IMAGE"),
        fits.ImageHDU(np.asarray(master.variance, np.float32), name="VARIANCE"),
        fits.ImageHDU(np.asarray(master.n_used, np.int16), name="NUSED"),
        fits.BinTableHDU.from_columns([
            fits.Column("y0", "K", array=d[:, 0]), fits.Column("y1", "K", array=d[:, 1]),
            fits.Column("x0", "K", array=d[:, 2]), fits.Column("x1", "K", array=d[:, 3]),
        ], name="DEFECTS"),
        fits.BinTableHDU.from_columns([fits.Column("exposure", "K", array=np.asarray(master.inputs, np.int64))],
                                      name="INPUTS"),
    ]  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fits.HDUList(hdus).writeto(tmp, overwrite=True)
    os.replace(tmp, path)


def _defects(hdul) -> np.ndarray:
    t = hdul["DEFECTS"].data
    return np.stack([t["y0"], t["y1"], t["x0"], t["x1"]], axis=1).astype(np.int64).reshape(-1, 4)


def read_master_image(path: str | os.PathLike) -> np.ndarray:
    """The IMAGE plane (float32) of a file written by :func:`write_master` — what ISR uses — without its
    VARIANCE and NUSED planes and tables (two thirds of the file: a worker loading a full-size CCD's
    masters saves ~0.1–0.25 s and ~190 MB of transient memory per master)."""
    with fits.open(path, memmap=False) as hdul:
        return read_image(hdul["IMAGE"])  # in bands of rows: no memory map or big-endian copy held


def read_master_defects(path: str | os.PathLike) -> np.ndarray:
    """The defect boxes ``(n, 4)`` ``(y0, y1, x0, x1)`` of a file written by :func:`write_master`."""
    with fits.open(path) as hdul:
        return _defects(hdul)


def read_master(path: str | os.PathLike) -> Master:
    """Read a file written by :func:`write_master`."""
    with fits.open(path) as hdul:
        hdr = hdul[0].header
        defects = _defects(hdul)
        band = str(hdr["FILTER"])
        return Master(str(hdr["CALTYPE"]), str(hdr["DETNAME"]), None if band == "NONE" else band,
                      np.array(hdul["IMAGE"].data, np.float32), np.array(hdul["VARIANCE"].data, np.float32),
                      np.array(hdul["NUSED"].data, np.int16), defects,
                      tuple(int(i) for i in hdul["INPUTS"].data["exposure"]), {"unit": str(hdr["BUNIT"])})  # fmt: skip
