"""Named configurations: the shipped set validates; unknown keys and wrong types are errors naming the key;
``lsstpipe config check`` and ``config schema``."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lsstpipe.control import ConfigurationError, EntityName, Mode, load_configuration
from lsstpipe.control.cli_control import main
from lsstpipe.control.config import SETTINGS_CLASS, SUPPORTED_MODES, schema_text, shipped_root

SHIPPED = sorted(shipped_root().glob("*/*.yaml"))


def test_shipped_set():
    names = {(p.parent.name, p.stem) for p in SHIPPED}
    assert names == {(e.value, m.value) for e in EntityName for m in SUPPORTED_MODES[e]}
    assert ("archiver", "science") in names and ("alert_production_cluster", "science") in names
    assert {m for e, m in names if e == "alert_production_cluster"} == {m.value for m in Mode}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_configurations_validate(path):
    cfg = load_configuration(path.stem, EntityName(path.parent.name))
    assert cfg.entity.value == path.parent.name and cfg.mode.value == path.stem
    assert cfg.settings.software_version == "w.2026.48" and 0 < cfg.settings.install_seconds < 1
    assert load_configuration(str(path)).settings == cfg.settings


def write(tmp_path, **changes):
    data = yaml.safe_load((shipped_root() / "alert_production_cluster" / "science.yaml").read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            data[outer][inner] = value
        else:
            data[key] = value
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"worker": 3}, "unknown key 'worker'"),
        ({"pipeline.alert": True}, "unknown key 'pipeline.alert'"),
        ({"workers": "193"}, "workers: expected an integer, got str"),
        ({"workers": True}, "workers: expected an integer, got bool"),
        ({"workers": 0}, "workers: must be at least 1"),
        ({"install_seconds": "fast"}, "install_seconds: expected a number"),
        ({"install_seconds": -1}, "install_seconds: must be at least 0"),
        ({"pipeline.isr": "yes"}, "pipeline.isr: expected true or false"),
        ({"pipeline.detection_threshold_sigma": [5]}, "pipeline.detection_threshold_sigma: expected a number"),
        ({"pipeline": 3}, "pipeline: expected a mapping"),
        ({"mode": "night"}, "mode: 'night' is not one of"),
        ({"entity": "camera"}, "key 'entity' must be one of"),
        ({"software_version": 48}, "software_version: expected a string"),
        ({"software_version": " "}, "software_version: must not be empty"),
        ({"pipeline.difference_imaging": False}, "pipeline.alerts needs pipeline.difference_imaging"),
        ({"pipeline.orbit_fitting": True}, "orbit_fitting is for daytime mode only"),
    ],
)
def test_invalid_configurations_name_the_key(tmp_path, changes, words):
    p = write(tmp_path, **changes)
    with pytest.raises(ConfigurationError) as info:
        load_configuration(str(p))
    assert words in str(info.value) and str(p) in str(info.value)


def test_archiver_pools_and_missing_keys(tmp_path):
    data = yaml.safe_load((shipped_root() / "archiver" / "science.yaml").read_text())
    for pools, words in [(["catchup"], "belong to the Catch-Up Archiver"), (["tape"], "pools[0]: 'tape'"),
                         (["local_only", "local_only"], "duplicate"), ("local_only", "expected a list")]:  # fmt: skip
        (tmp_path / "a.yaml").write_text(yaml.safe_dump({**data, "pools": pools}))
        with pytest.raises(ConfigurationError, match=None) as info:
            load_configuration(str(tmp_path / "a.yaml"))
        assert words in str(info.value)
    del data["mode"]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigurationError, match="missing required key 'mode'"):
        load_configuration(str(tmp_path / "a.yaml"))
    for text, words in [("- a\n- b\n", "expected a mapping"), ("a: [\n", "cannot be read as YAML")]:
        (tmp_path / "a.yaml").write_text(text)
        with pytest.raises(ConfigurationError, match=words):
            load_configuration(str(tmp_path / "a.yaml"))


def test_defaults_fill_optional_fields(tmp_path):
    p = tmp_path / "min.yaml"
    p.write_text("entity: alert_production_cluster\nmode: science\nsoftware_version: w.2026.48\n")
    s = load_configuration(str(p)).settings
    assert (s.workers, s.install_seconds, s.pipeline.alerts, s.description) == (193, 0.2, True, "")


def test_every_field_is_documented():
    for entity, cls in SETTINGS_CLASS.items():
        text = schema_text(entity)
        for f in dataclasses.fields(cls):
            assert f.metadata["doc"]
            assert f"{f.name} (" in text or f"{f.name}:" in text


def test_by_name_lists_what_exists():
    with pytest.raises(ConfigurationError, match="the archiver has calibration, engineering, science"):
        load_configuration("daytime", EntityName.ARCHIVER)
    with pytest.raises(ConfigurationError, match="not of the archiver"):
        load_configuration(str(shipped_root() / "efd_replicator" / "science.yaml"), EntityName.ARCHIVER)


def test_cli_config_check(tmp_path, capsys):
    assert main(["config", "check", *map(str, SHIPPED)]) == 0
    assert capsys.readouterr().out.count("OK ") == len(SHIPPED)
    bad = write(tmp_path, pipline={"isr": True})
    assert main(["config", "check", str(SHIPPED[0]), str(bad)]) == 1
    captured = capsys.readouterr()
    assert "unknown key 'pipline'" in captured.err and captured.out.count("OK ") == 1
    assert main(["config", "schema", "archiver"]) == 0
    assert "replicator_pairs (int, default 22)" in capsys.readouterr().out
