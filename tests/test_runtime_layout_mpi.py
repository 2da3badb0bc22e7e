"""split_roles gives consistent per-role communicators at any world size, and a wrong world fails everywhere.

Run with ``mpiexec -n K python -m pytest -q --with-mpi -m mpi -p no:cacheprovider
tests/test_runtime_layout_mpi.py`` for K = 1, 2, 4. Every rank checks its communicators against the layout
and against what the other ranks report, so a rank in the wrong communicator fails the test. Each test has
a timeout as a hang guard: the error paths must raise on every rank, not leave some waiting in a collective.
"""

import pytest

from lsstpipe.runtime import (
    Heartbeat,
    JobAssignment,
    JobKind,
    JobResult,
    LayoutConfig,
    LayoutError,
    Role,
    Stop,
    Tag,
    full_layout,
    layout_for_world,
    scaled_layout,
    split_roles,
)
from lsstpipe.runtime.messages import recv, send


@pytest.mark.mpi(min_size=1)
@pytest.mark.timeout(60)
def test_split_roles_gives_consistent_communicators():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    lay = layout_for_world("mini", comm.size)
    ctx = split_roles(comm, lay)
    try:
        me = lay.ranks[comm.rank]
        assert ctx.rank == comm.rank and ctx.roles == me.roles and ctx.role is me.role
        # The role communicator holds exactly the ranks of my primary role, in world-rank order.
        same = [r.rank for r in lay.ranks if r.role is me.role]
        assert ctx.role_comm.allgather(comm.rank) == same
        # Everyone agrees on who is in which role communicator.
        members = comm.allgather((int(ctx.role), ctx.role_comm.size, ctx.role_comm.rank))
        for r, (role, size, sub_rank) in enumerate(members):
            assert role == lay.ranks[r].role
            peers = [x.rank for x in lay.ranks if x.role is lay.ranks[r].role]
            assert (size, sub_rank) == (len(peers), peers.index(r))
        workers = lay.ranks_of(Role.WORKER)
        if ctx.has(Role.WORKER):
            assert ctx.workers.allgather(comm.rank) == list(workers)
            my_string = lay.strings[me.string]
            assert ctx.string.allgather(comm.rank) == list(my_string)
            # A focal-plane collective over the string: every detector of the visit counted once.
            dets = [d for k, d in enumerate(range(lay.detectors_per_visit)) if k % ctx.string.size == ctx.string.rank]
            assert ctx.string.allreduce(len(dets)) == lay.detectors_per_visit
        else:
            assert ctx.workers == MPI.COMM_NULL and ctx.string == MPI.COMM_NULL
        if ctx.has(Role.REPLICATOR) or ctx.has(Role.DISTRIBUTOR):
            assert ctx.pair is not None and comm.rank in (ctx.pair.replicator, ctx.pair.distributor)
        assert sum(comm.allgather(1 if ctx.has(Role.DMCS) else 0)) == 1
    finally:
        ctx.free()


@pytest.mark.mpi(min_size=1)
@pytest.mark.timeout(60)
def test_a_world_that_does_not_fit_fails_on_every_rank():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    for lay in (full_layout("mini"), scaled_layout("mini", comm.size + 1)):
        with pytest.raises(LayoutError, match=f"has {comm.size} ranks but the mini layout needs {lay.size}") as info:
            split_roles(comm, lay)
        messages = comm.allgather(str(info.value))
        assert len(set(messages)) == 1 and f"-n {lay.size}" in messages[0]


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_ranks_with_different_layouts_fail_together():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    cfg = LayoutConfig(local_only=(0,)) if comm.rank == comm.size - 1 else LayoutConfig()
    lay = layout_for_world("mini", comm.size, cfg)
    with pytest.raises(LayoutError, match="ranks computed different layouts") as info:
        split_roles(comm, lay)
    assert len(set(comm.allgather(str(info.value)))) == 1


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_job_round_trip_with_a_failure_and_the_stop_sentinel():
    """A tiny DMCS/worker loop: jobs out, results (one a failure with its traceback) back, then Stop."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    ctx = split_roles(comm, layout_for_world("mini", comm.size))
    try:
        workers = [r for r in ctx.layout.ranks_of(Role.WORKER) if r != 0]
        jobs = range(2 * len(workers))
        if ctx.has(Role.DMCS):
            for k in jobs:
                send(comm, JobAssignment(k, JobKind.CCD, visit=1, detector=k), workers[k % len(workers)])
            results, beats = {}, 0
            while len(results) < len(jobs):
                msg, source, tag = recv(comm, MPI.ANY_SOURCE, MPI.ANY_TAG)
                assert tag in (Tag.RESULT, Tag.HEARTBEAT) and source in workers
                if tag is Tag.HEARTBEAT:
                    assert msg.sender == source and msg.role is Role.WORKER
                    beats += 1
                else:
                    assert msg.rank == source and msg.job_id not in results
                    results[msg.job_id] = msg
            for w in workers:
                send(comm, Stop(), w)
            assert beats == len(jobs) and sorted(results) == list(jobs)
            assert not results[0].ok and results[0].error_type == "ZeroDivisionError"
            assert "1 / msg.detector" in results[0].traceback
            assert all(results[k].ok and results[k].count("diasources") == k for k in jobs if k)
        elif comm.rank in workers:
            sequence = 0
            while True:
                msg, _, tag = recv(comm, 0, MPI.ANY_TAG)
                if tag is Tag.STOP:
                    break
                send(comm, Heartbeat(comm.rank, ctx.role, sequence, MPI.Wtime()), 0)
                sequence += 1
                try:
                    assert 1 / msg.detector > 0  # detector 0 fails: an application error, shipped back
                    res = JobResult(msg.job_id, comm.rank, True, counts=(("diasources", msg.detector),))
                except Exception as exc:
                    res = JobResult.failure(msg.job_id, comm.rank, exc)
                send(comm, res, 0)
        comm.Barrier()
    finally:
        ctx.free()
