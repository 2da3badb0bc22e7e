"""Waiting for the other ranks without spinning: a barrier that sleeps.

MPICH's (and Open MPI's) blocking collectives poll the network on the CPU while they wait. On a node with a
core per rank that is the fastest way to wait; on a node with more ranks than cores (a laptop, the 2-core CI
machine: ``mpiexec -n 4``) the ranks that wait take the cores from the ranks that work. Measured on a 2-core
VM, 4 ranks: the CPP test that runs the job on the world, then on rank 0 alone while the other three wait,
took 202 s with blocking barriers and 83 s with these.

:func:`idle_barrier` goes where ranks wait for uneven work (a rank with more detectors, rank 0's serial
bookkeeping) before the collective that collects it; it costs up to ``poll_s`` of latency, nothing against
the seconds to minutes of the work it waits for. Collectives over quick, even steps stay blocking.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["idle_barrier"]


def idle_barrier(comm: Any, poll_s: float = 0.005) -> None:
    """``comm.Barrier()``, sleeping ``poll_s`` between tests of a non-blocking barrier (``Ibarrier``).

    A communicator of one rank (including :class:`~lsstpipe.runtime.selfcomm.SelfComm`) returns at once; one
    without ``Ibarrier`` falls back to ``Barrier``. Every rank of ``comm`` must call it, as any collective.
    """
    if comm.Get_size() == 1:
        return
    ibarrier = getattr(comm, "Ibarrier", None)
    if ibarrier is None:
        comm.Barrier()
        return
    request = ibarrier()
    while not request.Test():
        time.sleep(poll_s)
