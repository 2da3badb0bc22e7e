"""The alert-production chain of one CCD: a pure stage from in-memory inputs to the CCD's outputs.

:func:`process_ccd` runs, in order: ISR of each snap (:func:`lsstpipe.pipelines.isr.run_isr`); cosmic-ray
repair and snap combination (:func:`~lsstpipe.pipelines.isr.combine_snaps`); image characterization
(background, PSF model, astrometric and photometric calibration:
:func:`lsstpipe.pipelines.characterize.characterize`); differencing against the template
(:func:`lsstpipe.pipelines.difference.difference_exposure`); DIASource detection and measurement with forced
photometry on the calexp (:func:`lsstpipe.pipelines.diasources.dia_sources`); forced photometry of the
region's known DIAObjects on the difference image; and the SDQA metrics. No I/O happens here
(:mod:`lsstpipe.pipelines.inputs` reads a repository into :class:`CcdInputs`).

Bad input never crashes the chain when a partial result is meaningful: a CCD without stars, without an
astrometric solution or without template coverage comes back with the stages it could run and ``flags``
saying why the rest did not; inputs that make the CCD unprocessable (wrong raw shape, no snaps) raise
:class:`CcdProcessingError` with a message that says what is wrong.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lsstpipe.camera import Detector
from lsstpipe.pipelines.characterize import Characterization, CharacterizeConfig, characterize
from lsstpipe.pipelines.diasources import DIA_DTYPE, DiaSourceConfig, dia_sources, forced_photometry, psf_stamp_size
from lsstpipe.pipelines.difference import Difference, DifferenceConfig, difference_exposure
from lsstpipe.pipelines.exposure import Exposure
from lsstpipe.pipelines.isr import IsrCalibs, IsrConfig, SnapConfig, combine_snaps, run_isr
from lsstpipe.pipelines.sdqa import ccd_sdqa

__all__ = ["ApConfig", "CcdInputs", "CcdProcessingError", "CcdResult", "FORCED_DTYPE", "process_ccd"]


class CcdProcessingError(ValueError):
    """The CCD's inputs cannot be processed at all (the message says what is wrong and what to do)."""


#: Forced photometry of known DIAObjects on the difference image (Rubin's DiaForcedSource); fluxes nJy.
FORCED_DTYPE = np.dtype(
    [("dia_object_id", "i8"), ("ra", "f8"), ("dec", "f8"), ("x", "f8"), ("y", "f8"), ("psf_flux", "f8"),
     ("psf_flux_err", "f8"), ("science_flux", "f8"), ("science_flux_err", "f8"), ("flags", "i8")]
)  # fmt: skip


@dataclass(frozen=True)
class CcdInputs:
    """Everything one CCD job needs, in memory.

    Attributes
    ----------
    detector : Detector
        The CCD (geometry, amplifiers).
    raw_snaps : tuple of numpy.ndarray
        One integer ``(16, rows, cols)`` segment stack per snap (1 or 2), HDU order.
    snap_metadata : tuple of dict
        Per snap at least ``exptime``, ``dark_time`` and ``band`` (:func:`lsstpipe.pipelines.isr.raw_metadata`).
    calibs : IsrCalibs
        Master calibrations of the detector in the visit's band.
    refcat : numpy.ndarray
        Reference catalogue around the CCD (``ra``, ``dec``, ``{band}_mag``).
    initial_wcs : astropy.wcs.WCS
        The nominal WCS from the boresight and the camera model.
    template_patches : tuple of TemplatePatch
        Template patches overlapping the CCD (empty: no template, no differencing).
    dia_objects : numpy.ndarray or None
        Known DIAObjects of the region (``id``, ``ra``, ``dec``) for forced photometry on the difference.

    Frozen: :func:`process_ccd` never modifies it, except when the caller hands its pixels over with
    ``release_inputs=True``.
    """

    detector: Detector
    raw_snaps: tuple
    snap_metadata: tuple
    calibs: IsrCalibs
    refcat: np.ndarray
    initial_wcs: Any
    template_patches: tuple = ()
    dia_objects: np.ndarray | None = None

    @property
    def band(self) -> str:
        return str(self.snap_metadata[0]["band"])


@dataclass(frozen=True)
class ApConfig:
    """Settings of every stage of :func:`process_ccd`."""

    isr: IsrConfig = field(default_factory=IsrConfig)
    snaps: SnapConfig = field(default_factory=SnapConfig)
    characterize: CharacterizeConfig = field(default_factory=CharacterizeConfig)
    difference: DifferenceConfig = field(default_factory=DifferenceConfig)
    dia: DiaSourceConfig = field(default_factory=DiaSourceConfig)


