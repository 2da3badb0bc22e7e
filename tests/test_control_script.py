"""The OCS script player and the command-line tools: steps sent at their times without waiting for results,
the transcript format, ``ocs script``, ``ocs send``, ``dmcs lockout``."""

from __future__ import annotations

import json

import pytest
import yaml

from control_support import config_root, make_harness, write_config
from lsstpipe.control import Command, ConfigurationError, EntityName, OCSEvent
from lsstpipe.control.cli_control import main
from lsstpipe.control.script import TRANSCRIPT_FIELDS, CommandStep, EventStep, comparable, parse_script, play

A, APC = EntityName.ARCHIVER, EntityName.ALERT_PRODUCTION_CLUSTER
RESULTS = {"ACK", "COMPLETE", "FAILED", "ABORTED", "IGNORED"}


def check_transcript(rows):
    """Every row has the fields; per seq: ACK first then exactly one final result (or one FAILED alone)."""
    by_seq: dict[int, list[str]] = {}
    for row in rows:
        assert set(TRANSCRIPT_FIELDS) <= set(row), row
        assert row["result"] in RESULTS
        by_seq.setdefault(row["seq"], []).append(row["result"])
    for seq, results in by_seq.items():
        assert results[-1] != "ACK" and (results[0] == "ACK") == (len(results) == 2) and len(results) <= 2, (
            seq,
            results,
        )
    return by_seq


def test_parse_script_errors():
    good = [{"at": 0, "entity": "archiver", "command": "init"}]
    assert parse_script(good) == [CommandStep(0.0, A, Command.INIT)]
    assert parse_script([{"at": 1.5, "event": "nextVisit", "visit": 3}]) == [EventStep(1.5, OCSEvent.NEXT_VISIT, 3, 0)]
    for steps, words in [
        ({"at": 0}, "non-empty list"),
        ([], "non-empty list"),
        ([{"entity": "archiver", "command": "init"}], "step 1: missing key 'at'"),
        ([{"at": -1, "entity": "archiver", "command": "init"}], "step 1.at: expected a non-negative number"),
        ([{"at": 0, "entity": "archiver", "command": "init", "when": 3}], "step 1: unknown key 'when'"),
        ([{"at": 0, "entity": "archiver", "command": "configure"}], "configure needs 'config'"),
        ([{"at": 0, "entity": "archiver", "command": "init", "config": "science"}], "only for configure"),
        ([{"at": 0, "entity": "camera", "command": "init"}], "step 1.entity: 'camera' is not one of"),
        ([{"at": 0, "entity": "archiver", "command": "explode"}], "step 1.command"),
        ([{"at": 0, "event": "sunrise"}], "step 1.event: 'sunrise'"),
        ([{"at": 0, "event": "nextVisit", "visit": "x"}], "step 1.visit"),
        ([{"at": 0, "event": "nextVisit", "entity": "archiver"}], "unknown key 'entity'"),
        ([{"at": 0, "command": "init"}], "missing key 'entity'"),
    ]:
        with pytest.raises(ConfigurationError, match=None) as info:
            parse_script(steps)
        assert words in str(info.value), (steps, str(info.value))


@pytest.fixture
def harness(tmp_path):
    root = config_root(tmp_path)
    write_config(root, A, "third", install_seconds=0.3)
    h = make_harness(tmp_path, root=root)
    yield h
    h.close()


def test_steps_are_sent_at_their_times_without_waiting(harness):
    steps = parse_script([
        {"at": 0.0, "entity": "archiver", "command": "init"},
        {"at": 0.05, "entity": "archiver", "command": "configure", "config": "third"},
        {"at": 0.10, "entity": "alert_production_cluster", "command": "init"},
        {"at": 0.15, "entity": "archiver", "command": "enable"},
        {"at": 0.50, "entity": "archiver", "command": "enable"},
        {"at": 0.55, "event": "startIntegration", "visit": 1},
    ])  # fmt: skip
    rows = play(steps, harness.client)
    by_seq = check_transcript(rows)
    assert by_seq == {1: ["ACK", "COMPLETE"], 2: ["ACK", "COMPLETE"], 3: ["ACK", "COMPLETE"],
                      4: ["ACK", "FAILED"], 5: ["ACK", "COMPLETE"]}  # fmt: skip
    t = {(r["seq"], r["result"]): r["t"] for r in rows}
    for r in rows:
        assert r["t"] >= r["at"] - 1e-3, r  # no step before its time
    # no step waits for an earlier one's completion: the APC init went out while the archiver was configuring
    assert t[(3, "ACK")] < t[(2, "COMPLETE")]
    assert t[(2, "COMPLETE")] - t[(2, "ACK")] >= 0.3
    busy = [r for r in rows if r["seq"] == 4][-1]
    assert "busy" in busy["reason"] and busy["state"] == "IDLE" and busy["configuration"] is None
    final = [r for r in rows if r["seq"] == 5][-1]
    assert (final["state"], final["configuration"], final["enabled"]) == ("IDLE", "third", True)
    harness.settle()
    assert [j["n_jobs"] for j in harness.recorder.of_kind("jobs")] == [22]


