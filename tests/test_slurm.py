"""sbatch templates render only with complete, known, shell-safe values, and run on a real Slurm.

The tests marked ``slurm`` submit rendered templates to the single-node cluster of ``.ci/slurm.sh``
(``eval "$(.ci/slurm.sh start)"`` sets ``LSSTPIPE_SLURM=1`` and ``SLURM_CONF``); without it they skip.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lsstpipe.camera.geometry import get_camera
from lsstpipe.slurm import render


def test_render_fills_every_placeholder():
    script = render("simulate", {"repo": "/scratch/night1", "ranks": "32", "partition_line": "lsst"})
    assert "${" not in script
    assert "#SBATCH --ntasks=32" in script and "--repo /scratch/night1" in script
    assert "#SBATCH --partition=lsst" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


@pytest.mark.parametrize("values,match", [
    ({}, "needs a value for repo"),
    ({"repo": "r", "colour": "red"}, "unknown setting"),
    ({"repo": "r; rm -rf /"}, "shell-safe"),
    ({"repo": "r", "ranks": "0"}, "positive integer"),
])  # fmt: skip
def test_render_rejects_bad_values(values, match):
    with pytest.raises(ValueError, match=match):
        render("simulate", values)


def test_unknown_template():
    with pytest.raises(ValueError, match="templates are"):
        render("dinner", {})


# --- Jobs submitted to a real Slurm cluster (.ci/slurm.sh start; LSSTPIPE_SLURM=1) ---------------------

ROOT = Path(__file__).resolve().parent.parent
RUN_SLURM = os.environ.get("LSSTPIPE_SLURM") == "1"
needs_slurm = pytest.mark.skipif(
    not RUN_SLURM,
    reason='no test Slurm cluster: run eval "$(.ci/slurm.sh start)" (sets LSSTPIPE_SLURM=1 and SLURM_CONF)',
)
JOB_TIMEOUT = 600  # seconds for one sbatch --wait; the job is cancelled when it runs longer
# MPICH's UCX and OFI netmods otherwise listen on every network interface: the test jobs stay on loopback.
LOOPBACK_ONLY = "--export=ALL,UCX_NET_DEVICES=lo,FI_TCP_IFACE=lo"

# A throw-away night program: every rank records what srun --multi-prog gave it and checks a collective.
FAKE_NIGHT = """\
import argparse, json, sys
from pathlib import Path
from mpi4py import MPI

