"""``lsstpipe night`` rejects bad input before it starts anything: one message that names the key, the value
and what is allowed, exit status 2, no traceback.

The configuration and the command line are checked by the launcher before ``mpiexec`` (its fake here records
whether it was started); the repository by the ranks before their roles start (in-process with a stand-in for
two agreeing ranks, and twice under a real ``mpiexec`` for the cases the code review found crashing every rank).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest

from lsstpipe import cli, night_cli
from lsstpipe.runtime import loop
from lsstpipe.runtime import night as N
from lsstpipe.runtime.archiving import ArchiveSettings
from lsstpipe.runtime.dmcs_night import SchedulerSettings
from lsstpipe.runtime.layout import LayoutConfig, LayoutError
from lsstpipe.runtime.worker import WorkerSettings

DETECTOR = "R10_S11"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A mini repository of 2 visits of one CCD, without calibration exposures (so without masters)."""
    root = tmp_path_factory.mktemp("night-config") / "repo"
    rc = cli.main(["simulate", "--repo", str(root), "--detectors", DETECTOR, "--visits", "2", "--snaps", "1",
                   "--no-templates", "--quiet"])  # fmt: skip
    assert rc == 0 and (root / "repo.yaml").is_file()
    return root


@pytest.fixture
def mpiexec(tmp_path) -> Path:
    """An ``mpiexec`` that only records that it was started (``started`` next to it)."""
    fake = tmp_path / "mpiexec"
    fake.write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "started"}\n[ "$1" = --version ] && echo HYDRA\nexit 0\n')
    fake.chmod(0o755)
    return fake


def _launch(tmp_path, capsys, mpiexec: Path, *extra: str, config: str | None = None) -> tuple[int, str]:
    """``lsstpipe night`` in-process: exit status and standard error; mpiexec must not have started."""
    args = ["night", "-n", "2", "--repo", str(tmp_path / "repo"), "--out", str(tmp_path / "out"), "--mpiexec",
            str(mpiexec), *extra]  # fmt: skip
    if config is not None:
        (tmp_path / "bad.yaml").write_text(config)
        args += ["--config", str(tmp_path / "bad.yaml")]
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert not (tmp_path / "started").exists(), "mpiexec was started"
    assert not (tmp_path / "out").exists()
    assert "Traceback" not in err
    return rc, err


BAD_CONFIGS = [
    ("clock:\n  time_scale: 0.1\n cadence: 2\n", ["not valid YAML at line 3", "expected <block end>"]),
    ("archive:\n  keep_rafts: [1, 2\nworker: {}\n", ["not valid YAML at line 3"]),
    ("- clock\n- worker\n", ["a night configuration is a mapping", "list"]),
    ("clock: 5\n", ["clock must be a mapping", "int 5"]),
    ("archive: null\n", ["archive must be a mapping", "None"]),
    ("visits: 3\n", ["unknown key(s) visits"]),
    ("scheduler: {sample_every: 0}\n", ["scheduler: sample_every must be an integer ≥ 1, not 0"]),
    ("scheduler: {queue_limit: 2.5}\n", ["scheduler: queue_limit must be an integer ≥ 1, not 2.5"]),
    ("scheduler: {ccd_timeout_s: -1}\n", ["scheduler: ccd_timeout_s must be a number > 0, not -1"]),
    ("scheduler: {link_back_s: [3, 1]}\n", ["scheduler: link_back_s must be [LOW, HIGH]", "not [3, 1]"]),
    ("scheduler: {link_back_s: 2}\n", ["scheduler: link_back_s must be [LOW, HIGH]", "not 2"]),
    ("scheduler: {reprocess: 1}\n", ["scheduler: reprocess must be one of true, false, not 1"]),
    ("calibration_mode: bogus\n", ["calibration_mode must be one of calibration, engineering", "not 'bogus'"]),
    ("worker: {calibs: bogus}\n", ["worker: calibs must be one of auto, db, truth", "not 'bogus'"]),
    ("worker: {fetch_timeout_s: .nan}\n", ["worker: fetch_timeout_s must be a number of seconds > 0, not nan"]),
    ("worker: {level1: 'no'}\n", ["worker: level1 must be true or false, not 'no'"]),
    ("worker: {keep_memory: 1}\n", ["worker: keep_memory must be true or false, not 1"]),
    ("archive: {heartbeat_s: 0}\n", ["archive: heartbeat_s must be a number of seconds > 0, not 0"]),
    ("archive: {keep_rafts: 0}\n", ["archive: keep_rafts must be an integer ≥ 1, not 0"]),
    ("archive: {compress: 'yes'}\n", ["archive: compress must be true or false, not 'yes'"]),
    ("layout: {worker_strings: 0}\n", ["layout: worker_strings must be an integer ≥ 1, not 0"]),
    ("layout: {colour: red}\n", ["unknown layout setting(s) colour; settings are catchup_pairs"]),
    ("max_visits: 0\n", ["max_visits must be an integer ≥ 1 or null, not 0"]),
    ("calibration_exposures: -1\n", ["calibration_exposures must be an integer ≥ 0, not -1"]),
    ("clock: {time_scale: 0}\n", ["clock.time_scale must be a number > 0, not 0"]),
    ("clock: {cadence: -3}\n", ["clock.cadence must be a number > 0 or null, not -3"]),
    ("alerts: {batch_size: 0}\n", ["alerts.batch_size must be an integer ≥ 1, not 0"]),
    ("daytime: maybe\n", ["daytime must be one of true, false, not 'maybe'"]),
]  # fmt: skip