@dataclass(frozen=True)
class CcdResult:
    """What one CCD produces.

    Attributes
    ----------
    calexp : Exposure
        Background-subtracted calibrated exposure (electrons), mask and variance.
    characterization : Characterization or None
        PSF, WCS, zero point, sources (None if the stage could not run).
    difference : Difference or None
        Difference image, variance, mask, PSF-matched template (None without template or calibration).
    dia_sources : numpy.ndarray
        :data:`lsstpipe.pipelines.diasources.DIA_DTYPE` rows (empty when no difference image).
    forced : numpy.ndarray
        :data:`FORCED_DTYPE` rows for the inputs' DIAObjects on this CCD.
    sdqa : dict
        Per-CCD quality metrics (:func:`lsstpipe.pipelines.sdqa.ccd_sdqa`).
    flags : tuple of str
        Why stages were skipped or results are partial (empty: everything ran).
    dia_stamp_size : int
        Side of the PSF stamps of the DIASources' PSF fits (:func:`~lsstpipe.pipelines.diasources.psf_stamp_size`;
        0 without a difference image).
    timings : dict
        Seconds per stage.
    """

    calexp: Exposure
    characterization: Characterization | None
    difference: Difference | None
    dia_sources: np.ndarray
    forced: np.ndarray
    sdqa: dict
    flags: tuple
    timings: dict
    dia_stamp_size: int = 0


def _psf_stamps(char: Characterization | None):
    if char is None or char.psf is None:
        return None

    def stamps(x, y, size):
        return np.stack([char.psf.stamp(float(a), float(b), size, normalize="total") for a, b in zip(x, y)]) if len(x) else \
            np.zeros((0, size, size))  # fmt: skip

    return stamps


def _release(inputs: CcdInputs, *names: str) -> None:
    """Drop ``inputs``' references to the named pixel data (``process_ccd(..., release_inputs=True)``).

    ``CcdInputs`` is frozen so that no stage modifies a caller's inputs by accident; handing the pixels
    over is the one deliberate exception, asked for by the caller, hence ``object.__setattr__``."""
    empty = {"raw_snaps": (), "calibs": None, "template_patches": ()}
    for name in names:
        object.__setattr__(inputs, name, empty[name])


def _isr(inputs: CcdInputs, config: ApConfig, release: bool) -> Exposure:
    if not 1 <= len(inputs.raw_snaps) <= 2 or len(inputs.snap_metadata) != len(inputs.raw_snaps):
        hint = " (its raws were handed over to an earlier process_ccd(..., release_inputs=True): load the inputs " \
            "again)" if inputs.calibs is None and not inputs.raw_snaps else ""  # fmt: skip
        raise CcdProcessingError(f"{inputs.detector.name}: expected 1 or 2 snaps with one metadata dict each, got "
                                 f"{len(inputs.raw_snaps)} snaps and {len(inputs.snap_metadata)} metadata{hint}")  # fmt: skip
    raws, calibs = list(inputs.raw_snaps), inputs.calibs
    if release:  # from here on each raw lives until its ISR, the calibrations until the last one
        _release(inputs, "raw_snaps", "calibs")
    snaps = []
    try:
        for k, meta in enumerate(inputs.snap_metadata):
            raw, raws[k] = raws[k], None
            snaps.append(run_isr(raw, inputs.detector, calibs, meta, config.isr))
            del raw
    except ValueError as exc:
        raise CcdProcessingError(f"{inputs.detector.name}: ISR cannot run: {exc}") from exc
    del calibs
    if len(snaps) == 1:
        return snaps[0]
    # the visit reuses snap 0's planes; snap 1's are freed on return (memory: issue 7)
    return combine_snaps(snaps[0], snaps[1], config.snaps, overwrite=True)


