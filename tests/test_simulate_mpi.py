"""The simulator on MPI gives byte-identical repositories for any number of ranks.

Run with ``mpiexec -n K python -m pytest --with-mpi -m mpi tests`` (K = 1, 2, 4); without ``--with-mpi``
pytest-mpi skips these tests.
"""

import shutil
import tempfile
from pathlib import Path

import pytest

from lsstpipe.repo import Repository
from lsstpipe.runtime.idle import idle_barrier
from lsstpipe.sim.simulate import SimulationRequest, run_simulation
from repo_digest import digest_files

DETS = ("R10_S00", "R10_S01", "R10_S12", "R11_S00", "R11_S21")


def _digest(root: Path) -> dict:
    out = digest_files(root)
    repo = Repository(root)
    out["registry:raws"] = sorted((r["obsid"], r["detector"], r["path"], r["sha256"]) for r in repo.raws())
    out["registry:exposures"] = repo.exposures()
    out["registry:templates"] = repo.templates()
    return out


@pytest.mark.mpi(min_size=1)
def test_simulation_is_identical_for_any_number_of_ranks():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    base = comm.bcast(tempfile.mkdtemp(prefix="lsstpipe-mpi-") if comm.rank == 0 else None, root=0)
    try:
        req = dict(camera="mini", detectors=DETS, n_visits=1, calibs=True, bands="i", progress=False, seed=3)
        summary = run_simulation(SimulationRequest(repo=f"{base}/parallel", **req), comm)
        assert summary["raws"] == len(DETS) * summary["exposures"]
        if comm.rank == 0:
            run_simulation(SimulationRequest(repo=f"{base}/serial", **req))
            parallel, serial = _digest(Path(base) / "parallel"), _digest(Path(base) / "serial")
            assert parallel.keys() == serial.keys()
            assert [k for k in serial if parallel[k] != serial[k]] == []
        idle_barrier(comm)  # the other ranks wait for rank 0's serial run without taking its cores
    finally:
        idle_barrier(comm)
        if comm.rank == 0:
            shutil.rmtree(base, ignore_errors=True)
