"""The night's rank layout: production counts, scaled worlds, validation, multi-prog files, messages, sbatch."""

import pickle
import subprocess
import sys
from dataclasses import replace

import pytest

from lsstpipe.control.config import Pool
from lsstpipe.runtime import (
    Heartbeat,
    JobAssignment,
    JobKind,
    JobResult,
    LayoutConfig,
    LayoutError,
    Role,
    Stop,
    Tag,
    full_layout,
    layout_for_world,
    multi_prog,
    scaled_layout,
)
from lsstpipe.runtime.layout import main
from lsstpipe.runtime.messages import TAG_OF, expect, tag_of
from lsstpipe.slurm import render

CORE = (Role.DMCS, Role.REPLICATOR, Role.DISTRIBUTOR, Role.CATCHUP, Role.WORKER)


def _contiguous(ranks):
    return list(ranks) == list(range(ranks[0], ranks[0] + len(ranks)))


def test_lsstcam_default_layout():
    lay = full_layout("lsstcam")
    c = lay.counts()
    assert lay.jobs_per_exposure == 22 and lay.detectors_per_visit == 193
    assert len(lay.pairs) == 25 and c[Role.REPLICATOR] == c[Role.DISTRIBUTOR] == 25
    assert [p.hot_spare for p in lay.pairs] == [False] * 22 + [True] * 3
    assert all(p.pool is Pool.FULLY_OPERATIONAL for p in lay.pairs)
    assert len(lay.strings) == 2 and all(len(s) >= 193 for s in lay.strings)
    assert c[Role.WORKER] + c[Role.SPARE] == 400  # LDM-230's recommendation
    assert len(lay.catchup_pairs) == 4 and c[Role.CATCHUP] == 8
    assert lay.size == sum(c.values()) == 1 + 50 + 8 + 386 + 14
    assert lay.ranks_of(Role.DMCS) == (0,)
    for k, p in enumerate(lay.pairs):  # replicator k is paired with distributor k
        assert (p.replicator, p.distributor) == (1 + k, 26 + k)
        assert lay.pair_of(p.replicator) == lay.pair_of(p.distributor) == p
    for r in lay.ranks:  # one role per rank, every role a contiguous range
        assert len(r.roles) == 1
    for role in Role:
        assert _contiguous(lay.ranks_of(role))
    assert layout_for_world("lsstcam", lay.size) == lay and not lay.scaled


def test_mini_layout_scales_with_the_camera():
    lay = full_layout("mini")
    assert lay.jobs_per_exposure == 3 and lay.detectors_per_visit == 19
    assert len(lay.pairs) == 4 and [p.hot_spare for p in lay.pairs] == [False, False, False, True]
    assert [len(s) for s in lay.strings] == [19, 19] and len(lay.spare_workers) == 2
    assert lay.size == 1 + 8 + 2 + 38 + 2


def test_configuration_changes_counts_and_pools():
    cfg = LayoutConfig(spare_pairs=0, catchup_pairs=2, worker_strings=3, workers_per_string=20, spare_workers=0,
                       local_only=(1, 2))  # fmt: skip
    lay = full_layout("mini", cfg)
    assert len(lay.pairs) == 3 and len(lay.catchup_pairs) == 2
    assert [len(s) for s in lay.strings] == [20, 20, 20] and lay.spare_workers == ()
    assert [p.pool for p in lay.pairs] == [Pool.FULLY_OPERATIONAL, Pool.LOCAL_ONLY, Pool.LOCAL_ONLY]
    assert all(p.pool is Pool.CATCHUP for p in lay.catchup_pairs)
    assert LayoutConfig.from_mapping({"spare_pairs": 0, "local_only": [0]}) == LayoutConfig(
        spare_pairs=0, local_only=(0,)
    )