def test_transcript_lines_of_a_rejected_message(harness):
    rows = play(parse_script([{"at": 0, "entity": "archiver", "command": "configure", "config": "bad name"}]),
                harness.client)  # fmt: skip
    assert len(rows) == 1 and rows[0]["result"] == "FAILED" and "bad name" in rows[0]["reason"]
    check_transcript(rows)


def test_cli_ocs_script_writes_the_transcript(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LSSTPIPE_STATE_DIR", str(tmp_path / "state"))
    write_config(tmp_path / "mine", A, "quick", install_seconds=0.02)
    script = tmp_path / "night.yaml"
    script.write_text(yaml.safe_dump([
        {"at": 0.0, "entity": "archiver", "command": "init"},
        {"at": 0.01, "entity": "archiver", "command": "configure", "config": "mine/archiver/quick.yaml"},
        {"at": 0.1, "entity": "archiver", "command": "enable"},
        {"at": 0.1, "entity": "efd_replicator", "command": "stop"},
        {"at": 0.12, "event": "startIntegration", "visit": 1},
    ]))  # fmt: skip
    out = tmp_path / "t" / "out.jsonl"
    assert main(["ocs", "script", str(script), "--transcript", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert check_transcript(rows) == {1: ["ACK", "COMPLETE"], 2: ["ACK", "COMPLETE"], 3: ["ACK", "COMPLETE"],
                                      4: ["ACK", "IGNORED"]}  # fmt: skip
    assert rows[3]["arg"] == str(tmp_path / "mine/archiver/quick.yaml")
    assert "8 responses" in capsys.readouterr().out


def test_cli_lockout_and_send(tmp_path, capsys, monkeypatch):
    state = tmp_path / "state"
    monkeypatch.setenv("LSSTPIPE_STATE_DIR", str(state))
    assert main(["dmcs", "lockout", "status"]) == 0 and "not locked out" in capsys.readouterr().out
    assert main(["dmcs", "lockout", "on", "--reason", "kernel upgrade"]) == 0
    assert (state / "dmcs.lockout").exists()
    capsys.readouterr()
    assert main(["ocs", "send", "archiver", "init"]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["result"] for x in lines] == ["ACK", "FAILED"] and "kernel upgrade" in lines[1]["reason"]
    assert main(["dmcs", "lockout", "status", "--state-dir", str(tmp_path / "elsewhere")]) == 0
    assert "not locked out" in capsys.readouterr().out, "--state-dir wins over the environment"
    assert main(["dmcs", "lockout", "off"]) == 0
    capsys.readouterr()
    assert main(["ocs", "send", "archiver", "init"]) == 0
    assert [json.loads(x)["result"] for x in capsys.readouterr().out.splitlines()] == ["ACK", "COMPLETE"]
    assert main(["ocs", "send", "efd_replicator", "stop"]) == 0


def test_cli_send_with_secret_file(tmp_path, capsys):
    secret = tmp_path / "ocs.secret"
    assert main(["ocs", "secret", str(secret)]) == 0
    assert main(["ocs", "send", "archiver", "init", "--secret", str(secret), "--state-dir", str(tmp_path)]) == 0
    secret.chmod(0o644)
    assert main(["ocs", "send", "archiver", "init", "--secret", str(secret), "--state-dir", str(tmp_path)]) == 2
    assert "chmod 600" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["config"],
        ["config", "check"],
        ["config", "schema"],
        ["ocs"],
        ["ocs", "send"],
        ["ocs", "script"],
        ["ocs", "secret"],
        ["dmcs"],
        ["dmcs", "lockout"],
    ],  # fmt: skip
)
def test_help_on_every_control_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_script_file_errors_name_the_file(tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text("- {at: 0, entity: archiver, command: init, extra: 1}\n")
    argv = ["ocs", "script", str(p), "--transcript", str(tmp_path / "t.jsonl"), "--state-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "s.yaml: step 1: unknown key 'extra'" in capsys.readouterr().err
    assert not (tmp_path / "t.jsonl").exists(), "nothing played"


def test_same_script_twice_gives_the_same_transcript_but_for_times(tmp_path):
    steps = parse_script([
        {"at": 0.0, "entity": "efd_replicator", "command": "init"},
        {"at": 0.0, "entity": "efd_replicator", "command": "configure", "config": "slow"},
        {"at": 0.05, "entity": "efd_replicator", "command": "enable"},
        {"at": 0.1, "entity": "efd_replicator", "command": "stop"},
        {"at": 0.15, "entity": "efd_replicator", "command": "configure", "config": "fast"},
        {"at": 0.4, "entity": "efd_replicator", "command": "enable"},
        {"at": 0.45, "entity": "efd_replicator", "command": "abort"},
        {"at": 0.5, "entity": "efd_replicator", "command": "release"},
    ])  # fmt: skip
    runs = []
    for i in range(2):
        h = make_harness(tmp_path / str(i))
        try:
            runs.append(comparable(play(steps, h.client)))
        finally:
            h.close()
    assert runs[0] == runs[1]
    assert [x[2] for x in runs[0][2]] == ["ACK", "ABORTED"]
    assert [x[2] for x in runs[0][3]] == ["ACK", "FAILED"] and "busy" in runs[0][3][1][3]
    assert runs[0][6][-1][4:] == ("IDLE", "fast", True)
    assert runs[0][7][-1][4:] == ("ERROR", "fast", True), "abort: ERROR, still enabled"
    assert runs[0][8][-1][4:] == ("OFFLINE", "fast", False), "release: disabled, OFFLINE"


def test_state_dir_resolution(tmp_path, monkeypatch):
    from pathlib import Path

    from lsstpipe.control import resolve_state_dir

    assert resolve_state_dir("x", {"LSSTPIPE_STATE_DIR": "/env"}) == Path("x")
    assert str(resolve_state_dir(None, {"LSSTPIPE_STATE_DIR": "/env"})) == "/env"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_state_dir(None, {}) == tmp_path / ".lsstpipe"


# ---- exit status of ocs script, job counts of the cluster, the shutdown line of dmcs serve ---------------
def test_cli_ocs_script_fails_when_a_step_fails_and_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LSSTPIPE_STATE_DIR", str(tmp_path / "state"))
    script = tmp_path / "bad.yaml"
    script.write_text(yaml.safe_dump([
        {"at": 0.0, "entity": "archiver", "command": "init"},
        {"at": 0.01, "entity": "archiver", "command": "enable"},  # no configuration: FAILED
        {"at": 0.02, "entity": "efd_replicator", "command": "stop"},  # IGNORED: not a failure
        {"at": 0.03, "entity": "alert_production_cluster", "command": "reset"},  # OFFLINE: FAILED
    ]))  # fmt: skip
    out = tmp_path / "t.jsonl"
    assert main(["ocs", "script", str(script), "--transcript", str(out)]) == 1
    captured = capsys.readouterr()
    assert "4 steps played" in captured.out
    err = captured.err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("lsstpipe ocs script: step 2 (archiver enable at 0.01 s): FAILED: ")
    assert "no configuration" in err[0]
    assert err[1].startswith("lsstpipe ocs script: step 4 (alert_production_cluster reset at 0.03 s): FAILED: ")


def test_cli_ocs_script_fails_when_a_step_gets_no_final_result(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LSSTPIPE_STATE_DIR", str(tmp_path / "state"))
    write_config(tmp_path / "mine", A, "long", install_seconds=1.0)
    script = tmp_path / "s.yaml"
    script.write_text(yaml.safe_dump([
        {"at": 0.0, "entity": "archiver", "command": "init"},
        {"at": 0.0, "entity": "archiver", "command": "configure", "config": "mine/archiver/long.yaml"},
    ]))  # fmt: skip
    out = tmp_path / "t.jsonl"
    argv = ["ocs", "script", str(script), "--transcript", str(out), "--settle-timeout", "0.05"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no final result for command 2" in err
    assert f"step 2 (archiver configure {tmp_path / 'mine/archiver/long.yaml'} at 0 s): no final result" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["result"] for r in rows if r["seq"] == 2] == ["ACK"], "the transcript keeps what came back"


def test_failed_steps_of_a_transcript():
    from lsstpipe.control.cli_control import failed_steps

    steps = parse_script([
        {"at": 0.0, "entity": "archiver", "command": "init"},
        {"at": 0.0, "entity": "archiver", "command": "init"},
        {"at": 0.5, "event": "nextVisit", "visit": 1},
        {"at": 1.0, "entity": "archiver", "command": "stop"},
    ])  # fmt: skip

    def row(seq, result, command="init", at=0.0, reason=""):
        return {"seq": seq, "at": at, "entity": "archiver", "command": command, "arg": None, "result": result,
                "reason": reason}  # fmt: skip

    ok = [row(1, "ACK"), row(1, "COMPLETE"), row(2, "ACK"), row(2, "FAILED", reason="it is IDLE"),
          row(3, "ACK", "stop", 1.0), row(3, "IGNORED", "stop", 1.0)]  # fmt: skip
    assert failed_steps(steps, ok) == ["step 2 (archiver init at 0 s): FAILED: it is IDLE"]
    assert failed_steps(steps, ok[:4]) == ["step 2 (archiver init at 0 s): FAILED: it is IDLE",
                                           "step 4 (archiver stop at 1 s): no final result"]  # fmt: skip
    unrelated = {"seq": None, "at": None, "entity": None, "command": None, "arg": None, "result": "FAILED",
                 "reason": "a forged message"}  # fmt: skip
    assert failed_steps(steps, [*ok[:2], ok[4], ok[5], unrelated]) == ["step 2 (archiver init at 0 s): no final result"]


def test_jobs_per_event_come_from_the_cluster_camera(tmp_path):
    from lsstpipe.control import SimulatedCluster
    from lsstpipe.control.cluster import JobCounts

    assert JobCounts.of_camera("lsstcam") == JobCounts(21 + 1, 189 + 4)
    mini = JobCounts.of_camera("mini")
    assert mini == JobCounts(2 + 1, 18 + 1)
    h = make_harness(tmp_path, cluster=SimulatedCluster(jobs=mini))
    try:
        for entity in (A, APC):
            for command, arg in ((Command.INIT, None), (Command.CONFIGURE, "fast"), (Command.ENABLE, None)):
                h.ok(entity, command, arg)
        for event in OCSEvent:
            h.client.publish_event(event, visit=5)
        h.settle()
        jobs = {(r["entity"], r["n_jobs"]) for r in h.recorder.of_kind("jobs")}
        assert jobs == {(APC, 19), (A, 3)} and len(h.cluster.batches) == 2
        assert {(b.entity, b.n_jobs) for b in h.cluster.batches} == jobs
    finally:
        h.close()


def test_cluster_description_names_its_camera(tmp_path):
    from lsstpipe.control import SimulatedCluster
    from lsstpipe.control.cluster import JobCounts

    path = tmp_path / "cluster.yaml"
    path.write_text("camera: mini\n")
    assert SimulatedCluster.from_yaml(path).jobs == JobCounts(3, 19)
    path.write_text("workers: 10\n")
    assert SimulatedCluster.from_yaml(path).jobs == JobCounts(22, 193)
    path.write_text("camera: hsc\n")
    with pytest.raises(ConfigurationError, match="cluster.yaml: unknown camera 'hsc'; choose one of lsstcam, mini"):
        SimulatedCluster.from_yaml(path)
    with pytest.raises(ValueError, match="per_visit must be a non-negative int"):
        JobCounts(3, -1)


def test_dmcs_serve_stop_line_says_what_was_lost():
    from lsstpipe.control.cli_control import stopped_message

    line = stopped_message({"control database": 0, "Summit EFD": 0})
    assert line == "Base DMCS stopped; no record lost (0 in the control database, 0 in the Summit EFD)"
    line = stopped_message({"control database": 2, "Summit EFD": 0})
    assert line.startswith("Base DMCS stopped; records LOST: 2 in the control database, 0 in the Summit EFD")