parser = argparse.ArgumentParser()
parser.add_argument("--repo", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--role", required=True)
args = parser.parse_args()
comm = MPI.COMM_WORLD
total = comm.allreduce(comm.Get_rank() + 1)
record = {"rank": comm.Get_rank(), "size": comm.Get_size(), "role": args.role, "repo": args.repo, "sum": total}
(Path(args.out) / f"rank-{comm.Get_rank()}.json").write_text(json.dumps(record))
"""


def _render(template: str, script: Path, /, **values: str) -> Path:
    """Render ``template`` into ``script`` with the ``lsstpipe slurm render`` command line, as a user would."""
    cmd = [sys.executable, "-m", "lsstpipe", "slurm", "render", template, "--out", str(script)]
    for key, value in values.items():
        cmd += ["--set", f"{key}={value}"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return script


def _sbatch_wait(script: Path, *options: str) -> tuple[str, int, dict[str, str]]:
    """Submit ``script`` from the repository root and wait: (job id, sbatch's exit status, job record)."""
    proc = subprocess.Popen(
        ["sbatch", "--parsable", "--wait", LOOPBACK_ONLY, *options, str(script)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    job_id = proc.stdout.readline().strip().split(";")[0]
    if not job_id:
        pytest.fail(f"sbatch did not submit {script} (exit status {proc.wait()}): see its stderr below")
    try:
        status = proc.wait(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", job_id], check=False)
        proc.kill()
        pytest.fail(f"Slurm job {job_id} ({script.name}) still ran after {JOB_TIMEOUT} s: cancelled")
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=True)
    record = dict(item.split("=", 1) for item in shown.stdout.split() if "=" in item)
    return job_id, status, record


def _job_log(log_dir: Path, job_id: str = "*") -> str:
    """The sbatch output of job ``job_id`` (of every job by default) in ``log_dir``."""
    logs = sorted(log_dir.glob(f"*-{job_id}.out"))
    return "\n".join(f"== {p.name}\n{p.read_text()}" for p in logs) or f"(no log of job {job_id} in {log_dir})"


def _assert_completed(job_id: str, status: int, record: dict[str, str], log_dir: Path) -> None:
    log = _job_log(log_dir, job_id)
    assert status == 0, f"sbatch --wait exited {status} for job {job_id}; its log:\n{log}"
    assert record.get("JobState") == "COMPLETED" and record.get("ExitCode") == "0:0", (record, log)


@pytest.mark.slurm
@needs_slurm
def test_simulate_job_on_slurm(tmp_path):
    """The rendered simulate template runs the simulator on 2 MPI ranks through srun and fills a repository."""
    from lsstpipe.repo import Repository

    repo, dets = tmp_path / "repo", ("R10_S00", "R10_S01")
    script = _render(
        "simulate", tmp_path / "simulate.sbatch", repo=str(repo), ranks="2", camera="mini",
        visit_args="--visits 1", extra_args=f"--no-templates --quiet --detectors {','.join(dets)}",
        log_dir=str(tmp_path), job_name="lsstpipe-test-simulate", time_limit="00:10:00",
    )  # fmt: skip
    # --overcommit: the test node may have fewer CPUs than ranks (a 2-core CI machine).
    job_id, status, record = _sbatch_wait(script, "--overcommit")
    _assert_completed(job_id, status, record, tmp_path)
    assert record["NumTasks"] == "2"
    summary = json.loads((repo / "simulation.json").read_text())
    assert summary["camera"] == "mini" and summary["visits"] == 1
    raws = Repository(repo).raws()
    exposures = {e["obsid"] for e in Repository(repo).exposures() if e["imgtype"] == "OBJECT"}
    assert exposures and {(r["obsid"], r["detector"]) for r in raws} == {(o, d) for o in exposures for d in dets}
    for raw in raws:
        assert hashlib.sha256((repo / raw["path"]).read_bytes()).hexdigest() == raw["sha256"], raw["path"]


@pytest.mark.slurm
@needs_slurm
def test_night_template_starts_every_role_with_srun_multi_prog(tmp_path):
    """The rendered night template writes the rank layout as a multi-prog file and srun starts each rank's line.

    A throw-away program stands in for jobs/night.py (``job_script`` is a template setting), so this checks
    the template, the layout file and srun's PMI wiring on their own: every rank must see the whole world
    and the role the layout gives it.
    """
    from lsstpipe.runtime.layout import layout_for_world

    fake, out, ranks = tmp_path / "fake_night.py", tmp_path / "out", 4
    fake.write_text(FAKE_NIGHT)
    script = _render(
        "night", tmp_path / "night.sbatch", repo=str(tmp_path / "no-repo"), out=str(out), ranks=str(ranks),
        job_script=str(fake), log_dir=str(tmp_path), job_name="lsstpipe-test-multiprog", time_limit="00:05:00",
    )  # fmt: skip
    job_id, status, record = _sbatch_wait(script, "--overcommit")
    _assert_completed(job_id, status, record, tmp_path)
    assert (out / f"night-{job_id}.multi-prog").is_file()
    layout = layout_for_world("mini", ranks)
    for rank in range(ranks):
        seen = json.loads((out / f"rank-{rank}.json").read_text())
        assert seen["size"] == ranks and seen["sum"] == ranks * (ranks + 1) // 2, seen
        assert seen["role"] == "+".join(r.name.lower() for r in layout.roles_of(rank)), seen
        assert seen["repo"] == str(tmp_path / "no-repo")
    assert not (out / f"rank-{ranks}.json").exists()


@pytest.mark.slurm
@pytest.mark.slow
@needs_slurm
@pytest.mark.skipif(not (ROOT / "jobs" / "night.py").is_file(), reason="jobs/night.py not present")
def test_night_job_on_slurm(tmp_path):
    """A short night on three ``mini`` CCDs through the rendered templates: every visit's CCDs are processed."""
    repo, out = tmp_path / "repo", tmp_path / "out"
    # the test run's numba cache (tests/run.sh) when it has one: the jobs start warm after the earlier nights
    cache = {"numba_cache_dir": os.environ["NUMBA_CACHE_DIR"]} if os.environ.get("NUMBA_CACHE_DIR") else {}
    simulate = _render(
        "simulate", tmp_path / "simulate.sbatch", repo=str(repo), ranks="2", camera="mini",
        visit_args="--visits 1", extra_args="--calibs --quiet --detectors R10_S11,R11_S11,R00_SW", log_dir=str(tmp_path),
        time_limit="00:10:00", **cache,
    )  # fmt: skip
    _assert_completed(*_sbatch_wait(simulate, "--overcommit"), tmp_path)
    # without the calibration exposures before the visits (the night tests cover them; each costs its 300 s
    # dark's integration, 30 s at the night's default clock)
    (tmp_path / "night.yaml").write_text("calibration_exposures: 0\n")
    night = _render(
        "night", tmp_path / "night.sbatch", repo=str(repo), out=str(out), log_dir=str(tmp_path),
        time_limit="00:10:00", extra_args=f"--config {tmp_path / 'night.yaml'}", **cache,
    )  # fmt: skip
    _assert_completed(*_sbatch_wait(night, "--overcommit"), tmp_path)

    _assert_every_ccd_processed(repo, out / "manifest.json", tmp_path)


def _assert_every_ccd_processed(repo: Path, manifest_path: Path, log_dir: Path) -> None:
    """Every CCD with a raw of a visit in ``repo`` is listed as processed under that visit in the manifest."""
    from lsstpipe.repo import Repository

    visit_of = {e["obsid"]: e["visit"] for e in Repository(repo).exposures() if e["imgtype"] == "OBJECT"}
    expected: dict[int, set[str]] = {}
    for raw in Repository(repo).raws():
        if raw["obsid"] in visit_of:
            expected.setdefault(visit_of[raw["obsid"]], set()).add(raw["detector"])
    assert manifest_path.is_file(), f"no {manifest_path}\n{_job_log(log_dir)}"
    manifest = json.loads(manifest_path.read_text())
    not_processed = [(v["visit"], c) for v in manifest["visits"] for c in v["ccds"] if c["status"] != "processed"]
    assert not_processed == [], f"CCDs not processed: {not_processed}\n{_job_log(log_dir)}"
    names = {d.id: d.name for d in get_camera("mini").detectors}
    got = {v["visit"]: {names.get(c["detector"], c["detector"]) for c in v["ccds"]} for v in manifest["visits"]}
    assert got == expected
