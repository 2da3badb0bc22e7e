"""Calibration Products Production gives the same files and certified rows for any number of ranks.

The MPI test runs under ``mpiexec -n K python -m pytest --with-mpi -m mpi -p no:cacheprovider`` (K = 1, 2,
4): the whole world, rank 0 alone (K = 1) and, with 4 ranks, ranks 0-1 (K = 2) each process a copy of one
small repository, and every file's sha256 and every certified row (ids and creation times aside) must be
equal. The job tests launch ``jobs/calibration_products.py`` under ``mpiexec`` as an operator would and
check its outputs and exit status.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_cpp import digests, make_repo

from lsstpipe.calib.cpp import CppRequest, run_cpp
from lsstpipe.runtime.idle import idle_barrier
from lsstpipe.sim.simulate import N_BIAS, N_DARK

ROOT = Path(__file__).resolve().parent.parent
DETS = ("R10_S00", "R10_S01", "R11_S00")


@pytest.mark.mpi(min_size=1)
@pytest.mark.timeout(600)
def test_outputs_identical_for_any_number_of_ranks():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    base = comm.bcast(tempfile.mkdtemp(prefix="lsstpipe-cpp-mpi-") if comm.rank == 0 else None, root=0)
    try:
        if comm.rank == 0:
            make_repo(Path(base) / "pristine", DETS)
            for name in ("world", "self", "pair"):
                shutil.copytree(Path(base) / "pristine", Path(base) / name)
        idle_barrier(comm)  # waiting ranks sleep: rank 0's serial work keeps the cores (4 ranks on 2 here)
        summary = run_cpp(CppRequest(repo=f"{base}/world"), comm)
        if comm.rank == 0:
            assert summary["ok"] and sorted(summary["detectors"]) == sorted(DETS)
            run_cpp(CppRequest(repo=f"{base}/self"), MPI.COMM_SELF)
        idle_barrier(comm)
        pair = comm.Split(0 if comm.rank < 2 else MPI.UNDEFINED, comm.rank) if comm.size >= 4 else MPI.COMM_NULL
        if pair != MPI.COMM_NULL:
            run_cpp(CppRequest(repo=f"{base}/pair"), pair)
            pair.Free()
        failures = None
        if comm.rank == 0:
            world, alone = digests(Path(base) / "world"), digests(Path(base) / "self")
            failures = [k for k in world["files"] if world["files"][k] != alone["files"].get(k)]
            failures += ["rows"] if world["rows"] != alone["rows"] else []
            failures += ["file list"] if world["files"].keys() != alone["files"].keys() else []
            if comm.size >= 4:
                two = digests(Path(base) / "pair")
                failures += [f"pair:{k}" for k in world["files"] if world["files"][k] != two["files"].get(k)]
                failures += ["pair:rows"] if world["rows"] != two["rows"] else []
            assert len(world["rows"]) >= 5 * len(DETS)
        idle_barrier(comm)
        failures = comm.bcast(failures, root=0)
        assert failures == [], f"outputs differ between {comm.size} rank(s) and 1: {failures}"
    finally:
        idle_barrier(comm)
        if comm.rank == 0:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def numba_cache(tmp_path_factory):
    """A node-local numba cache shared by the job runs of this module: only the first one compiles."""
    return tmp_path_factory.mktemp("numba-cache")


def _job(cache: Path, ranks: int, *args: str) -> subprocess.CompletedProcess:
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec on PATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "NUMBA_CACHE_DIR": str(cache), "LSSTPIPE_NUMBA_CACHE": "1"}  # fmt: skip
    cmd = [
        mpiexec,
        "-n",
        str(ranks),
        sys.executable,
        "-m",
        "mpi4py",
        str(ROOT / "jobs" / "calibration_products.py"),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("job") / "pristine", ("R10_S00", "R11_S00"))


def test_job_on_one_and_two_ranks(pristine, numba_cache, tmp_path):
    for n in (1, 2):
        shutil.copytree(pristine, tmp_path / f"n{n}")
        done = _job(numba_cache, n, "--repo", str(tmp_path / f"n{n}"), "--filters", "z")
        assert done.returncode == 0, done.stderr[-3000:]
        assert '"ok": true' in done.stdout
    assert digests(tmp_path / "n1") == digests(tmp_path / "n2")


def test_job_exit_status(pristine, numba_cache, tmp_path):
    bad = _job(numba_cache, 1, "--repo", str(pristine), "--filters", "u")
    assert bad.returncode == 2 and "no flat exposures in filter(s) u" in bad.stderr
    work = tmp_path / "short"
    shutil.copytree(pristine, work)
    for p in sorted(work.glob("raw/*/*/*_R11_S00.fits")):
        # all darks but two (the biases come first: sequence numbers 50001 + N_BIAS onwards are darks)
        if "MC_C_" in p.name and int(p.name.split("_")[3]) in range(50001 + N_BIAS, 50001 + N_BIAS + N_DARK - 2):
            p.unlink()
    short = _job(numba_cache, 1, "--repo", str(work), "--no-crosstalk", "--detectors", "R10_S00,R11_S00")
    assert short.returncode == 1, short.stderr[-3000:]
    assert "R11_S00: bias/dark: TooFewFrames" in short.stderr and "skipping" in short.stderr
    assert (work / "calib" / "flat").is_dir()  # the other CCD finished
