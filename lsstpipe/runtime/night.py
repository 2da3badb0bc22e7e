"""The observing night on MPI: ``mpiexec -n K python -m mpi4py jobs/night.py --repo REPO --out OUT``.

Every rank computes the same layout (:mod:`lsstpipe.runtime.layout`) and splits the world by role. Rank 0
boots the Base DMCS of :mod:`lsstpipe.control` with its control database, plays the OCS script of the
night into it (init, configure and enable the Archiver, the Catch-Up Archiver and the Alert Production
Cluster; the visits' events; the end-of-night disable and release), plays the camera (the CDS buffer
fills at the end of each readout) and schedules the jobs (:mod:`lsstpipe.runtime.dmcs_night`). The other
ranks run their roles' loops — replicator, distributor (:mod:`lsstpipe.runtime.archiving`), worker
(:mod:`lsstpipe.runtime.worker`) — until the DMCS stops them. The night writes ``OUT/manifest.json``
(:mod:`lsstpipe.runtime.manifest`), ``OUT/apdb.sqlite3`` with ``OUT/apdb-config.yaml``, alerts under
``OUT/alerts/``, per-CCD outputs under ``OUT/ccds/``, the control database ``OUT/control.sqlite3``, and
the Base's and the Archive's stores under ``OUT/base`` and ``OUT/archive``.

The night's settings come from a YAML file (``--config``; default: the embedded demo configuration,
``lsstpipe/data/night-demo.yaml``, which documents every key). :func:`validate_config` checks every one
(types, ranges, choices) into a :class:`NightConfig` — in ``lsstpipe night`` before it launches ``mpiexec``
and again on every rank — and every rank checks the repository (its visits, the masters the workers need)
before the first role starts: a bad input is one message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lsstpipe.runtime.checks import check_choice, check_number
from lsstpipe.runtime.faults import FAULT_KINDS, FaultError, parse_faults

if TYPE_CHECKING:
    from lsstpipe.runtime.archiving import ArchiveSettings
    from lsstpipe.runtime.dmcs_night import SchedulerSettings
    from lsstpipe.runtime.layout import LayoutConfig
    from lsstpipe.runtime.worker import WorkerSettings

log = logging.getLogger("lsstpipe.night")

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "data" / "night-demo.yaml"
ENTITY_CONFIGS = ("archiver", "catchup_archiver", "alert_production_cluster", "efd_replicator")
CALIBRATION_MODES = ("calibration", "engineering")


class NightError(RuntimeError):
    """The night cannot start (bad repository, configuration or world size): the message says what to do."""


@dataclass(frozen=True)
class NightConfig:
    """The night's configuration, validated (:func:`validate_config`); ``night-demo.yaml`` documents each key."""

    max_visits: int | None
    calibration_exposures: int
    calibration_mode: str
    time_scale: float
    cadence: float | None
    daytime: bool
    layout: LayoutConfig
    archive: ArchiveSettings
    worker: WorkerSettings
    scheduler: SchedulerSettings
    alert_batch_size: int
    pipeline: Mapping[str, Any]
    """Overrides of the Alert Production Cluster's science configuration's ``pipeline`` section."""

    @property
    def needs_masters(self) -> bool:
        """Whether workers read certified master calibrations (``worker.calibs`` is not ``truth``)."""
        return self.worker.calibs != "truth"


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """The night's configuration: the embedded demo defaults, overridden by ``path``; unknown keys are errors.

    Raises
    ------
    NightError
        ``path`` cannot be read, is not YAML (the message gives the line), or is not a mapping of known keys.
    """
    base = yaml.safe_load(DEFAULT_CONFIG.read_text())
    if path is None:
        return base
    p = Path(path)
    if not p.is_file():
        raise NightError(f"--config {p}: no such file (the embedded default is {DEFAULT_CONFIG})")
    try:
        extra = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(str(x) for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x)
        raise NightError(f"--config {p}: not valid YAML{where}: {what or exc}; fix the file (the embedded "
                         f"default, {DEFAULT_CONFIG}, shows every key)") from exc  # fmt: skip
    except (OSError, UnicodeDecodeError) as exc:
        raise NightError(f"--config {p}: cannot be read ({exc})") from exc
    if not isinstance(extra, dict):
        raise NightError(f"--config {p}: a night configuration is a mapping of keys to values, not "
                         f"{type(extra).__name__} {extra!r}")  # fmt: skip
    unknown = sorted(str(k) for k in set(extra) - set(base))
    if unknown:
        raise NightError(f"--config {p}: unknown key(s) {', '.join(unknown)}; keys are {', '.join(sorted(base))}")
    for key, value in extra.items():
        if isinstance(base[key], dict) and isinstance(value, dict):
            bad = sorted(str(k) for k in set(value) - set(base[key]))
            if bad and key not in ("layout", "pipeline"):  # checked by validate_config
                raise NightError(f"--config {p}: unknown {key} key(s) {', '.join(bad)}; they are "
                                 f"{', '.join(sorted(base[key]))}")  # fmt: skip
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def read_config(path: str | os.PathLike | None) -> NightConfig:
    """:func:`load_config` then :func:`validate_config`: the night's settings, every one checked."""
    return validate_config(load_config(path), f"--config {path}" if path is not None else "the embedded configuration")


