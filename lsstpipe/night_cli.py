"""``lsstpipe night -n K --repo REPO --out OUT``: launch the night job with the installed MPI's fault-tolerant flags.

MPICH's Hydra (the PyPI ``mpich`` wheel) gets ``-disable-auto-cleanup``, so that a dead rank does not take
the others down (the DMCS notices it by its missing heartbeats); Open MPI 5 gets ``--with-ft ulfm`` and
the TCP transport (failures reported by MPI itself), plus ``--allow-run-as-root`` as root and
``--oversubscribe`` beyond the machine's cores. Numba's compiled kernels are cached on local disk
(``NUMBA_CACHE_DIR``, default ``~/.cache/lsstpipe/numba``) so that a second night starts warm.

The exit status is the night's (0: every CCD accounted for and every image archived and verified), read
from ``OUT/manifest.json``: a rank killed by an injected fault makes ``mpiexec`` itself report a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from lsstpipe.runtime.faults import FAULT_KINDS

__all__ = ["add_parser", "launcher_command", "run"]

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
    p.add_argument("--max-visits", type=int, help="play only the first N visits")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--mpiexec", default=None, help="the mpiexec to use (default: the one on PATH)")


def mpi_flavour(mpiexec: str) -> str:
    """``mpich``, ``openmpi`` or ``unknown``, from ``mpiexec --version``."""
    try:
        text = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if "HYDRA" in text or "MPICH" in text:
        return "mpich"
    if "Open MPI" in text or "OpenRTE" in text:
        return "openmpi"
    return "unknown"


def launcher_command(ranks: int, job_args: list[str], mpiexec: str | None = None) -> tuple[list[str], str]:
    """The ``mpiexec`` command line for ``ranks`` ranks of the night job, and the MPI flavour it is for."""
    exe = mpiexec or shutil.which("mpiexec")
    if exe is None:
        raise FileNotFoundError("mpiexec not found; install MPI with 'pip install mpich' (or 'pip install -e .')")
    flavour = mpi_flavour(exe)
    flags: list[str] = []
    if flavour == "mpich":
        flags = ["-disable-auto-cleanup"]
    elif flavour == "openmpi":
        flags = ["--with-ft", "ulfm", "--mca", "btl", "tcp,self"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            flags.append("--allow-run-as-root")
        if ranks > (os.cpu_count() or 1):
            flags.append("--oversubscribe")
    return [exe, *flags, "-n", str(ranks), sys.executable, "-m", "mpi4py", str(JOB), *job_args], flavour


def run(args) -> int:
    if args.ranks < 2:
        raise ValueError(f"-n must be at least 2 (rank 0 runs the DMCS, the others process CCDs), not {args.ranks}")
    job_args = ["--repo", args.repo, "--out", args.out]
    if args.config:
        job_args += ["--config", args.config]
    for fault in args.inject:
        job_args += ["--inject", fault]
    if args.max_visits:
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
    rc = subprocess.call(cmd, env=env)
    if rc == 2 or not manifest.is_file() or manifest.stat().st_mtime == before:
        return rc or 1
    data = json.loads(manifest.read_text())
    if not data.get("complete"):
        print(f"lsstpipe night: the night did not complete (mpiexec exit {rc}); start it again with the same "
              f"--out to go on where it stopped", file=sys.stderr)  # fmt: skip
        return rc or 1
    images = [im for v in data["visits"] for im in v["images"]]
    lost = [im for im in images if not (im["tape"] if im["kind"] == "raw" else im["raw_cache"])]
    if rc != 0:
        print(f"lsstpipe night: mpiexec ({flavour}) exited {rc} (a rank died, e.g. an injected fault); the night "
              f"completed without it", file=sys.stderr)  # fmt: skip
    return 1 if lost else 0
