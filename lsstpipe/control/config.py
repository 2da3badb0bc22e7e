"""Named configurations of the commandable entities: typed, documented, validated; unknown keys are errors.

A configuration is a YAML mapping in a file named after it; the shipped ones live in
``lsstpipe/configs/{entity}/{name}.yaml`` (``science``, ``calibration``, ``engineering``, ``daytime``
where the mode applies to the entity). A ``configure`` argument is either such a name or the path of a
YAML file (anything containing ``/`` or ending in ``.yaml``/``.yml``).

Every field is a dataclass field with a type, a default where one makes sense, and a ``doc``;
:func:`schema_text` prints them (``lsstpipe config schema ENTITY``). Validation is strict: unknown keys,
wrong types (``true`` is not an integer, ``"3"`` is not a number) and out-of-range values are errors whose
message names the key. :func:`check_consistency` adds the rules between fields (an entity only takes the
modes that apply to it; alerts need difference imaging; …).
"""

from __future__ import annotations

import dataclasses
import enum
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lsstpipe.control.errors import ConfigurationError
from lsstpipe.control.states import EntityName, Mode

#: Modes that apply to each entity (LDM-230 §2.1.2: in daytime operations the Archiver is disabled or offline).
SUPPORTED_MODES: dict[EntityName, frozenset[Mode]] = {
    EntityName.ARCHIVER: frozenset({Mode.SCIENCE, Mode.CALIBRATION, Mode.ENGINEERING}),
    EntityName.CATCHUP_ARCHIVER: frozenset({Mode.SCIENCE, Mode.DAYTIME}),
    EntityName.EFD_REPLICATOR: frozenset({Mode.SCIENCE, Mode.DAYTIME}),
    EntityName.ALERT_PRODUCTION_CLUSTER: frozenset(Mode),
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _f(doc: str, default: Any = dataclasses.MISSING, minimum: float | None = None, **kw: Any) -> Any:
    meta = {"doc": doc, "min": minimum}
    if default is dataclasses.MISSING:
        return field(metadata=meta, **kw)
    if isinstance(default, (list, dict)):
        raise TypeError("use default_factory for mutable defaults")
    return field(default=default, metadata=meta, **kw)


class Pool(enum.Enum):
    """Pools of replicator/distributor pairs (LDM-230 §2.3.1)."""

    FULLY_OPERATIONAL = "fully_operational"
    """Pairs with a working link to the US DAC: preferred for real-time archiving."""

    LOCAL_ONLY = "local_only"
    """Pairs that can only store locally at the Base: the fallback pool."""

    CATCHUP = "catchup"
    """Pairs dedicated to the Catch-Up Archiver."""


@dataclass(frozen=True, kw_only=True)
class CommonSettings:
    """Fields every configuration has."""

    entity: EntityName = _f("the commandable entity this configuration is for")
    mode: Mode = _f("the operating mode this configuration implements (science, calibration, engineering, daytime)")
    software_version: str = _f("software version to run; must be installed on the machines and pass its checksum")
    install_seconds: float = _f(
        "time the installation takes on the cluster (seconds); stop/abort can interrupt it", 0.2, minimum=0.0
    )
    description: str = _f("free text shown by 'lsstpipe config check'", "")


@dataclass(frozen=True, kw_only=True)
class ArchiverSettings(CommonSettings):
    """The Archiver: replicator jobs on replicator/distributor pairs, one per raft plus one for the wavefront sensors."""

    replicator_pairs: int = _f("replicator/distributor pairs to use (one job per science raft, 21, plus 1)", 22, 1)
    pools: tuple[Pool, ...] = _f(
        "pools to take pairs from, preferred first", (Pool.FULLY_OPERATIONAL, Pool.LOCAL_ONLY), None
    )
    compress: bool = _f("compress images (zlib level 1) before sending them to the distributors: only for a link "
                        "slower than ~240 Mb/s (the CDS files are compressed already)", False)  # fmt: skip
    max_retries: int = _f("retries of a failed image transfer before it is left to the Catch-Up Archiver", 3, 0)


@dataclass(frozen=True, kw_only=True)
class CatchupSettings(CommonSettings):
    """The Catch-Up Archiver: scans for unarchived images and archives them on dedicated pairs."""

    catchup_pairs: int = _f("catch-up replicator/distributor pairs to use", 4, 1)
    scan_interval_seconds: float = _f("seconds between two scans for unarchived images", 60.0, 0.001)
    max_concurrent_jobs: int = _f("most image archive jobs the Orchestration Manager runs at once", 8, 1)


@dataclass(frozen=True, kw_only=True)
class EFDReplicatorSettings(CommonSettings):
    """The EFD Replicator: the US DAC replica follows the Chilean DAC replica while enabled."""

    us_replica: str = _f("name of the US DAC EFD replica in the cluster description", "us_dac")
    connect_timeout_seconds: float = _f("how long the reachability check waits for the US replica", 2.0, 0.001)


@dataclass(frozen=True, kw_only=True)
class PipelineParameters:
    """Parameters of the Alert Production pipelines."""

    isr: bool = _f("run instrument signature removal", True)
    difference_imaging: bool = _f("subtract templates and detect DIA sources", True)
    detection_threshold_sigma: float = _f("DIA source detection threshold (sigma)", 5.0, 0.0)
    alerts: bool = _f("issue alerts (needs difference_imaging; science mode only)", True)
    orbit_fitting: bool = _f("fit solar system object orbits (daytime mode only)", False)


@dataclass(frozen=True, kw_only=True)
class AlertProductionSettings(CommonSettings):
    """The Alert Production Cluster: one worker job per CCD (189) plus 4 wavefront sensors per visit."""

    workers: int = _f("worker machines to use", 193, 1)
    pipeline: PipelineParameters = _f("pipeline parameters", default_factory=PipelineParameters)


Settings = ArchiverSettings | CatchupSettings | EFDReplicatorSettings | AlertProductionSettings

SETTINGS_CLASS: dict[EntityName, type[CommonSettings]] = {
    EntityName.ARCHIVER: ArchiverSettings,
    EntityName.CATCHUP_ARCHIVER: CatchupSettings,
    EntityName.EFD_REPLICATOR: EFDReplicatorSettings,
    EntityName.ALERT_PRODUCTION_CLUSTER: AlertProductionSettings,
}


@dataclass(frozen=True)
class Configuration:
    """A validated configuration and where it came from."""

    name: str
    """The configuration's name: the file name without ``.yaml``."""
    path: Path
    settings: Settings

    @property
    def entity(self) -> EntityName:
        return self.settings.entity

    @property
    def mode(self) -> Mode:
        return self.settings.mode


def _where(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _convert(value: Any, tp: Any, key: str, minimum: float | None) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return validate_mapping(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        if value not in allowed:
            raise ConfigurationError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return tp(value)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigurationError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        items = tuple(_convert(v, item_tp, f"{key}[{i}]", minimum) for i, v in enumerate(value))
        if len(set(items)) != len(items):
            raise ConfigurationError(f"{key}: duplicate entries in {value!r}")
        return items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigurationError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigurationError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        if key.endswith("version") and not value.strip():
            raise ConfigurationError(f"{key}: must not be empty")
        return value
    if tp in (int, float):
        ok = isinstance(value, int) if tp is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            raise ConfigurationError(f"{key}: expected {'an integer' if tp is int else 'a number'}, got "
                                     f"{type(value).__name__} {value!r}")  # fmt: skip
        if minimum is not None and value < minimum:
            raise ConfigurationError(f"{key}: must be at least {minimum}, got {value!r}")
        return tp(value)
    raise TypeError(f"unsupported field type {tp!r} for {key}")  # a schema bug, not a user error


def validate_mapping(cls: type, data: Any, prefix: str = "") -> Any:
    """An instance of dataclass ``cls`` from a YAML mapping, strictly validated (see the module docstring)."""
    where = prefix or "the configuration"
    if not isinstance(data, dict):
        raise ConfigurationError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigurationError(
            f"unknown key {_where(prefix, unknown[0])!r}"
            + (f" (and {', '.join(unknown[1:])})" if unknown[1:] else "")
            + f"; the keys of {where} are {', '.join(fields)} (see 'lsstpipe config schema')"
        )
    kwargs = {}
    for name, f in fields.items():
        key = _where(prefix, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigurationError(f"missing required key {key!r}: {f.metadata['doc']}")
            continue
        kwargs[name] = _convert(data[name], hints[name], key, f.metadata.get("min"))
    return cls(**kwargs)


def parse_configuration(data: Any, name: str, path: Path) -> Configuration:
    """Validate a parsed YAML mapping and return the :class:`Configuration` (consistency checked too).

    Raises
    ------
    ConfigurationError
        Unknown or missing keys, wrong types, values out of range, inconsistent fields.
    """
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    entity_value = data.get("entity")
    try:
        entity = EntityName(entity_value)
    except ValueError:
        raise ConfigurationError(
            f"{path}: key 'entity' must be one of {', '.join(e.value for e in EntityName)}, got {entity_value!r}"
        ) from None
    try:
        settings = validate_mapping(SETTINGS_CLASS[entity], data)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{path}: {exc}") from None
    config = Configuration(name=name, path=path, settings=settings)
    check_consistency(config)
    return config


def check_consistency(config: Configuration) -> None:
    """The rules between fields. Raises :class:`ConfigurationError` naming the keys involved."""
    s = config.settings
    where = f"{config.path}"
    if s.mode not in SUPPORTED_MODES[s.entity]:
        modes = ", ".join(sorted(m.value for m in SUPPORTED_MODES[s.entity]))
        raise ConfigurationError(
            f"{where}: mode {s.mode.value!r} does not apply to the {s.entity.value}; use one of {modes}"
        )
    if isinstance(s, ArchiverSettings) and (not s.pools or Pool.CATCHUP in s.pools):
        raise ConfigurationError(f"{where}: pools must list fully_operational and/or local_only (catchup pairs "
                                 f"belong to the Catch-Up Archiver), got {[p.value for p in s.pools]}")  # fmt: skip
    if isinstance(s, AlertProductionSettings):
        p = s.pipeline
        if not p.detection_threshold_sigma > 0:
            raise ConfigurationError(f"{where}: pipeline.detection_threshold_sigma must be > 0 (σ), got "
                                     f"{p.detection_threshold_sigma}")  # fmt: skip
        if p.difference_imaging and not p.isr:
            raise ConfigurationError(f"{where}: pipeline.difference_imaging needs pipeline.isr: true")
        if p.alerts and not p.difference_imaging:
            raise ConfigurationError(f"{where}: pipeline.alerts needs pipeline.difference_imaging: true")
        if p.alerts and s.mode is not Mode.SCIENCE:
            raise ConfigurationError(f"{where}: pipeline.alerts is for science mode only (mode is {s.mode.value}); "
                                     "set pipeline.alerts: false")  # fmt: skip
        if p.orbit_fitting and s.mode is not Mode.DAYTIME:
            raise ConfigurationError(
                f"{where}: pipeline.orbit_fitting is for daytime mode only (mode is {s.mode.value})"
            )


def shipped_root() -> Path:
    """The folder of the shipped configurations, ``lsstpipe/configs``."""
    return Path(str(resources.files("lsstpipe") / "configs"))


def is_path_argument(arg: str) -> bool:
    """True when a configure argument names a file rather than a shipped configuration."""
    return "/" in arg or arg.endswith((".yaml", ".yml"))


def check_argument_format(arg: str | None) -> str:
    """The synchronous format check of a configure argument, before it is acknowledged."""
    if arg is None or not isinstance(arg, str) or not arg.strip():
        raise ConfigurationError("configure needs a configuration: a name such as 'science' or a path to a YAML file")
    if not is_path_argument(arg) and not _NAME_RE.match(arg):
        raise ConfigurationError(f"configuration name {arg!r} has characters other than letters, digits, '_', '-', '.'")
    return arg


def load_configuration(arg: str, entity: EntityName | None = None, root: Path | None = None) -> Configuration:
    """Load and validate a configuration by name (for ``entity``, under ``root``) or by path.

    Raises
    ------
    ConfigurationError
        The file is missing or unreadable, invalid, or for another entity than ``entity``.
    """
    check_argument_format(arg)
    if is_path_argument(arg):
        path = Path(arg).expanduser()
    else:
        if entity is None:
            raise ConfigurationError(f"a configuration name ({arg!r}) needs an entity; give a path instead")
        path = (root or shipped_root()) / entity.value / f"{arg}.yaml"
    if not path.is_file():
        hint = ""
        if entity is not None and not is_path_argument(arg):
            names = sorted(p.stem for p in path.parent.glob("*.yaml"))
            hint = f"; the {entity.value} has {', '.join(names) or 'no configurations'}"
        raise ConfigurationError(f"no configuration file {path}{hint}")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"{path}: cannot be read as YAML: {exc}") from None
    config = parse_configuration(data, name=path.stem, path=path)
    if entity is not None and config.entity is not entity:
        raise ConfigurationError(f"{path} is a configuration of the {config.entity.value}, not of the {entity.value}")
    return config


def schema_text(entity: EntityName) -> str:
    """Every field of ``entity``'s configurations with its type, default and documentation."""

    def tname(tp: Any) -> str:
        if typing.get_origin(tp) is tuple:
            return f"list of {tname(typing.get_args(tp)[0])}"
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return "one of " + "|".join(str(m.value) for m in tp)
        return getattr(tp, "__name__", str(tp))

    def lines(cls: type, prefix: str) -> list[str]:
        out = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                out.append(f"{prefix}{f.name}:  {f.metadata['doc']}")
                out += lines(tp, prefix + "  ")
                continue
            if f.default is dataclasses.MISSING:
                default = "required"
            else:
                d = f.default
                d = [x.value for x in d] if isinstance(d, tuple) else d.value if isinstance(d, enum.Enum) else d
                default = f"default {d!r}"
            out.append(f"{prefix}{f.name} ({tname(tp)}, {default}): {f.metadata['doc']}")
        return out

    return "\n".join(lines(SETTINGS_CLASS[entity], ""))


__all__ = [
    "AlertProductionSettings", "ArchiverSettings", "CatchupSettings", "CommonSettings", "Configuration",
    "EFDReplicatorSettings", "PipelineParameters", "Pool", "SETTINGS_CLASS", "SUPPORTED_MODES", "Settings",
    "check_argument_format", "check_consistency", "load_configuration", "parse_configuration", "schema_text",
    "shipped_root", "validate_mapping",
]  # fmt: skip
