"""Calibration Products Production over MPI: one task per CCD, masters written and certified.

``run_cpp(request, comm)`` is called by every rank (``jobs/calibration_products.py``). Rank 0 validates the
request, reads the registry and builds one :class:`CcdTask` per detector (its bias, dark, flat and
science exposures); the tasks are scattered round-robin (rank ``r`` gets tasks ``r, r + K, …``; with
K = 1 rank 0 does all of them). Per CCD, in dependency order:

1. **crosstalk** (``main`` mode, when :mod:`lsstpipe.calib.crosstalk` is available): an estimate from the
   CCD's spot-projector exposures (``IMGTYPE='SPOT'``: saturating spots on a few amplifiers at a time; the
   CCD's science exposures, if it has no spot exposure, though a night rarely holds enough bright pixels), then
   :func:`~lsstpipe.calib.crosstalk.pool_crosstalk` across all ranks (a collective, the same bits at any K):
   rank 0 writes the pooled matrix per vendor (what the camera DAQ applies). Each CCD's own matrix — its
   coefficients measured at ≥ 3σ, the pooled vendor values for weak couplings — is written as
   ``crosstalk_{detector}.fits``, certified, and removed from every calibration frame of that CCD;
2. master **bias**, **dark**, **flat** per filter, **fringe** per fringe band (from science exposures), and
   the **defects** (:mod:`lsstpipe.calib.masters`), each written to
   ``REPO/calib/{type}/{run}/{type}_{detector}[_{filter}].fits``.

A corrupt or missing exposure is skipped with a logged reason; a CCD whose master cannot be made (too few
good frames, …) reports the error and the other CCDs go on. Workers return plain results; rank 0 then
certifies every written master in the calibration database ``REPO/calib.sqlite3`` in a fixed order
(detector, type, filter) with its checksum, inputs, software version and parameters, valid from the run's
earliest input exposure on (open-ended: a later run supersedes it), and writes
``REPO/calib/runs/{run}.json``. Files, their checksums and the certified rows (ids and creation times
aside) are identical for any number of ranks.

``pre-drp`` mode makes the per-visit bandpass models with :func:`lsstpipe.calib.bandpass.make_bandpasses`
on rank 0.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lsstpipe import __version__
from lsstpipe.calib.masters import (
    CalibFrame,
    Master,
    MasterConfig,
    make_bias,
    make_dark,
    make_defects,
    make_flat,
    make_fringe,
    write_master,
)
from lsstpipe.camera import Detector, get_camera
from lsstpipe.db.calib import CalibrationDatabase
from lsstpipe.io.raw import RawFormatError, read_raw
from lsstpipe.pipelines.isr import FRINGE_BANDS
from lsstpipe.repo import Repository, sha256_file, write_json
from lsstpipe.runtime.idle import idle_barrier
from lsstpipe.runtime.selfcomm import SelfComm

__all__ = ["CppRequest", "CcdTask", "InputExposure", "CcdResult", "run_cpp", "plan_tasks", "MODES", "calib_db_path"]

log = logging.getLogger("lsstpipe.calib.cpp")
MODES = ("main", "pre-drp")
#: Order in which a CCD's masters are certified.
_TYPE_ORDER = ("crosstalk", "bias", "dark", "flat", "fringe", "defects")


def calib_db_path(repo: str | os.PathLike) -> Path:
    """The calibration database of a repository."""
    return Path(repo) / "calib.sqlite3"


@dataclass(frozen=True)
class CppRequest:
    """What a Calibration Products Production run is asked for (every rank gets the same)."""

    repo: str
    filters: tuple[str, ...] = ()
    """Flat (and fringe) filters; empty: every filter with flat exposures."""
    mode: str = "main"
    detectors: tuple[str, ...] = ()
    """Detector names; empty: every detector with calibration exposures."""
    run: str | None = None
    """Run label (the collection in ``calib/``); default ``{mode}-{day_obs of the first input}``."""
    config: MasterConfig = field(default_factory=MasterConfig)
    crosstalk: bool = True
    """Measure and apply crosstalk (needs :mod:`lsstpipe.calib.crosstalk`)."""
    max_science: int = 10
    """Science exposures per CCD and band used for fringes and crosstalk (the first ones in time)."""
    scratch: str | None = None
    """Directory for the reduced frames of a master (memory-mapped); None: keep them in memory."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.max_science < 1:
            raise ValueError(f"max_science must be ≥ 1, got {self.max_science}")
        if self.run is not None and not (self.run and all(c.isalnum() or c in "-_." for c in self.run)):
            raise ValueError(f"run label {self.run!r} must be letters, digits, '-', '_' or '.'")