@pytest.mark.parametrize("camera", ["mini", "lsstcam"])
@pytest.mark.parametrize("k", [1, 2, 4, 16])
def test_scaled_layouts_give_every_role_a_rank(camera, k):
    lay = layout_for_world(camera, k)
    assert lay.size == k and lay.scaled
    for role in CORE:
        assert lay.ranks_of(role), role
    assert lay.ranks_of(Role.DMCS) == (0,) and lay.ranks[0].role is Role.DMCS
    if k == 1:
        assert set(lay.ranks[0].roles) == set(CORE)
    if k == 2:
        assert lay.ranks[0].roles == (Role.DMCS, Role.REPLICATOR, Role.DISTRIBUTOR, Role.CATCHUP)
        assert lay.ranks[1].roles == (Role.WORKER,)
    if k >= 4:  # replicator and distributor on ranks of their own, talking over MPI
        p = lay.pairs[0]
        assert p.replicator != p.distributor and 0 not in (p.replicator, p.distributor)
    if k == 16:
        c = lay.counts()
        assert c[Role.SPARE] >= 1 and len(lay.strings) == 2
        assert all(lay.ranks[r].roles == (Role.CATCHUP,) for r in lay.ranks_of(Role.CATCHUP))
        assert sum(len(r.roles) for r in lay.ranks) == k  # one role per rank once the world allows


def test_scaled_layouts_never_exceed_the_full_one():
    full = full_layout("mini").counts()
    for k in range(1, full_layout("mini").size):
        lay = scaled_layout("mini", k)
        assert lay.size == k and all(r.roles for r in lay.ranks)
        assert all(lay.counts()[role] <= max(full[role], 1) for role in Role if role is not Role.CATCHUP)
        if k >= 7:  # every role on ranks of its own
            assert all(len(r.roles) == 1 for r in lay.ranks) and lay.counts()[Role.SPARE] >= 1


@pytest.mark.parametrize("kwargs,match", [
    ({"workers_per_string": 100}, "too small"),
    ({"worker_strings": 0}, "worker_strings must be an integer ≥ 1"),
    ({"spare_pairs": -1}, "spare_pairs must be an integer ≥ 0"),
    ({"spare_workers": True}, "spare_workers must be an integer"),
    ({"catchup_pairs": 0}, "catchup_pairs must be at least 1"),
    ({"local_only": (25,)}, r"local_only names pair\(s\) \[25\]"),
    ({"local_only": (1, 1)}, "twice"),
    ({"local_only": [1]}, "list of pair indices"),
])  # fmt: skip
def test_invalid_configurations_are_rejected_with_a_reason(kwargs, match):
    with pytest.raises(LayoutError, match=match):
        full_layout("lsstcam", LayoutConfig(**kwargs))


def test_invalid_worlds_and_mappings():
    with pytest.raises(LayoutError, match="unknown layout setting.*colour"):
        LayoutConfig.from_mapping({"colour": "red"})
    with pytest.raises(LayoutError, match="at least 1 rank"):
        scaled_layout("mini", 0)
    with pytest.raises(LayoutError, match="needs 51: run with -n 51"):
        layout_for_world("mini", 52)
    with pytest.raises(ValueError, match="unknown camera"):
        full_layout("hubble")


def test_inconsistent_layouts_cannot_be_built():
    lay = layout_for_world("mini", 4)
    worker = lay.ranks[3]
    bad = {
        "rank 0 must be the DMCS": {"ranks": (replace(lay.ranks[0], roles=(Role.WORKER,)),) + lay.ranks[1:]},
        "numbered 0, 1, 2": {"ranks": lay.ranks[:3] + (replace(worker, rank=4),)},
        "no rank plays the WORKER role": {"ranks": lay.ranks[:3] + (replace(worker, roles=(Role.SPARE,)),)},
        "does not match": {"pairs": (replace(lay.pairs[0], replicator=3),)},
        "each pair must name": {"ranks": (lay.ranks[0], replace(lay.ranks[1], pair=None)) + lay.ranks[2:]},
        "each worker string must name": {"ranks": lay.ranks[:3] + (replace(worker, string=1),)},
        "exactly one non-empty worker string": {"strings": ((3,), ())},
        "spare_workers must list": {"spare_workers": (3,)},
    }
    for match, change in bad.items():
        with pytest.raises(LayoutError, match=match):
            replace(lay, **change)


