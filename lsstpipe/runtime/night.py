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
``lsstpipe/data/night-demo.yaml``, which documents every key).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from lsstpipe.runtime.faults import FAULT_KINDS, FaultError, parse_faults

log = logging.getLogger("lsstpipe.night")

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "data" / "night-demo.yaml"
ENTITY_CONFIGS = ("archiver", "catchup_archiver", "alert_production_cluster", "efd_replicator")


class NightError(RuntimeError):
    """The night cannot start (bad repository, configuration or world size): the message says what to do."""


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """The night's configuration: the embedded demo defaults, overridden by ``path``; unknown keys are errors."""
    base = yaml.safe_load(DEFAULT_CONFIG.read_text())
    if path is None:
        return base
    p = Path(path)
    if not p.is_file():
        raise NightError(f"--config {p}: no such file (the embedded default is {DEFAULT_CONFIG})")
    extra = yaml.safe_load(p.read_text()) or {}
    if not isinstance(extra, dict):
        raise NightError(f"--config {p}: a night configuration is a mapping of keys to values")
    unknown = sorted(set(extra) - set(base))
    if unknown:
        raise NightError(f"--config {p}: unknown key(s) {', '.join(unknown)}; keys are {', '.join(sorted(base))}")
    for key, value in extra.items():
        if isinstance(base[key], dict) and isinstance(value, dict):
            bad = sorted(set(value) - set(base[key]))
            if bad and key != "layout":
                raise NightError(f"--config {p}: unknown {key} key(s) {', '.join(bad)}; they are "
                                 f"{', '.join(sorted(base[key]))}")  # fmt: skip
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def _settings(cls, values: dict[str, Any], what: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise NightError(f"unknown {what} setting(s) {', '.join(unknown)}; settings are {', '.join(sorted(known))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


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
    ap.add_argument("--max-visits", type=int, help="play only the first N visits")
    ap.add_argument("--role", help="roles of this rank from an srun --multi-prog line (checked against the layout)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap.parse_args(argv)


def _fault_help() -> list[str]:
    from lsstpipe.runtime import faults

    lines = [ln for ln in (faults.__doc__ or "").splitlines() if ln.startswith("``")]
    return [ln.replace("``", "") for ln in lines]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    logging.basicConfig(level=logging.WARNING, format=f"[rank {comm.Get_rank()}] %(levelname)s %(name)s: %(message)s")
    error = None
    try:
        setup = _prepare(args, comm)
    except (NightError, FaultError, ValueError, FileNotFoundError) as exc:
        error, setup = str(exc), None
    errors = comm.allgather(error)
    if any(errors):
        if comm.Get_rank() == 0:
            print(f"night: error: {next(e for e in errors if e)}", file=sys.stderr)
        return 2
    from lsstpipe.runtime.loop import run_rank

    return run_rank(comm, args, *setup)


def _prepare(args: argparse.Namespace, comm) -> tuple:
    """Everything every rank must agree on before the night starts (same on every rank)."""
    from lsstpipe.repo import Repository
    from lsstpipe.runtime.layout import LayoutConfig, Role, layout_for_world
    from lsstpipe.runtime.plan import plan_night

    config = load_config(args.config)
    repo = Repository(args.repo)
    if not (Path(args.repo) / "repo.yaml").is_file():
        raise NightError(f"--repo {args.repo} is not a data repository; make one with "
                         f"'lsstpipe simulate --repo {args.repo} --calibs'")  # fmt: skip
    clock = config["clock"]
    plan = plan_night(repo, time_scale=float(clock["time_scale"]), cadence=clock.get("cadence"),
                      max_visits=args.max_visits or config.get("max_visits"),
                      calibration_exposures=int(config.get("calibration_exposures") or 0))  # fmt: skip
    faults = parse_faults(args.inject, len(plan.visits))
    if comm.Get_size() < 2:
        raise NightError("the night needs at least 2 ranks (rank 0 runs the DMCS and the archiving, the others "
                         "process CCDs): run it with mpiexec -n 2 or more")  # fmt: skip
    layout = layout_for_world(plan.camera, comm.Get_size(), LayoutConfig.from_mapping(config.get("layout") or {}))
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


def _entity_configs(out: Path, layout) -> Path:
    """The entities' configurations (every mode), sized to this night's layout (validated by the control plane)."""
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
            (root / entity).mkdir(parents=True, exist_ok=True)
            (root / entity / path.name).write_text(yaml.safe_dump(data, sort_keys=False))
    return root


def control_plane(out: Path, layout, dmcs_cluster):
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
    dmcs = BaseDMCS(transport, codec, dmcs_cluster, config_root=_entity_configs(out, layout), recorder=recorder,
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


if __name__ == "__main__":
    sys.exit(main())
