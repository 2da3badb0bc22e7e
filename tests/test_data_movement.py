"""The data-movement benchmark (``benchmarks/data_movement.py``) as a harness: it runs, moves the bytes intact
through the runtime's classes and messages, and writes the issue's keys. Correctness only — no timing
thresholds (the numbers are in ``benchmarks/results-data_movement-2vcpu.txt``).

The benchmark is launched under ``mpiexec -n 3`` in a subprocess, as an operator would, so these tests run
under plain pytest.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "data_movement.py"
KEYS = ("runtime_gibps", "plain_gibps", "ratio", "schedule_overhead_us", "schedule_plain_us", "verified_gibps",
        "hop1_runtime_gibps", "hop2_runtime_gibps", "hop1_plain_gibps", "hop2_plain_gibps")  # fmt: skip


def _bench(ranks: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec on PATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py", str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny run through every phase: 2 rafts of 64² CCDs, compressed, with the real stores."""
    out = tmp_path_factory.mktemp("data_movement")
    done = _bench(3, "--ccd-size", "64", "--rafts", "2", "--repeat", "2", "--jobs", "40", "--compress",
                  "--store", "--tmp", str(out), "--json", str(out / "numbers.json"))  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done, json.loads((out / "numbers.json").read_text()), out


def test_writes_the_issue_keys_with_positive_finite_numbers(tiny):
    _, numbers, _ = tiny
    for key in KEYS + ("archive_gibps", "hop1_archive_gibps", "hop2_archive_gibps"):
        assert math.isfinite(numbers[key]) and numbers[key] > 0, key
    assert numbers["ratio"] == pytest.approx(numbers["runtime_gibps"] / numbers["plain_gibps"])
    assert numbers["schedule_jobs"] >= 40


def test_bytes_arrive_intact(tiny):
    done, numbers, _ = tiny
    # per raft: hop 1 ×(2 repeats × 2 ways) + verified decode + 9 served CCD checksums; hop 2: 9 CCDs × 5 ways
    # (2 repeats × 2 ways + verified) + 9 archive CCDs + the replicator job + the two archived images
    per_raft = 2 * 2 + 1 + 9 + 9 * (2 * 2 + 1) + 9 + 2
    warm_up = 2 + 2 * 9  # the first raft's untimed plain/runtime pair of each hop
    assert numbers["intact"] is True and numbers["checks"] == 2 * per_raft + warm_up
    assert "intact:" in done.stdout and "checks passed" in done.stdout
    assert numbers["pixel_bytes"] == 2 * 9 * 16 * 32 * 8 * 4  # 2 rafts × 9 CCDs × 16 segments 32×8 int32


def test_prints_the_ratio_against_the_anchor(tiny):
    done, _, _ = tiny
    for text in ("runtime / plain:", "target ≥ 70 %", "Send/Recv of the same bytes", "µs per no-op CCD job"):
        assert text in done.stdout, text


def test_leaves_no_stores_behind(tiny):
    _, _, out = tiny
    assert not any(p.name.startswith("data_movement-") for p in out.iterdir())


def test_refuses_a_world_that_is_not_three_ranks():
    done = _bench(2, "--ccd-size", "64", "--rafts", "1", timeout=120)
    assert done.returncode != 0
    assert "exactly 3 ranks" in done.stderr


@pytest.mark.parametrize(("args", "message"), [(["--ccd-size", "60"], "multiple of 8"),
                                                (["--rafts", "0"], "--rafts must be ≥ 1"),
                                                (["--repeat", "0"], "--repeat must be ≥ 1")])  # fmt: skip
def test_bad_arguments_say_what_to_do(args, message, capsys):
    sys.path.insert(0, str(ROOT))
    from benchmarks.data_movement import parse_args

    with pytest.raises(SystemExit):
        parse_args(args)
    assert message in capsys.readouterr().err
