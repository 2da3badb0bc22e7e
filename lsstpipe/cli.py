"""The ``lsstpipe`` command line: one subcommand per job, each with ``--help``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lsstpipe import __version__, detect_cli, night_cli, subtract_cli
from lsstpipe.cli_support import USER_ERRORS, report_error
from lsstpipe.control import cli_control


def _add_simulate(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate raw LSSTCam exposures, calibrations, templates and truth into a data repository",
        description=(
            "Simulate a night of LSSTCam (or the scaled 'mini' camera) data into REPO: raws as the camera "
            "writes them, the Camera Data System buffer, calibration exposures, templates, a reference "
            "catalogue and truth tables. Deterministic for a seed. The layout is described in "
            "REPO/README.txt and in lsstpipe.repo."
        ),
    )
    p.add_argument("--repo", required=True, help="data repository directory (created if missing)")
    p.add_argument("--camera", choices=("mini", "lsstcam"), default="mini", help="camera model (default: mini)")
    p.add_argument("--detectors", default=None,
                   help="comma-separated detector names or ids, e.g. R22_S11,R22_S12 (default: all)")  # fmt: skip
    src = p.add_mutually_exclusive_group()
    src.add_argument("--visits", type=int, default=None, help="number of visits from the built-in generator")
    src.add_argument("--opsim", default=None, help="Rubin simulated-survey SQLite database to take visits from")
    p.add_argument("--night", type=int, default=None,
                   help="night number in the --opsim database (default 1 = the first); only with --opsim")  # fmt: skip
    p.add_argument("--max-visits", type=int, default=None,
                   help="use at most this many visits of the --opsim night; only with --opsim")  # fmt: skip
    p.add_argument("--snaps", type=int, choices=(1, 2), default=None,
                   help="2 × 15 s snaps (default) or 1 × 30 s per visit of the built-in generator (with --opsim "
                        "the database sets them)")  # fmt: skip
    p.add_argument(
        "--calibs", action="store_true", help="also simulate bias, dark, flat and crosstalk spot-projector exposures"
    )
    p.add_argument("--no-templates", action="store_true", help="do not make templates")
    p.add_argument("--no-cds", action="store_true", help="do not fill the Camera Data System buffer")
    p.add_argument("--no-compress", action="store_true",
                   help="write plain FITS raws instead of RICE tile-compressed ones (lossless, ~4x smaller)")  # fmt: skip
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--bands", default=None,
                   help="bands to cycle through in the built-in generator, e.g. 'riz' (with --opsim the database "
                        "sets them)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace the simulation of an existing REPO: its raws, truth, templates, CDS buffer and "
                        "calibration products are deleted first. Without it, simulating into an existing "
                        "repository must use the same camera, seed and visits (e.g. to add --calibs, templates or "
                        "detectors)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    par = p.add_mutually_exclusive_group()
    par.add_argument(
        "-n",
        "--ranks",
        type=int,
        default=None,
        help="run on this many MPI ranks (launches mpiexec; the result is identical for any number)",
    )
    par.add_argument("--mpi", action="store_true", help="share the work among the ranks of MPI_COMM_WORLD "
                     "(set when started under mpiexec, e.g. by jobs/simulate.py)")  # fmt: skip


def _add_camera(sub) -> None:
    p = sub.add_parser("camera", help="describe a camera model", description="Print a camera's detectors.")
    p.add_argument("--name", choices=("mini", "lsstcam"), default="lsstcam")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_slurm(sub) -> None:
    p = sub.add_parser("slurm", help="render an sbatch template from slurm/",
                       description="Render an sbatch template with validated values (see lsstpipe.slurm).")  # fmt: skip
    ssub = p.add_subparsers(dest="slurm_command", metavar="ACTION")
    ssub.required = True
    r = ssub.add_parser("render", help="print or write a rendered sbatch script",
                        description="Fill a template's ${placeholders}; unknown or missing values are errors.")  # fmt: skip
    r.add_argument("template", help="template name, e.g. simulate")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a placeholder value (repeatable)")
    r.add_argument("--out", default=None, help="write the script here instead of printing it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsstpipe",
        description="Automated operation of an LSST-class survey data-management system on MPI.",
    )
    parser.add_argument("--version", action="version", version=f"lsstpipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_simulate(sub)
    _add_camera(sub)
    _add_slurm(sub)
    cli_control.add_parsers(sub)  # config, ocs, dmcs
    detect_cli.add_parser(sub)
    subtract_cli.add_parser(sub)
    night_cli.add_parser(sub)
    return parser


def _cmd_camera(args) -> int:
    from lsstpipe.camera import get_camera

    cam = get_camera(args.name)
    rows = [
        {"id": d.id, "name": d.name, "type": d.type.value, "vendor": d.vendor.name,
         "shape": list(d.shape), "center_mm": [round(c, 3) for c in d.center_mm]}
        for d in cam
    ]  # fmt: skip
    if args.json:
        print(json.dumps({"camera": cam.name, "detectors": rows}, indent=1))
    else:
        print(f"{cam.name}: {len(cam.science)} science detectors, {len(cam.wavefront)} wavefront sensors")
        for r in rows:
            print(f"{r['id']:4d} {r['name']:8s} {r['type']:9s} {r['vendor']:4s} {r['shape'][1]}x{r['shape'][0]}")
    return 0


def _cmd_simulate(args) -> int:
    from lsstpipe.sim.simulate import SimulationRequest, check_request, run_simulation

    request = SimulationRequest(
        repo=args.repo, camera=args.camera,
        detectors=tuple(s.strip() for s in args.detectors.split(",") if s.strip()) if args.detectors else (),
        n_visits=args.visits, opsim=args.opsim, night=args.night, max_visits=args.max_visits,
        n_snaps=args.snaps, calibs=args.calibs, templates=not args.no_templates, cds=not args.no_cds,
        seed=args.seed, progress=not args.quiet, bands=args.bands, compress=not args.no_compress,
        overwrite=args.overwrite,
    )  # fmt: skip
    check_request(request)  # before launching ranks: one clear message, not one per rank
    if args.ranks is not None:
        return _relaunch_under_mpiexec(args.ranks, "simulate")
    comm = None
    if args.mpi:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    summary = run_simulation(request, comm)
    if comm is None or comm.rank == 0:
        print(json.dumps(summary, indent=1))
    return 0


def _relaunch_under_mpiexec(ranks: int, command: str) -> int:
    """Run this same command line again on ``ranks`` MPI ranks (``python -m mpi4py`` so that one rank's
    unhandled exception aborts the job instead of hanging it)."""
    import shutil
    import subprocess

    if ranks < 1:
        raise ValueError(f"-n must be at least 1, not {ranks}")
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        raise FileNotFoundError("mpiexec not found; install MPI with 'pip install mpich' (or 'pip install -e .')")
    argv = sys.argv[1:]
    cleaned, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("-n", "--ranks"):
            skip = True
            continue
        if a.startswith("--ranks=") or (a.startswith("-n") and a[2:].isdigit()):
            continue
        cleaned.append(a)
    from lsstpipe.night_cli import host_flags, mpi_flavour

    flags = host_flags(mpi_flavour(mpiexec), ranks)
    cmd = [mpiexec, *flags, "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "lsstpipe", *cleaned, "--mpi"]
    return subprocess.call(cmd)


def _cmd_slurm(args) -> int:
    from pathlib import Path

    from lsstpipe.slurm import render, write_script

    values = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, not {item!r}")
        values[key.strip()] = value
    script = render(args.template, values)
    if args.out:
        write_script(Path(args.out), script)
    else:
        print(script, end="")
    return 0


COMMANDS = {
    "simulate": _cmd_simulate,
    "camera": _cmd_camera,
    "slurm": _cmd_slurm,
    "detect": detect_cli.run,
    "subtract": subtract_cli.run,
    "night": night_cli.run,
    **cli_control.HANDLERS,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lsstpipe`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as exc:  # a bad input or an unusable file; anything else is a bug: keep its traceback
        return report_error(args.command, exc)


if __name__ == "__main__":
    sys.exit(main())