def process_ccd(inputs: CcdInputs, config: ApConfig = ApConfig(), *, release_inputs: bool = False) -> CcdResult:
    """Run the whole per-CCD alert-production chain (see the module docstring).

    Parameters
    ----------
    inputs : CcdInputs
    config : ApConfig
    release_inputs : keyword, bool
        The caller hands the inputs' pixel data over to the chain: each raw snap is dropped from ``inputs``
        once its ISR no longer needs it, the master calibrations after ISR and the template patches once
        warped (``inputs.raw_snaps`` and ``inputs.template_patches`` become ``()``, ``inputs.calibs``
        None), so that a caller holding no other reference to them gets them freed while the chain still
        runs. On a full-size LSSTCam CCD that is ~600 MB of inputs, and the chain's peak resident memory
        falls from ~1.6 to ~1.35 GB (``benchmarks/ccd_chain.py``; a worker pod has 2 GiB: issue 7).
        ``inputs`` cannot be processed again. Default False: ``inputs`` is left as it was.

    Raises
    ------
    CcdProcessingError
        When the raws cannot be processed at all (wrong shape, missing metadata, no snaps).
    """
    flags: list[str] = []
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    visit = _isr(inputs, config, release_inputs)
    timings["isr"] = time.perf_counter() - t0

    t = time.perf_counter()
    char = characterize(visit, inputs.refcat, inputs.initial_wcs, inputs.band, config.characterize)
    timings["characterize"] = time.perf_counter() - t
    flags.extend(char.flags)
    calexp = char.exposure
    del visit  # its image plane is superseded by the background-subtracted calexp (variance and mask are shared)
    psf_stamps = _psf_stamps(char)
    cy, cx = (s / 2 - 0.5 for s in calexp.shape)
    science_fwhm = (
        float(char.psf.fwhm(cx, cy)) if char.psf is not None else float(char.metrics.get("psf_fwhm_pix", np.nan))
    )

    diff: Difference | None = None
    dia = np.zeros(0, DIA_DTYPE)
    forced = np.zeros(0, FORCED_DTYPE)
    dia_stamp = 0
    calibrated = char.wcs is not None and np.isfinite(char.zero_point) and np.isfinite(science_fwhm)
    if not calibrated:
        flags.append("NOT_CALIBRATED")
    elif not inputs.template_patches:
        flags.append("NO_TEMPLATE")
    else:
        t = time.perf_counter()
        patches = list(inputs.template_patches)
        if release_inputs:
            _release(inputs, "template_patches")
        diff = difference_exposure(calexp, patches, char.wcs, char.zero_point, science_fwhm, config.difference,
                                   consume_patches=release_inputs)  # fmt: skip
        del patches
        timings["difference"] = time.perf_counter() - t
        flags.extend(f for f in diff.flags if f not in flags)
        diff_fwhm = float(diff.kernel_info.get("difference_psf_fwhm", science_fwhm))
        dia_stamp = psf_stamp_size(config.dia, diff_fwhm)
        t = time.perf_counter()
        dia = dia_sources(diff.image, diff.variance, diff.mask, calexp, diff_fwhm, char.zero_point, char.wcs,
                          psf_stamps if diff_fwhm == science_fwhm else None, config.dia)  # fmt: skip
        if inputs.dia_objects is not None and len(inputs.dia_objects):
            forced = _forced_dia_objects(inputs.dia_objects, diff, calexp, char, diff_fwhm, psf_stamps, science_fwhm)
        timings["dia_sources"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    sdqa = ccd_sdqa(calexp, char, diff, dia, timings)
    return CcdResult(calexp, char, diff, dia, forced, sdqa, tuple(flags), timings, dia_stamp)


def _forced_dia_objects(objects, diff: Difference, calexp: Exposure, char: Characterization, diff_fwhm: float,
                        psf_stamps, science_fwhm: float) -> np.ndarray:  # fmt: skip
    x, y = char.wcs.all_world2pix(np.asarray(objects["ra"], float), np.asarray(objects["dec"], float), 0)
    ny, nx = calexp.shape
    on = np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)
    objects, x, y = objects[on], x[on], y[on]
    out = np.zeros(len(objects), FORCED_DTYPE)
    if not len(out):
        return out
    same = diff_fwhm == science_fwhm
    dexp = Exposure(diff.image, diff.variance, diff.mask)
    pf, pe, pfl = forced_photometry(dexp, x, y, psf_stamps if same else None, diff_fwhm, char.zero_point)
    sf, se, _ = forced_photometry(calexp, x, y, psf_stamps, science_fwhm, char.zero_point)
    out["dia_object_id"], out["ra"], out["dec"] = objects["id"], objects["ra"], objects["dec"]
    out["x"], out["y"] = x, y
    out["psf_flux"], out["psf_flux_err"] = pf, pe
    out["science_flux"], out["science_flux_err"] = sf, se
    out["flags"] = pfl
    return out