@pytest.mark.parametrize("text,words", BAD_CONFIGS, ids=[t.split(":")[0].strip("- \n") for t, _ in BAD_CONFIGS])
def test_a_bad_configuration_is_rejected_before_mpiexec_starts(tmp_path, capsys, mpiexec, text, words):
    rc, err = _launch(tmp_path, capsys, mpiexec, config=text)
    assert rc == 2
    assert err.startswith(f"lsstpipe night: error: --config {tmp_path / 'bad.yaml'}: "), err
    for word in words:
        assert word in err, (word, err)


SECTIONS = {"archive": ArchiveSettings, "worker": WorkerSettings, "scheduler": SchedulerSettings,
            "layout": LayoutConfig}  # fmt: skip


@pytest.mark.parametrize("section,name", [(s, f.name) for s, cls in SECTIONS.items() for f in fields(cls)])
def test_every_setting_of_every_section_is_checked(section, name):
    """A value of the wrong type is rejected for each field of each settings dataclass (one validator)."""
    config = N.load_config(None)
    config[section] = {**config[section], name: "wrong"}
    with pytest.raises(N.NightError, match=rf"^the embedded configuration: {section}: {name} .*'wrong'"):
        N.validate_config(config, "the embedded configuration")


@pytest.mark.parametrize("key", ["max_visits", "calibration_exposures", "calibration_mode", "daytime",
                                 "clock.time_scale", "clock.cadence", "alerts.batch_size"])  # fmt: skip
def test_every_top_level_setting_is_checked(key):
    config = N.load_config(None)
    where, _, name = key.rpartition(".")
    (config[where] if where else config)[name] = [1]
    with pytest.raises(N.NightError, match=rf"^X: {key} must be .*, not \[1\]$"):
        N.validate_config(config, "X")


