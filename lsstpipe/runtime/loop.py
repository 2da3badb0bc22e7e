"""The rank loops of the night: rank 0 plays the OCS, the camera and the DMCS; the others serve their roles.

A rank hosts one handler per role it plays (a replicator, a distributor, a worker, and on rank 0 the
DMCS); each message goes to the first handler that takes it. Rank 0 never blocks on a job: replicator
work on it is a file read and a local hand-over, and workers always have ranks of their own.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsstpipe.runtime.archiving import Replicator, StoragePaths
from lsstpipe.runtime.distributor import Distributor
from lsstpipe.runtime.layout import Role
from lsstpipe.runtime.messages import Stop
from lsstpipe.runtime.postman import Postman

if TYPE_CHECKING:
    from lsstpipe.runtime.night import NightConfig

log = logging.getLogger("lsstpipe.night")


@dataclass
class Level1Handles:
    """The open APDB and alert writer of a worker rank."""

    apdb: Any
    alerts: Any
    ss_coefficients: Any = None


def _handlers(post: Postman, layout, config: NightConfig, repo, out: Path, level1: Level1Handles | None,
              string: Any = None) -> list:  # fmt: skip
    from lsstpipe.runtime.worker import Worker

    rank = post.rank
    paths = StoragePaths(out)
    archive = config.archive
    handlers: list = []
    pairs = list(layout.pairs) + list(layout.catchup_pairs)
    rep = next((p for p in pairs if p.replicator == rank), None)
    if rep is not None:
        handlers.append(Replicator(post, rep.distributor, paths, archive))
    if any(p.distributor == rank for p in pairs):
        handlers.append(Distributor(post, paths, archive))
    roles = layout.roles_of(rank)
    if (Role.WORKER in roles or Role.SPARE in roles) and rank != 0:
        handlers.append(Worker(post, repo, out, config.worker, level1=level1, string=string))
    return handlers


def _level1(out: Path, config: NightConfig, plan) -> Level1Handles | None:
    if not config.worker.level1:
        return None
    from lsstpipe.alerts import AlertWriter
    from lsstpipe.db.apdb import Level1Database
    from lsstpipe.runtime.daytime import night_coefficients

    apdb = Level1Database(out / "apdb-config.yaml")
    mjds = [s.mjd for v in plan.visits for s in v.snaps]
    # the orbits of the daytime MOPS of an earlier day on this output folder, if any
    coefficients = night_coefficients(out, min(mjds) - 0.01, max(mjds) + 0.01)
    return Level1Handles(apdb, AlertWriter(out / "alerts", batch_size=config.alert_batch_size),
                         coefficients)  # fmt: skip


AGREED_ERROR = 2
"""The exit status of a night whose ranks all found the same bad input before any role started (what
:func:`lsstpipe.runtime.night.main` returns from its checks)."""


def run_rank(comm, args: argparse.Namespace, config: NightConfig, repo, plan, layout, faults) -> int:
    """This rank's part of the night, once :func:`lsstpipe.runtime.night.main` validated everything (and made
    the masters the workers need); rank 0's return value is the night's exit status."""
    out = Path(args.out)
    if comm.Get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        _prepare_out(out)
    from mpi4py import MPI

    from lsstpipe.runtime.idle import idle_barrier
    from lsstpipe.runtime.ranks import split_roles

    idle_barrier(comm)  # the others wait for rank 0's APDB schema without taking its cores
    ctx = split_roles(comm, layout)  # roles from splitting COMM_WORLD once: the strings' communicators
    string = ctx.string if ctx.string != MPI.COMM_NULL else None
    post = Postman(comm)
    level1 = _level1(out, config, plan) if any(r in layout.roles_of(post.rank) for r in (Role.WORKER, Role.SPARE)) \
        and post.rank != 0 else None  # fmt: skip
    handlers = _handlers(post, layout, config, repo, out, level1, string)
    if post.rank == 0:
        from lsstpipe.runtime.conductor import conduct

        rc = conduct(post, args, config, repo, plan, layout, faults, handlers)
        if post.dead:  # MPICH's MPI_Finalize would wait for the dead rank forever
            _exit_now(rc)
        return rc
    stop = None
    try:
        while True:
            env = post.poll()
            if env is None:
                for h in handlers:
                    if hasattr(h, "tick"):
                        h.tick()
                time.sleep(0.0005)
                continue
            if isinstance(env.payload, Stop):
                stop = env.payload
                break
            if not any(h.handle(env) for h in handlers):
                log.warning("rank %d: nothing here takes %r", post.rank, env)
    finally:
        if level1 is not None:
            level1.alerts.close()
    if stop is not None and stop.skip_finalize:
        _exit_now(0)
    return 0


def finish(rc: int) -> None:
    """End this rank of a night with exit status ``rc``, once :func:`lsstpipe.runtime.night.main` returned it.

    Status 2 is a bad input every rank found and agreed on before any role started (``main``'s checks), so
    every rank is here together: it leaves through ``MPI_Finalize`` and ``os._exit``. Raised as
    ``SystemExit``, ``python -m mpi4py`` would turn it into ``MPI_Abort``, and MPICH would print an abort
    line per rank under the night's one-line error. Any other status exits as before: 0 normally, and a
    failed night's through ``MPI_Abort``, which also stops a rank that no longer answers instead of leaving
    the allocation waiting for it in ``MPI_Finalize``."""
    if rc != AGREED_ERROR:
        sys.exit(rc)
    from mpi4py import MPI

    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    _exit_now(rc)


def _exit_now(rc: int) -> None:
    """Leave now, without (another) MPI_Finalize — a peer is dead, or :func:`finish` finalized already: flush
    what the process printed, then exit."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(rc)


def _prepare_out(out: Path) -> None:
    """The APDB and its client configuration."""
    from lsstpipe.db.apdb import create_apdb

    if not (out / "apdb-config.yaml").is_file():
        create_apdb(out / "apdb.sqlite3", out / "apdb-config.yaml")