def validate_config(config: Mapping[str, Any], source: str = "the night configuration") -> NightConfig:
    """Every setting of a night configuration (:func:`load_config`) built and range-checked.

    Parameters
    ----------
    config : mapping
        The merged configuration (every key of ``night-demo.yaml``).
    source : str
        Where it came from (``--config night.yaml``), at the start of every message.

    Raises
    ------
    NightError
        A setting of the wrong type or out of range: the message names the key, the value and what is
        allowed.
    """
    from lsstpipe.runtime.archiving import ArchiveSettings
    from lsstpipe.runtime.dmcs_night import SchedulerSettings
    from lsstpipe.runtime.layout import LayoutConfig, settings_from_mapping
    from lsstpipe.runtime.worker import WorkerSettings

    def section(key: str, cls: type, check: Any = None) -> Any:
        built: Any = settings_from_mapping(cls, config[key], key, NightError)
        try:
            if check is not None:
                check(built)
        except ValueError as exc:
            raise NightError(f"{key}: {exc}") from exc
        return built

    try:
        clock, alerts = config["clock"], config["alerts"]
        for key, value in (("clock", clock), ("alerts", alerts)):
            if not isinstance(value, Mapping):
                raise NightError(f"{key} must be a mapping of settings to values, not {type(value).__name__} "
                                 f"{value!r}")  # fmt: skip
        checks = (("max_visits", "max_visits", config["max_visits"], dict(integer=True, least=1, optional=True)),
                  ("calibration_exposures", "calibration_exposures", config["calibration_exposures"],
                   dict(integer=True, least=0)),
                  ("time_scale", "clock.time_scale", clock["time_scale"], dict(least=0.0, above=True)),
                  ("cadence", "clock.cadence", clock["cadence"], dict(least=0.0, above=True, optional=True)),
                  ("alert_batch_size", "alerts.batch_size", alerts["batch_size"], dict(integer=True, least=1)))  # fmt: skip
        try:
            scalars = {name: check_number(key, value, **how) for name, key, value, how in checks}
            scalars["calibration_mode"] = check_choice("calibration_mode", config["calibration_mode"], CALIBRATION_MODES,
                                                  " (the entities' mode for the calibration exposures)")  # fmt: skip
            scalars["daytime"] = check_choice("daytime", config["daytime"], (True, False))
        except ValueError as exc:
            raise NightError(str(exc)) from exc
        return NightConfig(**scalars, layout=section("layout", LayoutConfig),  # type: ignore[arg-type]
                           archive=section("archive", ArchiveSettings), worker=section("worker", WorkerSettings),
                           scheduler=section("scheduler", SchedulerSettings),
                           pipeline=_science_pipeline(config["pipeline"]))  # fmt: skip
    except NightError as exc:
        raise NightError(f"{source}: {exc}") from exc
    except KeyError as exc:
        raise NightError(f"{source}: the key {exc} is missing (the embedded configuration has every one)") from exc


def _science_pipeline(overrides: object) -> dict[str, Any]:
    """``pipeline``: overrides of the shipped science configuration of the Alert Production Cluster, checked
    by the control plane's own rules (as ``lsstpipe config check`` would)."""
    from lsstpipe.control.config import ConfigurationError, parse_configuration

    if not isinstance(overrides, Mapping):
        raise NightError(f"pipeline must be a mapping of pipeline parameters to values, not {overrides!r}")
    path = Path(__file__).resolve().parent.parent / "configs" / "alert_production_cluster" / "science.yaml"
    data = yaml.safe_load(path.read_text())
    data["pipeline"] = {**data["pipeline"], **overrides}
    try:
        parse_configuration(data, "science", path)
    except ConfigurationError as exc:
        raise NightError(f"pipeline: {exc} (the night's pipeline section overrides that file)") from exc
    return dict(overrides)


