"""``lsstpipe night -n K --repo REPO --out OUT``: launch the night job with the installed MPI's fault-tolerant flags.

MPICH's Hydra (the PyPI ``mpich`` wheel) gets ``-disable-auto-cleanup``, so that a dead rank does not take
the others down (the DMCS notices it by its missing heartbeats); Open MPI 5 gets ``--with-ft ulfm`` and
the TCP transport (failures reported by MPI itself); Open MPI 4 has no ULFM and gets neither. Open MPI also
gets ``--allow-run-as-root`` as root and ``--oversubscribe`` beyond the machine's cores. Numba's compiled
kernels are cached on local disk (``NUMBA_CACHE_DIR``, default ``~/.cache/lsstpipe/numba``) so that a second
night starts warm.

The exit status is the night's (0: every CCD accounted for and every image archived and verified), read
from ``OUT/manifest.json``: a rank killed by an injected fault makes ``mpiexec`` itself report a failure.
The MPI job runs in its own process group, stopped with this command (Ctrl-C, SIGTERM, SIGHUP); once its
manifest says the night is complete, its ranks have ``--exit-grace`` seconds to leave, after which they are
stopped and the night's status stands (a rank left hanging in ``MPI_Finalize`` loses nothing the night wrote).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from lsstpipe.runtime.faults import FAULT_KINDS, FaultError, parse_faults
from lsstpipe.runtime.night import NightError, check_max_visits, read_config, visit_count

__all__ = [
    "add_parser",
    "check_args",
    "flavour_of",
    "host_flags",
    "launcher_command",
    "mpi_flavour",
    "run",
    "wait_night",
]

JOB = Path(__file__).resolve().parent / "runtime" / "night.py"


def add_parser(sub) -> None:
    p = sub.add_parser("night", help="play a simulated observing night on MPI (launches mpiexec)",
                       description=__doc__.split("\n\n")[0] + " Faults: " + ", ".join(FAULT_KINDS) +
                       " (see 'python -m lsstpipe.runtime.night --help').")  # fmt: skip
    p.add_argument("-n", "--ranks", type=int, default=2, help="MPI ranks (at least 2; default 2)")
    p.add_argument("--repo", required=True, help="repository made by 'lsstpipe simulate … --calibs'")
    p.add_argument("--out", required=True, help="output folder (manifest.json, APDB, alerts, archive)")
    p.add_argument("--config", help="night configuration YAML (default: the embedded demo configuration)")
    p.add_argument("--inject", action="append", default=[], metavar="FAULT@VISITS",
                   help="inject a fault over visits (from 1), e.g. kill-worker@2 or link-cut@2-3; repeatable")  # fmt: skip
    p.add_argument("--max-visits", type=visit_count, help="play only the first N visits (N ≥ 1)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--mpiexec", default=None, help="the mpiexec to use (default: the one on PATH)")
    p.add_argument("--exit-grace", type=float, default=60.0, metavar="SECONDS",
                   help="once the manifest says the night is complete, stop ranks still running after this "
                        "long (default 60)")  # fmt: skip


def mpi_flavour(mpiexec: str) -> str:
    """``mpich``, ``openmpi`` (Open MPI 5 or later, with ULFM), ``openmpi4`` (Open MPI before 5: no ULFM) or
    ``unknown``, from ``mpiexec --version``."""
    try:
        text = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return flavour_of(text)


def flavour_of(version_text: str) -> str:
    """The MPI flavour named by ``mpiexec --version``'s output (see :func:`mpi_flavour`).

    Open MPI 5 prints ``mpiexec (Open MPI) 5.0.3``; Open MPI 4 and earlier ``mpiexec (OpenRTE) 4.1.5``.
    """
    if "HYDRA" in version_text or "MPICH" in version_text:
        return "mpich"
    match = re.search(r"\((?:Open MPI|OpenRTE)\)\s+(\d+)\.", version_text)
    if match:
        return "openmpi" if int(match.group(1)) >= 5 else "openmpi4"
    if "Open MPI" in version_text or "OpenRTE" in version_text:
        return "openmpi"
    return "unknown"


def host_flags(flavour: str, ranks: int) -> list[str]:
    """What Open MPI's ``mpiexec`` needs to start ``ranks`` ranks here at all: ``--allow-run-as-root`` as root
    (it refuses root otherwise) and ``--oversubscribe`` beyond this machine's cores. None for MPICH."""
    flags: list[str] = []
    if flavour in ("openmpi", "openmpi4"):
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            flags.append("--allow-run-as-root")
        if ranks > (os.cpu_count() or 1):
            flags.append("--oversubscribe")
    return flags


def launcher_command(ranks: int, job_args: list[str], mpiexec: str | None = None) -> tuple[list[str], str]:
    """The ``mpiexec`` command line for ``ranks`` ranks of the night job, and the MPI flavour it is for.

    MPICH: ``-disable-auto-cleanup``. Open MPI 5: ULFM (``--with-ft ulfm``, TCP transport). Open MPI 4 has
    no ULFM (its ``mpiexec`` refuses ``--with-ft``) and ends the whole job when a rank dies: a night runs there,
    but without surviving a lost rank.
    """
    exe = mpiexec or shutil.which("mpiexec")
    if exe is None:
        raise FileNotFoundError("mpiexec not found; install MPI with 'pip install mpich' (or 'pip install -e .')")
    flavour = mpi_flavour(exe)
    flags: list[str] = []
    if flavour == "mpich":
        flags = ["-disable-auto-cleanup"]
    elif flavour == "openmpi":
        flags = ["--with-ft", "ulfm", "--mca", "btl", "tcp,self"]
    flags += host_flags(flavour, ranks)
    return [exe, *flags, "-n", str(ranks), sys.executable, "-m", "mpi4py", str(JOB), *job_args], flavour