@dataclass(frozen=True)
class InputExposure:
    """One raw of a CCD that a master may use."""

    obsid: str
    exposure_id: int
    path: str
    imgtype: str
    band: str
    mjd: float


@dataclass(frozen=True)
class CcdTask:
    """Everything one CCD's masters are made from."""

    detector: str
    bias: tuple[InputExposure, ...]
    dark: tuple[InputExposure, ...]
    flats: tuple[tuple[str, tuple[InputExposure, ...]], ...]
    science: tuple[tuple[str, tuple[InputExposure, ...]], ...]
    missing: tuple[tuple[str, str], ...] = ()
    spots: tuple[InputExposure, ...] = ()
    """Spot-projector exposures (crosstalk)."""
    """(obsid, reason) of registered calibration exposures without a raw for this CCD."""


@dataclass(frozen=True)
class Output:
    """A master written by a worker, to be certified by rank 0."""

    calib_type: str
    detector: str
    filter: str | None
    path: str
    checksum: str
    inputs: tuple[int, ...]
    parameters: dict


@dataclass
class CcdResult:
    """What happened to one CCD."""

    detector: str
    outputs: list[Output] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def exposure_id(day_obs: int, seq_num: int) -> int:
    """The integer id of an exposure (as a visit id: ``day_obs × 100000 + seq_num``)."""
    return int(day_obs) * 100000 + int(seq_num)


def plan_tasks(request: CppRequest) -> tuple[list[CcdTask], str, float, list[str]]:
    """Tasks per CCD, the run label, the validity start (MJD of the first input) and the filters."""
    repo = Repository(request.repo)
    camera = get_camera(repo.read_config()["camera"])
    exposures = {e["obsid"]: e for e in repo.exposures()}
    raws: dict[str, dict[str, str]] = {}
    for r in repo.raws():
        raws.setdefault(r["detector"], {})[r["obsid"]] = r["path"]
    calib = [e for e in exposures.values() if e["imgtype"] in ("BIAS", "DARK", "FLAT")]
    if not calib:
        raise ValueError(
            f"{repo.root} has no bias, dark or flat exposures; simulate them with 'lsstpipe simulate --calibs'"
        )
    flat_bands = sorted({e["band"] for e in calib if e["imgtype"] == "FLAT"}, key="ugrizy".find)
    filters = list(request.filters) or flat_bands
    unknown = [f for f in filters if f not in flat_bands]
    if unknown:
        raise ValueError(f"no flat exposures in filter(s) {', '.join(unknown)}; the repository has flats in "
                         f"{', '.join(flat_bands) or 'none'}")  # fmt: skip
    dets: list[Detector]
    if request.detectors:
        try:
            dets = list(camera.select(list(request.detectors)))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"unknown detector in {','.join(request.detectors)}: {exc}") from None
    else:
        dets = [d for d in camera if d.name in raws]
    if not dets:
        raise ValueError(f"{repo.root} has raws for none of the requested detectors")
    ordered = sorted(exposures.values(), key=lambda e: (e["mjd_obs"], e["obsid"]))
    tasks = []
    for det in dets:
        have = raws.get(det.name, {})
        missing = tuple((e["obsid"], f"no raw of {det.name} registered") for e in ordered
                        if e["imgtype"] in ("BIAS", "DARK", "FLAT") and e["obsid"] not in have)  # fmt: skip

        def pick(imgtype: str, band: str | None = None, limit: int | None = None, det_raws=have):
            out = [InputExposure(e["obsid"], exposure_id(e["day_obs"], e["seq_num"]), str(repo.root / det_raws[e["obsid"]]),
                                 e["imgtype"], e["band"], float(e["mjd_obs"]))
                   for e in ordered if e["imgtype"] == imgtype and e["obsid"] in det_raws
                   and (band is None or e["band"] == band)]  # fmt: skip
            return tuple(out[:limit])

        sci_bands = sorted({e["band"] for e in ordered if e["imgtype"] == "OBJECT"}, key="ugrizy".find)
        tasks.append(CcdTask(det.name, pick("BIAS"), pick("DARK"), tuple((b, pick("FLAT", b)) for b in filters),
                             tuple((b, pick("OBJECT", b, request.max_science)) for b in sci_bands), missing,
                             pick("SPOT")))  # fmt: skip
    first = min(calib, key=lambda e: (e["mjd_obs"], e["obsid"]))
    run = request.run or f"{request.mode}-{first['day_obs']}"
    return tasks, run, float(first["mjd_obs"]), filters