def check_max_visits(value: object) -> int | None:
    """``--max-visits``: None (every visit) or an integer ≥ 1.

    Raises
    ------
    NightError
        Any other value, with what to write instead.
    """
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise NightError(f"--max-visits must be a whole number of visits ≥ 1 (leave it out to play every visit), "
                         f"not {value!r}")  # fmt: skip
    return value


def visit_count(text: str) -> int:
    """The ``argparse`` type of ``--max-visits`` (:func:`check_max_visits`)."""
    try:
        value: object = int(text)
    except ValueError:
        value = text
    try:
        return check_max_visits(value)  # type: ignore[return-value]
    except NightError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--max-visits ")) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="jobs/night.py",
        description="Play a simulated observing night on MPI (see lsstpipe.runtime.night). Faults (--inject):\n"
        + "\n".join(f"  {line}" for line in _fault_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--repo", required=True, help="data repository made by 'lsstpipe simulate … --calibs'")
    ap.add_argument("--out", required=True, help="output folder (manifest, APDB, alerts, archive)")
    ap.add_argument("--config", help=f"night configuration YAML (default: {DEFAULT_CONFIG.name}, embedded)")
    ap.add_argument("--inject", action="append", default=[], metavar="FAULT@VISITS",
                    help=f"inject a fault over visits (from 1; e.g. kill-worker@2, link-cut@2-3): "
                         f"{', '.join(FAULT_KINDS)}; repeatable")  # fmt: skip
    ap.add_argument("--max-visits", type=visit_count, help="play only the first N visits (N ≥ 1)")
    ap.add_argument("--role", help="roles of this rank from an srun --multi-prog line (checked against the layout)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap.parse_args(argv)


def _fault_help() -> list[str]:
    from lsstpipe.runtime import faults

    lines = [ln for ln in (faults.__doc__ or "").splitlines() if ln.startswith("``")]
    return [ln.replace("``", "") for ln in lines]


def _agreed(comm, error: str | None, prefix: str = "") -> bool:
    """Whether no rank had an error (collective); rank 0 prints the first one."""
    errors = comm.allgather(error)
    if any(errors) and comm.Get_rank() == 0:
        print(f"night: error: {prefix}{next(e for e in errors if e)}", file=sys.stderr, flush=True)
    return not any(errors)


def main(argv: list[str] | None = None, comm: Any = None) -> int:
    """A rank of the night (``comm``: default ``MPI.COMM_WORLD``); every check comes before the first role starts
    and a bad input is one message from rank 0 and exit status 2 on every rank."""
    args = parse_args(argv)
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    logging.basicConfig(level=logging.WARNING, format=f"[rank {comm.Get_rank()}] %(levelname)s %(name)s: %(message)s")
    error, setup = None, None
    try:
        setup = _prepare(args, comm)
    except (NightError, FaultError, ValueError, FileNotFoundError) as exc:
        error = str(exc)
    if not _agreed(comm, error) or setup is None:
        return 2
    config, repo, plan, layout, faults = setup
    if config.calibration_exposures > len(plan.calibrations) and comm.Get_rank() == 0 and not args.quiet:
        print(f"night: {repo.root} has {len(plan.calibrations)} calibration exposure(s) in its CDS buffer; the night "
              f"plays those, not the {config.calibration_exposures} of calibration_exposures", flush=True)  # fmt: skip
    if _masters_missing(config, repo):
        try:
            _certify(repo, plan, comm)
        except (NightError, ValueError) as exc:  # raised on every rank alike (decided on rank 0, broadcast)
            error = str(exc).removeprefix("ValueError: ")
        if not _agreed(comm, error, "the Calibration Products Production failed: "):
            return 2
    from lsstpipe.runtime.loop import run_rank

    return run_rank(comm, args, config, repo, plan, layout, faults)


def _masters_missing(config: NightConfig, repo) -> bool:
    """The night's workers read certified masters and the repository has none yet (:func:`_certify` makes them)."""
    return config.needs_masters and not (repo.root / "calib.sqlite3").is_file()


def _certify(repo, plan, comm) -> None:
    """The Calibration Products Production on every rank, before the night (the repository has no masters).

    Raises
    ------
    ValueError
        On every rank: the CPP rejected the repository (:func:`~lsstpipe.calib.cpp.run_cpp`).
    NightError
        On every rank: it made no masters for any detector of the night (every CCD would fail).
    """
    from lsstpipe.calib.cpp import CppRequest, run_cpp
    from lsstpipe.runtime.idle import idle_barrier

    if comm.Get_rank() == 0:
        print(f"night: {repo.root} has no certified calibrations; running the Calibration Products "
              "Production first", flush=True)  # fmt: skip
    summary = run_cpp(CppRequest(str(repo.root)), comm)
    verdict = None
    if comm.Get_rank() == 0 and not summary.get("ok", True):
        failed = [d for d in plan.detectors if d in summary["failed"]]
        errors = [e for d in failed for e in summary["detectors"][d]["errors"]]
        why = (f"no masters for {', '.join(failed)} ({errors[0] if errors else 'see the run'}; every error in "
               f"{repo.root}/calib/runs/{summary['run']}.json)")  # fmt: skip
        if failed and len(failed) == len(plan.detectors):
            verdict = (f"{why}: simulate the repository with enough "
                       "calibration exposures (lsstpipe simulate … --calibs) and remove its calib.sqlite3 and calib/, "
                       "or set worker.calibs: truth in --config")  # fmt: skip
        elif failed:
            print(f"night: warning: {why}; their CCDs will fail", file=sys.stderr, flush=True)
    idle_barrier(comm)  # the other ranks wait for rank 0's certification without taking its cores
    verdict = comm.bcast(verdict, root=0)
    if verdict is not None:
        raise NightError(verdict)


def _prepare(args: argparse.Namespace, comm) -> tuple:
    """Everything every rank must agree on before the night starts (same on every rank)."""
    from lsstpipe.repo import Repository
    from lsstpipe.runtime.layout import Role, layout_for_world
    from lsstpipe.runtime.plan import check_masters, plan_night

    config = read_config(args.config)
    max_visits = check_max_visits(args.max_visits)
    if not (Path(args.repo) / "repo.yaml").is_file():
        raise NightError(f"--repo {args.repo} is not a data repository; make one with "
                         f"'lsstpipe simulate --repo {args.repo} --calibs'")  # fmt: skip
    repo = Repository(args.repo)
    plan = plan_night(repo, time_scale=config.time_scale, cadence=config.cadence,
                      max_visits=max_visits if max_visits is not None else config.max_visits,
                      calibration_exposures=config.calibration_exposures)  # fmt: skip
    check_masters(repo, plan, config.worker.calibs)
    faults = parse_faults(args.inject, len(plan.visits))
    if comm.Get_size() < 2:
        raise NightError("the night needs at least 2 ranks (rank 0 runs the DMCS and the archiving, the others "
                         "process CCDs): run it with mpiexec -n 2 or more")  # fmt: skip
    layout = layout_for_world(plan.camera, comm.Get_size(), config.layout)
    if args.role is not None:
        mine = "+".join(r.name.lower() for r in layout.roles_of(comm.Get_rank()))
        if args.role != mine:
            raise NightError(f"rank {comm.Get_rank()} was started as {args.role!r} but the layout makes it "
                             f"{mine!r}: render the multi-prog file for this world size")  # fmt: skip

    def workers(lay) -> int:
        return len(lay.ranks_of(Role.WORKER)) + len(lay.spare_workers)

    def replicator_spare(lay) -> bool:  # a catch-up pair on other ranks than some Archiver replicator
        return any(p.replicator != 0 and all(p.replicator not in (c.replicator, c.distributor) for c in
                                             lay.catchup_pairs) for p in lay.pairs)  # fmt: skip

    for fault in faults:
        if fault.kind == "kill-replicator" and not replicator_spare(layout):
            need = next(k for k in range(layout.size + 1, layout.size + 256)
                        if replicator_spare(layout_for_world(plan.camera, k)))  # fmt: skip
            raise NightError(f"--inject {fault}: the images of a killed replicator need a catch-up pair on "
                             f"other ranks, which {layout.size} ranks do not give; run with "
                             f"-n {need} or more")  # fmt: skip
        if fault.kind == "kill-worker" and workers(layout) < 2:
            need = next(k for k in range(layout.size + 1, layout.size + 64)
                        if workers(layout_for_world(plan.camera, k)) >= 2)  # fmt: skip
            raise NightError(f"--inject {fault}: a killed worker's job needs another worker (or a spare) to run "
                             f"on, and {layout.size} ranks give one worker; run with -n {need} or more")  # fmt: skip
    return config, repo, plan, layout, faults


def _entity_configs(out: Path, layout, pipeline: Mapping[str, Any] | None = None, archive: Any = None) -> Path:
    """The entities' configurations (every mode), sized to this night's layout, the Alert Production Cluster's
    science pipeline overridden by ``pipeline``, the Archiver's ``compress`` and ``max_retries`` those of the
    night's ``archive`` settings (what its replicators do), validated by the control plane."""
    from lsstpipe.runtime.layout import Role

    shipped = Path(__file__).resolve().parent.parent / "configs"
    root = out / "configs"
    sizes = {"archiver": {"replicator_pairs": len(layout.pairs)},
             "catchup_archiver": {"catchup_pairs": len(layout.catchup_pairs)},
             "alert_production_cluster": {"workers": len(layout.ranks_of(Role.WORKER))},
             "efd_replicator": {}}  # fmt: skip
    for entity in ENTITY_CONFIGS:
        for path in sorted((shipped / entity).glob("*.yaml")):
            data = yaml.safe_load(path.read_text())
            data.update(sizes[entity], install_seconds=0.0)
            if entity == "archiver" and archive is not None:
                data.update(compress=archive.compress, max_retries=archive.max_retries)
            if entity == "alert_production_cluster" and path.stem == "science" and pipeline:
                data["pipeline"] = {**data["pipeline"], **pipeline}
            (root / entity).mkdir(parents=True, exist_ok=True)
            (root / entity / path.name).write_text(yaml.safe_dump(data, sort_keys=False))
    return root


def control_plane(out: Path, layout, dmcs_cluster, pipeline: Mapping[str, Any] | None = None, archive: Any = None):
    """Boot the Base DMCS on an in-process OCS link with the night's control database and EFD; the OCS client."""
    from lsstpipe.control.dmcs import BaseDMCS
    from lsstpipe.control.ocs import OCSClient
    from lsstpipe.control.protocol import Codec
    from lsstpipe.control.transport import InProcessTransport
    from lsstpipe.db.control import ControlDatabase
    from lsstpipe.db.efd_replication import open_efd

    transport = InProcessTransport("night")
    codec = Codec(secrets.token_bytes(32))
    recorder = ControlDatabase(out / "control.sqlite3")
    # the Summit EFD and its Chilean and US DAC replicas (embedded chain): the DMCS records the OCS traffic,
    # the camera its exposures; replicators read the replica
    efd = open_efd(out / "efd")
    dmcs = BaseDMCS(transport, codec, dmcs_cluster, config_root=_entity_configs(out, layout, pipeline, archive), recorder=recorder,
                    efd=efd, efd_monitor_interval=0.25)  # fmt: skip
    dmcs.boot()
    ocs = OCSClient(transport, codec, sender="ocs-night")
    # a night started again on the same OUT goes on numbering its commands (the DMCS rejects replays)
    ocs._seq = max((seq for sender, seq in dmcs._seen if sender == ocs.sender), default=0)
    return dmcs, ocs, recorder


def script(ocs, steps: list[tuple], timeout: float = 30.0) -> None:
    """Send OCS commands in order, each after the previous one's final result; raise if one fails."""
    from lsstpipe.control.states import CommandResult

    for entity, command, arg in steps:
        seq = ocs.send(entity, command, arg)
        responses = ocs.wait(seq, timeout)
        final = responses[-1] if responses else None
        if final is None or final.result is not CommandResult.COMPLETE:
            why = final.reason if final is not None else "rejected"
            raise NightError(f"OCS {command.value} {entity.value} {arg or ''} failed: {why}")


def progress(quiet: bool, text: str, t0: float) -> None:
    if not quiet:
        print(f"[night {time.monotonic() - t0:7.1f}s] {text}", flush=True)


def run_and_finish() -> None:
    """The job's entry point: :func:`main` on ``MPI.COMM_WORLD``, then
    :func:`lsstpipe.runtime.loop.finish` with its status (no ``MPI_Abort`` after an agreed error)."""
    rc = main()
    from lsstpipe.runtime.loop import finish

    finish(rc)


if __name__ == "__main__":
    run_and_finish()