def _parse_multi_prog(text):
    owner = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        ranges, cmd = line.split(" ", 1)
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for r in range(int(lo), int(hi or lo) + 1):
                assert r not in owner, f"rank {r} on two lines"
                owner[r] = cmd
    return owner


def test_multi_prog_full_layout(tmp_path):
    lay = full_layout("mini")
    text = multi_prog(lay, "python -m mpi4py jobs/night.py --repo /r ", tmp_path / "night.conf")
    assert (tmp_path / "night.conf").read_text() == text
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert lines == [
        "0 python -m mpi4py jobs/night.py --repo /r --role dmcs",
        "1-4 python -m mpi4py jobs/night.py --repo /r --role replicator",
        "5-8 python -m mpi4py jobs/night.py --repo /r --role distributor",
        "9-10 python -m mpi4py jobs/night.py --repo /r --role catchup",
        "11-48 python -m mpi4py jobs/night.py --repo /r --role worker",
        "49-50 python -m mpi4py jobs/night.py --repo /r --role spare",
    ]
    owner = _parse_multi_prog(text)
    assert sorted(owner) == list(range(lay.size))
    for r, cmd in owner.items():
        assert cmd.endswith("--role " + lay.ranks[r].role.name.lower())


def test_multi_prog_scaled_and_per_role_programs():
    text = multi_prog(layout_for_world("mini", 2), "prog")
    assert text.splitlines()[1:] == ["0 prog --role dmcs+replicator+distributor+catchup", "1 prog --role worker"]
    lay = layout_for_world("mini", 4)
    per_role = {role: f"{role.name.lower()}.sh" for role in Role}
    owner = _parse_multi_prog(multi_prog(lay, per_role))
    assert owner == {r.rank: f"{r.role.name.lower()}.sh" for r in lay.ranks}
    with pytest.raises(LayoutError, match="no program line for role worker"):
        multi_prog(lay, {Role.DMCS: "a", Role.REPLICATOR: "b", Role.DISTRIBUTOR: "c"})
    with pytest.raises(LayoutError, match="not shell-safe"):
        multi_prog(lay, "prog; rm -rf /")
    with pytest.raises(LayoutError, match="empty"):
        multi_prog(lay, {role: " " for role in Role})


def test_layout_command_line(tmp_path, capsys):
    out = tmp_path / "layout.conf"
    assert main(["--camera", "mini", "--ranks", "4", "--program", "p", "--output", str(out)]) == 0
    assert _parse_multi_prog(out.read_text()) == {0: "p --role dmcs", 1: "p --role replicator+catchup",
                                                  2: "p --role distributor+catchup", 3: "p --role worker"}  # fmt: skip
    assert main(["--camera", "lsstcam"]) == 0 and "replicator    25  1-25" in capsys.readouterr().out
    assert main(["--camera", "mini", "--ranks", "99"]) == 2 and "needs 51" in capsys.readouterr().err


def test_night_sbatch_renders_a_multi_prog_job():
    script = render("night", {"repo": "/scratch/repo", "out": "/scratch/night1", "ranks": "4"})
    assert "${" not in script.replace("${SLURM_JOB_ID:-local}", "").replace("${LAYOUT}", "")
    assert "#SBATCH --ntasks=4" in script and "srun --mpi=pmi2 --multi-prog" in script
    assert "python -m lsstpipe.runtime.layout --camera mini --ranks 4" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    with pytest.raises(ValueError, match="needs a value for out"):
        render("night", {"repo": "/r"})


