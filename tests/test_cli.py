"""The command line: --help everywhere, clear errors on bad input, the simulate paths people use."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lsstpipe.cli import COMMANDS, build_parser

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
    assert (args.camera, args.snaps, args.seed, args.calibs) == ("mini", 2, 1, False)


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