def check_args(args) -> None:
    """What can be checked before ``mpiexec`` starts: the command line and the night's configuration.

    The repository (its visits, calibrations, CDS buffer) and the layout for the world size are checked by
    the ranks as they start (:func:`lsstpipe.runtime.night.main`), which report a bad one the same way.

    Raises
    ------
    ValueError
        A bad value, with what to do.
    """
    if args.ranks < 2:
        raise ValueError(f"-n must be at least 2 (rank 0 runs the DMCS, the others process CCDs), not {args.ranks}")
    if not args.exit_grace > 0:
        raise ValueError(f"--exit-grace must be a positive number of seconds, not {args.exit_grace}")
    try:
        check_max_visits(args.max_visits)
        parse_faults(args.inject)
        read_config(args.config)
    except (NightError, FaultError) as exc:
        raise ValueError(str(exc)) from exc


def run(args) -> int:
    check_args(args)
    job_args = ["--repo", args.repo, "--out", args.out]
    if args.config:
        job_args += ["--config", args.config]
    for fault in args.inject:
        job_args += ["--inject", fault]
    if args.max_visits is not None:
        job_args += ["--max-visits", str(args.max_visits)]
    if args.quiet:
        job_args.append("--quiet")
    cmd, flavour = launcher_command(args.ranks, job_args, args.mpiexec)
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "lsstpipe" / "numba"))
    env.setdefault("LSSTPIPE_NUMBA_CACHE", "1")
    env.setdefault("NUMBA_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    manifest = Path(args.out) / "manifest.json"
    before = manifest.stat().st_mtime if manifest.is_file() else None
    rc = _launch(cmd, env, manifest, before, args.exit_grace)
    if rc == 2 or not manifest.is_file() or manifest.stat().st_mtime == before:
        return rc or 1
    data = json.loads(manifest.read_text())
    if not data.get("complete"):
        print(f"lsstpipe night: the night did not complete (mpiexec exit {rc}); start it again with the same "
              f"--out to go on where it stopped", file=sys.stderr)  # fmt: skip
        return rc or 1
    images = [im for v in data["visits"] for im in v["images"]]
    lost = [im for im in images if not (im["tape"] if im["kind"] == "raw" else im["raw_cache"])]
    if rc == 124:
        print("lsstpipe night: the night completed; ranks that had not left were stopped", file=sys.stderr)
    elif rc != 0:
        print(f"lsstpipe night: mpiexec ({flavour}) exited {rc} (a rank died, e.g. an injected fault); the night "
              f"completed without it", file=sys.stderr)  # fmt: skip
    return 1 if lost else 0


def _launch(cmd: list[str], env: dict, manifest: Path, before: float | None, grace_s: float) -> int:
    """Run the MPI job in its own process group (stopped with this process) and wait for it (:func:`wait_night`)."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    # a terminal's hang-up and a SIGTERM (e.g. from a batch system) reach this process only: they stop the job too
    previous = {
        sig: signal.signal(sig, lambda signum, _: sys.exit(128 + signum)) for sig in (signal.SIGTERM, signal.SIGHUP)
    }
    try:
        return wait_night(proc, manifest, grace_s=grace_s, since=before)
    except BaseException:  # Ctrl-C, SIGTERM, SIGHUP, anything: the ranks go with the launcher
        stop_group(proc)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_night(proc: subprocess.Popen, manifest: Path, *, grace_s: float, timeout_s: float | None = None,
               since: float | None = None) -> int:  # fmt: skip
    """Wait for the night job ``proc`` (started in its own session): its exit status, or 124 when stopped.

    It is stopped (its whole process group) when it runs past ``timeout_s``, or when ``manifest`` — written
    after ``since`` (a modification time; None: any) — has said the night is complete for ``grace_s`` and the
    job has not returned (a rank left running, e.g. in ``MPI_Finalize``).
    """
    t0, complete_at = time.monotonic(), None
    while True:
        try:
            return proc.wait(timeout=min(2.0, grace_s, timeout_s or 2.0))
        except subprocess.TimeoutExpired:
            pass
        if complete_at is None and _complete(manifest, since):
            complete_at = time.monotonic()
        now = time.monotonic()
        late = timeout_s is not None and now - t0 > timeout_s
        if late or (complete_at is not None and now - complete_at > grace_s):
            why = (f"still running after {timeout_s:g} s" if late else
                   f"its manifest says the night is complete but ranks are still running {grace_s:g} s later")  # fmt: skip
            print(f"lsstpipe night: {why}; stopping the MPI job (process group {proc.pid})", file=sys.stderr)
            stop_group(proc)
            return 124


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to ``proc``'s process group, SIGKILL after 10 s; waits for ``proc``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def _complete(manifest: Path, since: float | None) -> bool:
    try:
        if since is not None and manifest.stat().st_mtime == since:
            return False
        return bool(json.loads(manifest.read_text()).get("complete"))
    except (OSError, ValueError):
        return False
