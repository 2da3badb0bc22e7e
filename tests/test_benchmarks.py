"""The simulator benchmark runs end to end in its quick configuration and writes complete, sane numbers.

Correctness only: no timing is asserted (that would depend on the machine).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = (
    "ccd_exposure_seconds", "stage_seconds", "numpy_poisson_seconds", "ratio_to_numpy_poisson", "signature_seconds",
    "mini_night_seconds", "mini_night_ccd_exposures", "mini_night_seconds_per_ccd_exposure", "copy_gbps",
    "peak_rss_mb",
)  # fmt: skip


def _numbers(value, where=""):
    """Every number in a JSON value (booleans excluded), with where it sits."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{where}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield where, value


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tmp" / "out.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "simulate.py"), "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


def test_quick_run_writes_every_key(quick):
    _, result = quick
    missing = [k for k in KEYS if k not in result]
    assert not missing, f"benchmark JSON lacks {missing}"
    dets = result["config"]["detectors"]
    assert len(dets) == 2
    for key in ("ccd_exposure_seconds", "stage_seconds", "numpy_poisson_seconds", "ratio_to_numpy_poisson",
                "signature_seconds"):  # fmt: skip
        assert sorted(result[key]) == sorted(dets), key


def test_quick_run_numbers_are_finite_and_positive(quick):
    _, result = quick
    numbers = list(_numbers(result))
    assert len(numbers) > 50
    bad = [(where, v) for where, v in numbers if not (math.isfinite(v) and v > 0)]
    assert not bad, bad


def test_quick_run_is_consistent(quick):
    _, result = quick
    for det, total in result["ccd_exposure_seconds"].items():
        stages = result["stage_seconds"][det]
        top = sum(stages[k] for k in ("scene", "render", "write", "truth", "other"))
        assert top == pytest.approx(total, rel=1e-6)  # exclusive stages partition the exposure (one repeat)
        assert result["ratio_to_numpy_poisson"][det] == pytest.approx(total / result["numpy_poisson_seconds"][det])
    n = result["mini_night_ccd_exposures"]
    assert isinstance(n, int)
    assert result["mini_night_seconds_per_ccd_exposure"] == pytest.approx(result["mini_night_seconds"] / n)


def test_quick_run_prints_the_table(quick):
    stdout, result = quick
    assert "simulate_one / numpy poisson" in stdout
    assert "PASS" in stdout or "MISS" in stdout
    for det in result["config"]["detectors"]:
        assert det in stdout


CHAIN_KEYS = ("chain_seconds", "detect_seconds", "sep_seconds", "isr_gbps", "copy_gbps", "peak_rss_mb")


def test_ccd_chain_quick_run_writes_the_issue_keys(tmp_path):
    """benchmarks/ccd_chain.py --quick (a mini CCD) runs the whole chain and writes every required key."""
    out = tmp_path / "chain.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ccd_chain.py"), "--quick", "--repeat", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    missing = [k for k in CHAIN_KEYS if k not in result]
    assert not missing, f"ccd_chain JSON lacks {missing}"
    for k in CHAIN_KEYS:
        assert isinstance(result[k], float) and math.isfinite(result[k]) and result[k] > 0, (k, result[k])
    assert {"isr", "characterize", "difference", "dia_sources"} <= set(result["stage_seconds"])
    assert "whole chain" in proc.stdout


def test_ccd_chain_stopped_while_simulating_leaves_no_simulation_or_repository(tmp_path):
    """SIGTERM (``timeout``, a batch system) during the simulation: the simulation process is killed and the
    temporary repository removed, not left running and on disk."""
    import os
    import signal
    import time

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "ccd_chain.py"), "--quick", "--repeat", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def simulations():
        found = []
        for pid in os.listdir("/proc"):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"simulate" in cmd and any(str(tmp_path).encode() in c for c in cmd):
                found.append(int(pid))
        return found

    deadline = time.monotonic() + 120
    while not simulations() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert simulations(), "the benchmark never started its simulation"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    time.sleep(0.5)
    assert simulations() == []
    assert not list(tmp_path.glob("ccd_chain_*"))  # the temporary repository is gone


def test_cutouts_quick_run_compares_with_astropy(tmp_path):
    out = tmp_path / "cutouts.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cutouts.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["identical_bytes"] is True and result["sources"] == 10
    for key in ("astropy_seconds_per_alert", "writer_seconds_per_alert", "writer_setup_seconds", "astropy_over_writer"):
        assert math.isfinite(result[key]) and result[key] > 0
    assert "faster; bytes identical: True" in proc.stdout


ISR_KEYS = ("isr_seconds", "isr_gbps", "copy_gbps", "isr_fraction_of_copy_bandwidth", "isr_resident_gbps",
            "copy_resident_gbps", "stream7_gbps", "arith7_gbps", "arith7_fraction_of_stream7", "numpy_isr_seconds",
            "stream7_new_gbps")  # fmt: skip


def test_isr_quick_run_writes_its_anchors(tmp_path):
    """benchmarks/isr.py --quick (one full-size CCD, 2 repeats): ISR against the copy, the bare seven-plane
    loop and the same loop with ISR's arithmetic, every figure written."""
    out = tmp_path / "isr.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "isr.py"), "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for k in ISR_KEYS:
        assert isinstance(result[k], float) and math.isfinite(result[k]) and result[k] > 0, (k, result.get(k))
    assert result["arith7_fraction_of_stream7"] == pytest.approx(result["arith7_gbps"] / result["stream7_gbps"])
    (det,) = result["detectors"]
    assert det["detector"] == "R22_S11" and det["minimal_bytes"] > 4 * 4004 * 4096 * 6
    assert "all of ISR's per-pixel arithmetic" in proc.stdout and "run_isr" in proc.stdout


def test_timing_helpers_count_runs_and_pick_the_statistic(monkeypatch):
    """benchmarks/timing.py: one untimed warm-up run when asked, then exactly ``repeat`` timed ones."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.timing import fastest, median, median_wall_cpu

    calls = []
    assert fastest(lambda: calls.append(1), 3) >= 0 and len(calls) == 4
    calls.clear()
    assert median(lambda: calls.append(1), 3) >= 0 and len(calls) == 3
    calls.clear()
    wall, cpu = median_wall_cpu(lambda: calls.append(1), 2, warmup=False)
    assert wall >= 0 and cpu >= 0 and len(calls) == 2
    import benchmarks.timing as timing

    for fn, want in ((fastest, 1.0), (median, 2.0)):  # a scripted clock: timed runs of 3, 1 and 2 s
        ticks = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])
        monkeypatch.setattr(timing, "perf_counter", ticks.__next__)
        assert fn(lambda: None, 3, warmup=False) == want
    monkeypatch.undo()
    with pytest.raises(ValueError, match="repeat"):
        median(lambda: None, 0)
