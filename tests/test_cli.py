"""The command line: --help everywhere, clear errors on bad input, the simulate paths people use."""

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lsstpipe import cli
from lsstpipe.cli import COMMANDS, build_parser
from lsstpipe.cli_support import describe_error, standalone_main

DATA = Path(__file__).parent / "data"


def run(*args, check=False):
    p = subprocess.run([sys.executable, "-m", "lsstpipe", *args], capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr)
    return p


def test_console_script_is_installed():
    exe = shutil.which("lsstpipe")
    assert exe is not None
    p = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "night" in p.stdout, p.stderr[-2000:]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_on_every_subcommand(command):
    p = run(*([command] if command else []), "--help")
    assert p.returncode == 0 and "usage:" in p.stdout


def test_parser_defaults():
    args = build_parser().parse_args(["simulate", "--repo", "x"])
    # --snaps, --night: None = not given (their defaults, 2 and 1, apply in the mode they belong to)
    assert (args.camera, args.snaps, args.night, args.seed, args.calibs, args.overwrite) == ("mini", None, None, 1,
                                                                                              False, False)  # fmt: skip


def test_camera_json():
    out = json.loads(run("camera", "--name", "lsstcam", "--json", check=True).stdout)
    assert len(out["detectors"]) == 193


def test_unknown_detector_is_a_clear_error(tmp_path):
    p = run("simulate", "--repo", str(tmp_path / "r"), "--detectors", "R99_S00", "--quiet")
    assert p.returncode == 2
    assert "R99_S00" in p.stderr and "Traceback" not in p.stderr


def test_missing_opsim_database_is_a_clear_error(tmp_path):
    p = run("simulate", "--repo", str(tmp_path / "r"), "--opsim", str(tmp_path / "nope.db"), "--quiet")
    assert p.returncode == 2 and "nope.db" in p.stderr and "Traceback" not in p.stderr


def test_repository_of_another_camera_is_refused(tmp_path):
    repo = tmp_path / "r"
    run("simulate", "--repo", str(repo), "--visits", "1", "--detectors", "R10_S00", "--no-cds", "--no-templates",
        "--quiet", check=True)  # fmt: skip
    p = run("simulate", "--repo", str(repo), "--visits", "1", "--seed", "2", "--quiet")
    assert p.returncode == 2 and "seed" in p.stderr and "--repo" in p.stderr


def test_simulate_from_the_opsim_extract_on_two_ranks(tmp_path):
    repo = tmp_path / "r"
    p = run("simulate", "-n", "2", "--repo", str(repo), "--opsim", str(DATA / "opsim_extract.db"), "--max-visits",
            "1", "--detectors", "R10_S00,R11_S22", "--no-templates", "--quiet", check=True)  # fmt: skip
    summary = json.loads(p.stdout)
    # every exposure's two rafts in the CDS, raw and crosstalk-corrected: counted on both ranks
    assert summary["raws"] == 2 * summary["exposures"] and summary["cds_raft_images"] == 2 * 2 * summary["exposures"]
    assert len(list((repo / "raw").rglob("*.fits"))) == summary["raws"]


@pytest.mark.parametrize(
    "options, wrong",
    [
        (["--visits", "2", "--max-visits", "1"], "--max-visits"),
        (["--night", "2"], "--night"),
        (["--opsim", str(DATA / "opsim_extract.db"), "--snaps", "1"], "--snaps"),
        (["--opsim", str(DATA / "opsim_extract.db"), "--bands", "r", "--max-visits", "1"], "--bands"),
        (["--visits", "0"], "at least 1"),
        (["-n", "2", "--night", "2"], "--night"),  # refused before launching the ranks
    ],
)
def test_simulate_options_of_the_other_visit_source_are_refused(tmp_path, options, wrong):
    """--night/--max-visits only with --opsim; --snaps/--bands only with the built-in generator: an option that
    would be ignored is an error that says which mode it belongs to, and nothing is written."""
    p = run("simulate", "--repo", str(tmp_path / "r"), *options, "--quiet")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert wrong in p.stderr
    assert "--opsim" in p.stderr or "at least 1" in p.stderr
    assert not (tmp_path / "r").exists()


def test_file_system_problems_are_clear_errors(tmp_path):
    """A file where a directory is needed and a directory where a file is needed: one line naming the path
    and what to do, no traceback, and nothing in the way is changed."""
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0\n")
    p = run("simulate", "--repo", str(a_file), "--visits", "1", "--quiet")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert str(a_file) in p.stderr and "not a directory" in p.stderr and "--repo" in p.stderr
    assert a_file.read_text() == "root:x:0:0\n"
    out_dir = tmp_path / "scripts"
    out_dir.mkdir()
    p = run("slurm", "render", "simulate", "--set", "repo=/scratch/r", "--out", str(out_dir))
    assert p.returncode == 2 and "Traceback" not in p.stderr and "is a directory" in p.stderr
    assert list(out_dir.iterdir()) == []
    p = run("slurm", "render", "simulate", "--set", "repo=/scratch/r", "--out", str(tmp_path / "nope" / "x.sbatch"))
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr
    script = tmp_path / "simulate.sbatch"
    assert run("slurm", "render", "simulate", "--set", "repo=/scratch/r", "--out", str(script)).returncode == 0
    assert "/scratch/r" in script.read_text() and script.stat().st_mode & 0o111
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []  # no temporary file left


def test_operating_system_errors_name_the_file_and_say_what_to_do(monkeypatch, capsys):
    """An OSError from any command is reported with its file, the system's reason and advice; exit 2."""

    def fails(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/out.fits")

    monkeypatch.setitem(cli.COMMANDS, "camera", fails)
    assert cli.main(["camera"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lsstpipe camera: error: /data/out.fits: Permission denied; check the permissions")
    assert describe_error(IsADirectoryError(errno.EISDIR, "Is a directory", "cat.csv")) == (
        "cat.csv: Is a directory; it is a directory: give the path of a file"
    )
    assert "full" in describe_error(OSError(errno.ENOSPC, "No space left on device", "x"))
    assert describe_error(FileNotFoundError("x.fits: no such file")) == "x.fits: no such file"  # lsstpipe's own


def test_a_bug_keeps_its_traceback(monkeypatch):
    """A KeyError (or any other non-input error) inside a command is a bug: not turned into "error: 'exptime'"."""

    def buggy(args):
        return {}["exptime"]

    monkeypatch.setitem(cli.COMMANDS, "camera", buggy)
    with pytest.raises(KeyError, match="exptime"):
        cli.main(["camera"])


def test_standalone_entry_points_report_os_errors(capsys):
    def add_parser(sub):
        sub.add_parser("thing")

    def run_thing(args):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", "somedir.csv")

    assert standalone_main("thing", add_parser, run_thing, ["thing"]) == 2
    assert "lsstpipe thing: error: somedir.csv: Is a directory; it is a directory" in capsys.readouterr().err

    def buggy(args):
        raise KeyError("flux")

    with pytest.raises(KeyError):
        standalone_main("thing", add_parser, buggy, ["thing"])