def _frames(inputs: tuple[InputExposure, ...], detector: Detector, skipped: list) -> Iterator[CalibFrame]:
    """The readable frames of ``inputs``; the others are skipped with a logged reason."""
    for e in inputs:
        try:
            raw = read_raw(e.path)
            if raw.detector_name != detector.name:
                raise RawFormatError(f"{e.path} holds detector {raw.detector_name}, not {detector.name}")
            hdr = raw.header
            imgtype = str(hdr.get("IMGTYPE", "")).strip()
            if imgtype != e.imgtype:
                raise RawFormatError(f"{e.path} is IMGTYPE {imgtype!r}; the registry says {e.imgtype!r}")
            exptime = float(hdr["EXPTIME"])
            frame = CalibFrame(e.exposure_id, raw.stack(), imgtype, e.band, exptime,
                               float(hdr.get("DARKTIME", exptime)))  # fmt: skip
        except (RawFormatError, OSError, KeyError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("%s: skipping %s: %s", detector.name, e.obsid, reason)
            skipped.append((e.obsid, reason))
            continue
        yield frame


def _save(repo: Path, run: str, master: Master, parameters: dict, result: CcdResult, kind: str | None = None) -> None:
    kind = kind or master.kind
    name = f"{kind}_{master.detector}{f'_{master.band}' if master.band else ''}.fits"
    path = repo / "calib" / kind / run / name
    provenance = {"run": run, "software": f"lsstpipe {__version__}", "inputs": len(master.inputs)}
    write_master(path, master, provenance)
    result.outputs.append(Output(kind, master.detector, master.band, str(path.relative_to(repo)), sha256_file(path),
                                 master.inputs, parameters))  # fmt: skip


def process_ccd(task: CcdTask, request: CppRequest, run: str, crosstalk: np.ndarray | None) -> CcdResult:
    """Make, write and describe the masters of one CCD; errors are reported, never raised."""
    repo = Path(request.repo)
    det = get_camera(Repository(repo).read_config()["camera"])[task.detector]
    cfg, result = request.config, CcdResult(task.detector, skipped=list(task.missing))
    params = {"config": cfg.as_dict(), "mode": request.mode, "crosstalk_corrected": crosstalk is not None}
    try:
        bias = make_bias(
            _frames(task.bias, det, result.skipped), det, cfg, crosstalk=crosstalk, scratch=request.scratch
        )
        _save(repo, run, bias, params, result)
        dark = make_dark(
            _frames(task.dark, det, result.skipped), det, bias, cfg, crosstalk=crosstalk, scratch=request.scratch
        )
        _save(repo, run, dark, params, result)
    except Exception as exc:  # noqa: BLE001 (reported per CCD; the other CCDs go on)
        result.errors.append(_describe(exc, "bias/dark"))
        return result
    flats = {}
    for band, inputs in task.flats:
        try:
            flats[band] = make_flat(
                _frames(inputs, det, result.skipped),
                det,
                band,
                bias,
                dark,
                cfg,
                crosstalk=crosstalk,
                scratch=request.scratch,
            )
            _save(repo, run, flats[band], params, result)
        except Exception as exc:  # noqa: BLE001
            result.errors.append(_describe(exc, f"flat {band}"))
    for band, inputs in task.science:
        if band not in FRINGE_BANDS or not inputs:
            continue
        if band not in flats:
            log.info("%s: no master flat in %s, so no fringe frame", det.name, band)
            continue
        try:
            fringe = make_fringe(
                _frames(inputs, det, result.skipped),
                det,
                band,
                bias,
                dark,
                flats[band],
                cfg,
                crosstalk=crosstalk,
                scratch=request.scratch,
            )
            _save(repo, run, fringe, params, result)
        except Exception as exc:  # noqa: BLE001
            result.errors.append(_describe(exc, f"fringe {band}"))
    boxes = make_defects(det, [dark, *flats.values()])
    empty = np.zeros(det.shape, np.float32)
    defects = Master("defects", det.name, None, empty, empty, np.zeros(det.shape, np.int16), boxes,
                     tuple(sorted({i for m in (dark, *flats.values()) for i in m.inputs})), {"unit": "boxes"})  # fmt: skip
    _save(repo, run, defects, params, result)
    return result


def _describe(exc: BaseException, what: str) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    message = f"{what}: {type(exc).__name__}: {exc}{where}"
    log.error("%s", message)
    return message


#: A per-CCD coefficient replaces the pooled vendor value when it is measured at this significance (σ).
XT_MIN_SIGNIFICANCE = 3.0


def ccd_crosstalk_matrix(estimate, pooled: np.ndarray) -> np.ndarray:
    """The CCD's own matrix: its measured coefficients where significant (≥ :data:`XT_MIN_SIGNIFICANCE` σ),
    the pooled vendor matrix elsewhere (weak or unmeasured couplings); zero diagonal."""
    sig = np.abs(estimate.coeffs) * np.sqrt(estimate.weights)
    m = np.where((estimate.weights > 0) & (sig >= XT_MIN_SIGNIFICANCE), estimate.coeffs, pooled)
    np.fill_diagonal(m, 0.0)
    return m


def _crosstalk_step(tasks: list[CcdTask], request: CppRequest, run: str, comm, camera) -> tuple[dict, list, str, dict]:
    """Per-CCD estimates and the pooled matrices (collective); (matrices, per-CCD errors, note, estimates)."""
    try:
        from lsstpipe.calib import crosstalk as xt
    except ImportError as exc:
        return {}, [], f"crosstalk skipped: {exc}", {}
    estimates, errors, by_detector = [], [], {}
    for task in tasks:
        det = camera[task.detector]
        skipped: list = []
        inputs = task.spots or tuple(e for _, exps in task.science for e in exps)[: request.max_science]
        segs = [f.segments for f in _frames(inputs, det, skipped)]
        if not segs:
            continue
        try:
            est = xt.measure_ccd_crosstalk(segs, det)
            estimates.append((det.vendor.name, est))
            by_detector[task.detector] = est
        except Exception as exc:  # noqa: BLE001
            errors.append((task.detector, _describe(exc, "crosstalk")))
    idle_barrier(comm)
    pooled = xt.pool_crosstalk(None if comm.size == 1 else comm, estimates)
    empty = sorted(v for v, m in pooled.items() if not np.any(m))
    note = f"no coupling measured for {', '.join(empty)} (no bright sources): not written nor applied" if empty else ""
    return {v: m for v, m in pooled.items() if np.any(m)}, errors, note, by_detector


def run_cpp(request: CppRequest, comm=None) -> dict:
    """Run Calibration Products Production (every rank calls it with the same request).

    Returns
    -------
    dict
        The summary (on rank 0; other ranks get ``{}``): run, mode, valid_start, per-detector status,
        outputs and skipped inputs, ``ok``. It is also written to ``REPO/calib/runs/{run}.json``.

    Raises
    ------
    ValueError
        On every rank, for a bad request or repository (nothing is written).
    """
    comm = comm if comm is not None else SelfComm()
    if request.mode == "pre-drp":
        return _pre_drp(request, comm)
    plan: tuple | None = None
    error = None
    if comm.rank == 0:
        try:
            planned = plan_tasks(request)
            plan, run_label = planned, planned[1]
            db_path = calib_db_path(request.repo)
            if db_path.exists():
                with CalibrationDatabase(db_path) as db, db.db.read() as tx:
                    row = tx.execute("SELECT count(*) FROM calibrations WHERE run = ?", (run_label,)).fetchone()
                n = row[0] if row else 0
                if n:
                    raise ValueError(f"run {run_label!r} is already certified ({n} records); give a new --run label")
        except (ValueError, FileNotFoundError, KeyError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    error = comm.bcast(error, root=0)
    if error is not None:
        raise ValueError(error)
    tasks, run, valid_start, filters = comm.bcast(plan, root=0)
    camera = get_camera(Repository(request.repo).read_config()["camera"])
    mine = comm.scatter([tasks[r :: comm.size] for r in range(comm.size)], root=0)
    matrices: dict[str, np.ndarray] = {}
    xt_errors: list[tuple[str, str]] = []
    note = "crosstalk not requested"
    ccd_estimates: dict = {}
    if request.crosstalk:
        matrices, xt_errors, note, ccd_estimates = _crosstalk_step(mine, request, run, comm, camera)
    results = []
    for task in mine:
        det = camera[task.detector]
        m = matrices.get(det.vendor.name)
        if m is not None and task.detector in ccd_estimates:
            m = ccd_crosstalk_matrix(ccd_estimates[task.detector], m)
        res = process_ccd(task, request, run, m)
        res.errors[:0] = [e for d, e in xt_errors if d == task.detector]
        if m is not None and res.ok:
            _save_crosstalk(Path(request.repo), run, det, m, res)
        results.append(res)
    idle_barrier(comm)  # ranks with fewer CCDs wait without taking cores from the others
    gathered = comm.gather(results, root=0)
    if comm.rank != 0:
        return {}
    by_det = {r.detector: r for part in gathered for r in part}
    ordered = [by_det[t.detector] for t in tasks]
    return _finish(request, run, valid_start, filters, ordered, matrices, note, camera)


def _save_crosstalk(repo: Path, run: str, det: Detector, matrix: np.ndarray, result: CcdResult) -> None:
    """Write and describe the CCD's own crosstalk matrix (the one its ISR and its masters use)."""
    from lsstpipe.calib.crosstalk import write_crosstalk

    path = repo / "calib" / "crosstalk" / run / f"crosstalk_{det.name}.fits"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_crosstalk(path, {det.vendor.name: matrix}, {"run": run, "software": f"lsstpipe {__version__}",
                    "detector": det.name, "pooled": f"crosstalk_{det.vendor.name}.fits"}, overwrite=True)  # fmt: skip
    result.outputs.append(Output("crosstalk", det.name, None, str(path.relative_to(repo)), sha256_file(path), (),
                                 {"vendor": det.vendor.name, "min_significance": XT_MIN_SIGNIFICANCE}))  # fmt: skip


def _finish(request, run, valid_start, filters, results, matrices, note, camera) -> dict:
    repo = Path(request.repo)
    outputs = [o for r in results for o in r.outputs]
    if matrices:
        from lsstpipe.calib.crosstalk import write_crosstalk

        for vendor in sorted(matrices):
            path = repo / "calib" / "crosstalk" / run / f"crosstalk_{vendor}.fits"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_crosstalk(path, {vendor: matrices[vendor]}, {"run": run, "software": f"lsstpipe {__version__}"},
                            overwrite=True)  # fmt: skip
            # the pooled vendor matrix is the DAQ's; each CCD's own matrix is certified with its masters
    order = {d.name: k for k, d in enumerate(camera)}
    outputs.sort(key=lambda o: (order[o.detector], _TYPE_ORDER.index(o.calib_type), o.filter or ""))
    software = f"lsstpipe {__version__}"
    with CalibrationDatabase(calib_db_path(repo)) as db:
        for o in outputs:
            db.certify(o.calib_type, o.detector, o.filter, valid_start, None, path=o.path, checksum=o.checksum,
                       inputs=o.inputs, software_version=software, parameters=o.parameters, run=run)  # fmt: skip
    summary = {
        "run": run, "mode": request.mode, "valid_start": valid_start, "filters": filters,
        "crosstalk": {"files": {v: f"calib/crosstalk/{run}/crosstalk_{v}.fits" for v in sorted(matrices)},
                      "note": note},
        "detectors": {r.detector: {"ok": r.ok, "errors": r.errors, "skipped": [list(s) for s in r.skipped],
                                   "outputs": [asdict(o) for o in r.outputs]} for r in results},
        "failed": [r.detector for r in results if not r.ok], "ok": all(r.ok for r in results),
    }  # fmt: skip
    write_json(repo / "calib" / "runs" / f"{run}.json", summary)
    return summary


def _pre_drp(request: CppRequest, comm) -> dict:
    """Per-visit bandpasses on rank 0 (:func:`lsstpipe.calib.bandpass.make_bandpasses`), one version per run,
    certified per band (detector ``focal_plane``) from the first visit's time on."""
    summary: dict = {}
    error = None
    if comm.rank == 0:
        try:
            summary = _make_bandpasses(request)
        except (ValueError, FileNotFoundError, FileExistsError, ImportError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    error = comm.bcast(error, root=0)
    if error is not None:
        raise ValueError(error)
    return summary


def _make_bandpasses(request: CppRequest) -> dict:
    from lsstpipe.calib.bandpass import make_bandpasses
    from lsstpipe.repo import read_csv

    repo = Repository(request.repo)
    repo.read_config()
    visits = read_csv(repo.root / "visits.csv") if (repo.root / "visits.csv").is_file() else []
    if not visits:
        raise FileNotFoundError(f"{repo.root} lists no visits (visits.csv); simulate a night into it first")
    first = min(visits, key=lambda v: v["mjd"])
    run = request.run or f"pre-drp-{first['day_obs']}"
    version = make_bandpasses(repo, run)
    path = version / "bandpasses.fits"
    digest = sha256_file(path)
    bands = sorted({str(v["band"]) for v in visits}, key="ugrizy".find)
    with CalibrationDatabase(calib_db_path(repo.root)) as db:
        for band in bands:
            ids = sorted(int(v["visit"]) for v in visits if str(v["band"]) == band)
            db.certify("bandpass", "focal_plane", band, float(first["mjd"]), None,
                       path=str(path.relative_to(repo.root)), checksum=digest, inputs=ids,
                       software_version=f"lsstpipe {__version__}", parameters={"mode": "pre-drp"}, run=run)  # fmt: skip
    summary = {"run": run, "mode": "pre-drp", "ok": True, "bands": bands, "valid_start": float(first["mjd"]),
               "bandpasses": str(version.relative_to(repo.root))}  # fmt: skip
    write_json(repo.root / "calib" / "runs" / f"{run}.json", summary)
    return summary