def test_layout_module_runs_as_a_script(tmp_path):
    out = tmp_path / "c.conf"
    subprocess.run([sys.executable, "-m", "lsstpipe.runtime.layout", "--camera", "mini", "--ranks", "2",
                    "--program", "x", "--output", str(out)], check=True)  # fmt: skip
    assert out.read_text().splitlines()[1:] == ["0 x --role dmcs+replicator+distributor+catchup", "1 x --role worker"]


# -- messages --------------------------------------------------------------------------------------------------


def _failing_job():
    raise RuntimeError("PSF fit diverged on R22_S11")


def test_every_payload_has_one_tag_and_pickles():
    job = JobAssignment(7, JobKind.CCD, visit=3, exposure=1, detector=94, deadline=12.5)
    beat = Heartbeat(sender=2, role=Role.DISTRIBUTOR, sequence=5, sent_at=1.0)
    ok = JobResult(7, 4, True, 0.5, counts=(("diasources", 12), ("alerts", 3)))
    for payload, tag in ((job, Tag.JOB), (beat, Tag.HEARTBEAT), (ok, Tag.RESULT), (Stop(), Tag.STOP)):
        assert tag_of(payload) is tag
        assert pickle.loads(pickle.dumps(payload)) == payload
        assert expect(int(tag), payload) is payload
    assert sorted(TAG_OF.values()) == [t for t in Tag if t is not Tag.DATA]  # DATA: raw bytes, no payload type
    assert ok.count("alerts") == 3 and ok.count("missing") == 0
    with pytest.raises(TypeError, match="under tag JOB carries a Stop"):
        expect(Tag.JOB, Stop())
    with pytest.raises(TypeError, match="not a runtime tag"):
        expect(99, Stop())
    with pytest.raises(TypeError, match="dict is not a runtime message"):
        tag_of({"kind": "job"})


def test_failure_result_carries_the_traceback():
    try:
        _failing_job()
    except RuntimeError as exc:
        res = JobResult.failure(7, 3, exc, elapsed_s=0.1)
    assert not res.ok and res.error_type == "RuntimeError" and "diverged" in res.message
    assert "_failing_job" in res.traceback and "Traceback" in res.traceback
    assert pickle.loads(pickle.dumps(res)) == res


@pytest.mark.parametrize("kwargs,match", [
    ({"job_id": -1, "kind": JobKind.CCD, "visit": 1, "detector": 0}, "job_id"),
    ({"job_id": 1, "kind": JobKind.CCD, "visit": 1}, "needs its detector"),
    ({"job_id": 1, "kind": JobKind.SCIENCE_RAFT, "visit": 1}, "needs its raft"),
    ({"job_id": 1, "kind": "ccd", "visit": 1, "detector": 0}, "JobKind"),
    ({"job_id": 1, "kind": JobKind.WAVEFRONT, "visit": 1, "rafts": ("R00",), "attempt": 0}, "attempt"),
    ({"job_id": 1, "kind": JobKind.WAVEFRONT, "visit": 1, "rafts": ("R00",), "deadline": float("nan")}, "NaN"),
    ({"job_id": 1, "kind": JobKind.WAVEFRONT, "visit": 1}, "names its corner rafts"),
    ({"job_id": 1, "kind": JobKind.WAVEFRONT, "visit": 1, "raft": "R00", "rafts": ("R00",)}, "not in raft"),
    ({"job_id": 1, "kind": JobKind.SCIENCE_RAFT, "visit": 1, "raft": "R22", "rafts": ("R22",)}, "only a wavefront"),
])  # fmt: skip
def test_bad_job_assignments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JobAssignment(**kwargs)


def test_bad_results_and_heartbeats_are_rejected():
    with pytest.raises(ValueError, match="error_type exactly when"):
        JobResult(1, 0, False)
    with pytest.raises(ValueError, match="role must be a Role"):
        Heartbeat(1, "worker", 0, 0.0)
