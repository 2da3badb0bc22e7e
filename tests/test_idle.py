"""idle_barrier: a barrier that sleeps while it waits (ranks waiting for uneven work leave the cores to it)."""

from __future__ import annotations

import time

import pytest

from lsstpipe.runtime.idle import idle_barrier
from lsstpipe.runtime.selfcomm import SelfComm


class _Request:
    def __init__(self, polls: int) -> None:
        self.left = polls
        self.tests = 0

    def Test(self) -> bool:  # noqa: N802 (MPI's name)
        self.tests += 1
        self.left -= 1
        return self.left < 0


class _Comm:
    def __init__(self, size: int, polls: int, ibarrier: bool = True) -> None:
        self.size, self.barriers, self.request = size, 0, _Request(polls)
        if ibarrier:
            self.Ibarrier = lambda: self.request

    def Get_size(self) -> int:  # noqa: N802
        return self.size

    def Barrier(self) -> None:  # noqa: N802
        self.barriers += 1


def test_one_rank_returns_at_once():
    idle_barrier(SelfComm())
    comm = _Comm(1, polls=5)
    idle_barrier(comm)
    assert comm.request.tests == 0 and comm.barriers == 0


def test_polls_the_nonblocking_barrier_until_it_completes():
    comm = _Comm(3, polls=4)
    idle_barrier(comm, poll_s=0.0)
    assert comm.request.tests == 5 and comm.barriers == 0


def test_a_communicator_without_ibarrier_gets_a_blocking_barrier():
    comm = _Comm(2, polls=4, ibarrier=False)
    idle_barrier(comm)
    assert comm.barriers == 1


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_no_rank_leaves_before_the_last_one_arrives():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.rank == comm.size - 1:
        time.sleep(0.3)  # the slow rank
    arrived = time.monotonic()
    idle_barrier(comm)
    left = time.monotonic()
    times = comm.allgather((arrived, left))
    last_arrival = max(a for a, _ in times)
    assert all(left >= last_arrival for _, left in times)