def test_a_valid_configuration_builds_every_settings_dataclass(tmp_path):
    path = tmp_path / "night.yaml"
    path.write_text("max_visits: 2\nclock: {cadence: 3}\nlayout: {spare_workers: 1, local_only: [0]}\n"
                    "archive: {keep_rafts: 5}\nworker: {calibs: truth}\nscheduler: {sample_every: 2, "
                    "link_back_s: [0.5, 1]}\nalerts: {batch_size: 7}\ndaytime: false\n")  # fmt: skip
    cfg = N.read_config(path)
    assert (cfg.max_visits, cfg.cadence, cfg.time_scale, cfg.alert_batch_size, cfg.daytime) == (2, 3, 0.1, 7, False)
    assert cfg.layout == LayoutConfig(spare_workers=1, local_only=(0,))
    assert cfg.archive.keep_rafts == 5 and cfg.archive.heartbeat_s == 0.25
    assert cfg.worker.calibs == "truth" and not cfg.needs_masters
    assert cfg.scheduler.sample_every == 2 and cfg.scheduler.link_back_s == (0.5, 1)
    assert N.read_config(None).worker.calibs == "auto" and N.read_config(None).needs_masters
    # the layout's own mapping validator is the same one
    with pytest.raises(LayoutError, match="unknown layout setting"):
        LayoutConfig.from_mapping({"colour": "red"})
    with pytest.raises(LayoutError, match="layout must be a mapping"):
        LayoutConfig.from_mapping([1])


@pytest.mark.parametrize("value", ["-1", "0", "two"])
def test_max_visits_below_one_is_rejected(tmp_path, capsys, mpiexec, value):
    with pytest.raises(SystemExit) as exit_:
        _launch(tmp_path, capsys, mpiexec, f"--max-visits={value}")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    shown = value if value.lstrip("-").isdigit() else repr(value)
    assert f"argument --max-visits: must be a whole number of visits ≥ 1 (leave it out to play every visit), " \
           f"not {shown}" in err  # fmt: skip
    assert not (tmp_path / "started").exists()
    with pytest.raises(SystemExit):  # the ranks' own command line too
        N.parse_args(["--repo", "R", "--out", "O", f"--max-visits={value}"])


def test_launcher_checks_the_command_line_and_passes_max_visits_on(tmp_path, capsys, mpiexec):
    args = SimpleNamespace(ranks=2, repo=str(tmp_path / "repo"), out=str(tmp_path / "out"), config=None, inject=[],
                           max_visits=0, quiet=True, mpiexec=str(mpiexec), exit_grace=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="--max-visits must be a whole number of visits ≥ 1 .*not 0"):
        night_cli.run(args)
    rc, err = _launch(tmp_path, capsys, mpiexec, "--inject", "explode@1")
    assert rc == 2 and "--inject 'explode@1': unknown fault 'explode'" in err
    args.max_visits = 1  # the launch itself: its fake mpiexec writes no manifest
    assert night_cli.run(args) == 1
    started = (tmp_path / "started").read_text().splitlines()
    assert started[0] == "--version" and "--max-visits 1" in started[1]


class _Ranks:
    """Two ranks that see the same repository and configuration, as rank 0 sees them (no MPI)."""

    def Get_rank(self) -> int:  # noqa: N802 — mpi4py's names
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 2

    def allgather(self, value):
        return [value, value]


@pytest.fixture
def no_roles(monkeypatch):
    """The night's roles and the Calibration Products Production, recorded instead of run."""
    import lsstpipe.calib.cpp as cpp

    calls: dict[str, tuple] = {}
    monkeypatch.setattr(loop, "run_rank", lambda *a: calls.setdefault("run_rank", a) and 0)
    monkeypatch.setattr(cpp, "run_cpp", lambda *a: calls.setdefault("run_cpp", a) and {"ok": True})
    return calls


def _rank(repo: Path, tmp_path, capsys, *extra: str, config: str | None = None) -> tuple[int, str]:
    argv = ["--repo", str(repo), "--out", str(tmp_path / "out"), "--quiet", *extra]
    if config is not None:
        (tmp_path / "night.yaml").write_text(config)
        argv += ["--config", str(tmp_path / "night.yaml")]
    rc = N.main(argv, comm=_Ranks())
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.mark.parametrize("calibs", ["auto", "db"])
def test_a_repository_without_calibration_exposures_needs_truth_calibs(repo, tmp_path, capsys, no_roles, calibs):
    rc, err = _rank(repo, tmp_path, capsys, config=f"worker: {{calibs: {calibs}}}\n")
    assert rc == 2 and not no_roles and not (tmp_path / "out").exists()
    assert err.startswith(f"night: error: --repo {repo} has no certified master calibrations"), err
    assert f"worker.calibs: {calibs} needs" in err and "--calibs" in err and "set worker.calibs: truth" in err


