"""MPI entry point of Calibration Products Production:
``mpiexec -n K python -m mpi4py jobs/calibration_products.py --repo REPO [--filters z,y] [--mode main|pre-drp]
[--detectors R10_S00,…] [--run LABEL] [--min-frames N]``.

Rank 0 scatters one task per CCD (:mod:`lsstpipe.calib.cpp`); the outputs are identical for any K ≥ 1.
Exit status: 0 when every CCD got its masters, 1 when some CCD failed (see the summary printed as JSON and
written to ``REPO/calib/runs/RUN.json``), 2 for a bad request.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(s.strip() for s in (text or "").split(",") if s.strip())


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="calibration_products", description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="data repository (lsstpipe simulate --calibs)")
    p.add_argument("--filters", help="comma-separated flat filters (default: every filter with flats)")
    p.add_argument("--mode", choices=("main", "pre-drp"), default="main")
    p.add_argument("--detectors", help="comma-separated detector names (default: all with raws)")
    p.add_argument("--run", help="run label (default: MODE-DAYOBS of the first input)")
    p.add_argument("--min-frames", type=int, default=3, help="fewest good frames for a master (default 3)")
    p.add_argument("--no-crosstalk", action="store_true", help="neither measure nor remove crosstalk")
    p.add_argument(
        "--scratch",
        default=os.environ.get("LSSTPIPE_CPP_SCRATCH"),
        help="directory for memory-mapped reduced frames (default: $LSSTPIPE_CPP_SCRATCH, else memory)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from mpi4py import MPI

    from lsstpipe.calib.cpp import CppRequest, run_cpp
    from lsstpipe.calib.masters import MasterConfig

    comm = MPI.COMM_WORLD
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format=f"[cpp rank {comm.rank}] %(levelname)s %(message)s")
    try:
        request = CppRequest(repo=args.repo, filters=_names(args.filters), mode=args.mode,
                             detectors=_names(args.detectors), run=args.run,
                             config=MasterConfig(min_frames=args.min_frames), crosstalk=not args.no_crosstalk,
                             scratch=args.scratch)  # fmt: skip
        summary = run_cpp(request, comm)
    except ValueError as exc:
        if comm.rank == 0:
            print(f"calibration_products: {exc}", file=sys.stderr)
        return 2
    status = 0 if summary.get("ok", True) else 1
    status = comm.bcast(status, root=0)
    if comm.rank == 0:
        print(json.dumps(summary, indent=1))
        for det in summary.get("failed", []):
            for err in summary["detectors"][det]["errors"]:
                print(f"calibration_products: {det}: {err}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