def test_truth_calibs_need_no_calibration_production(repo, tmp_path, capsys, no_roles):
    rc, _ = _rank(repo, tmp_path, capsys, config="worker: {calibs: truth}\n")
    assert rc == 0 and "run_cpp" not in no_roles
    _, args, config, _, plan, layout, _ = no_roles.pop("run_rank")
    assert config.worker.calibs == "truth" and len(plan.visits) == 2 and layout.size == 2
    _rank(repo, tmp_path, capsys, "--max-visits", "1", config="worker: {calibs: truth}\nmax_visits: 2\n")
    assert len(no_roles.pop("run_rank")[4].visits) == 1  # the command line over the configuration
    _rank(repo, tmp_path, capsys, config="worker: {calibs: truth}\nmax_visits: 1\n")
    assert len(no_roles.pop("run_rank")[4].visits) == 1


def test_truth_calibs_need_the_instrument_truth(repo, tmp_path, capsys, no_roles):
    truth = repo / "truth" / "instrument" / f"{DETECTOR}.fits"
    hidden = truth.with_suffix(".hidden")
    truth.rename(hidden)
    try:
        rc, err = _rank(repo, tmp_path, capsys, config="worker: {calibs: truth}\n")
    finally:
        hidden.rename(truth)
    assert rc == 2 and not no_roles
    assert f"worker.calibs: truth needs the simulator's instrument truth, which --repo {repo} lacks" in err


def test_the_ranks_check_the_configuration_again(repo, tmp_path, capsys, no_roles):
    rc, err = _rank(repo, tmp_path, capsys, config="worker: {calibs: truth}\nscheduler: {sample_every: 0}\n")
    assert rc == 2 and not no_roles
    assert err == f"night: error: --config {tmp_path / 'night.yaml'}: scheduler: sample_every must be an integer " \
                  "≥ 1, not 0\n"  # fmt: skip
    rc, err = _rank(tmp_path / "nowhere", tmp_path, capsys)
    assert rc == 2 and "is not a data repository" in err and not no_roles


def _night(repo: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lsstpipe", "night", "-n", "2", "--repo", str(repo), "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_under_mpi_a_night_without_masters_stops_with_one_message(repo, tmp_path, capsys, no_roles):
    """The code review's case: every rank printed a traceback of the Calibration Products Production, then
    MPI_Abort (and MPICH an abort line per rank). Then a repository with too few calibration exposures for
    masters: the production runs (on both ranks), fails, and the night says so instead of failing every CCD;
    a second night says it too."""
    run = _night(repo, tmp_path / "out", "--max-visits", "1")
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and run.stderr.count("night: error:") == 1
    assert "no bias, dark or flat exposures" in run.stderr and not (tmp_path / "out").exists()
    few = tmp_path / "few"  # one bias exposure, without its raw: no master can be made from it
    shutil.copytree(repo, few)
    from lsstpipe.repo import Repository

    science = Repository(few).exposures("OBJECT")[0]
    Repository(few).register_exposure({**science, "obsid": "MC_C_20230930_000099", "seq_num": 99, "visit": None,
                                       "snap": None, "imgtype": "BIAS", "band": "NONE", "exptime": 0.0})  # fmt: skip
    (tmp_path / "night.yaml").write_text("calibration_exposures: 0\n")
    run = _night(few, tmp_path / "out", "--config", str(tmp_path / "night.yaml"))
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and run.stderr.count("night: error:") == 1
    assert f"night: error: the Calibration Products Production failed: no masters for {DETECTOR} (" in run.stderr
    assert "TooFewFrames" in run.stderr and not (tmp_path / "out").exists()
    assert "MPI_Abort" not in run.stderr  # every rank agreed on the error: they finalize and exit 2, no abort
    rc, err = _rank(few, tmp_path, capsys, config="calibration_exposures: 0\n")
    assert rc == 2 and "certifies no masters for the night's detectors" in err and not no_roles
