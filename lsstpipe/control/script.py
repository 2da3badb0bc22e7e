"""The OCS script player: timed steps against a DMCS, and the transcript of what came back.

A script is a YAML list of steps, each either a command or an event::

    - {at: 0.0, entity: archiver, command: init}
    - {at: 0.1, entity: archiver, command: configure, config: science}
    - {at: 0.2, entity: archiver, command: enable}        # sent at 0.2 s even if the configure still runs
    - {at: 1.0, event: startIntegration, visit: 1, exposure: 0}

``at`` is seconds from the start; steps are sent at their times without waiting for earlier results
(a step whose time has passed is sent at once, in script order). ``config`` is a configuration name or
a path (relative paths are relative to the script's folder). Unknown keys are errors.

The transcript is JSON lines, one per acknowledgement or final result as it arrives::

    {"t": 0.1012, "at": 0.1, "seq": 2, "entity": "archiver", "command": "configure", "arg": "science",
     "result": "ACK", "reason": "", "state": "IDLE", "configuration": null, "enabled": false}

``t`` is the arrival time in seconds from the start; ``state``, ``configuration`` and ``enabled`` are the
entity's after the response. A command that fails the format check (e.g. a configuration name with a
space) is not acknowledged: it has a single FAILED line. A command the DMCS could not decode at all has
a single FAILED line with the state fields null.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from lsstpipe.control.config import is_path_argument
from lsstpipe.control.errors import ConfigurationError
from lsstpipe.control.ocs import OCSClient
from lsstpipe.control.protocol import ErrorEvent, Response
from lsstpipe.control.states import Command, EntityName, OCSEvent

TRANSCRIPT_FIELDS = (
    "t",
    "at",
    "seq",
    "entity",
    "command",
    "arg",
    "result",
    "reason",
    "state",
    "configuration",
    "enabled",
)


@dataclass(frozen=True)
class CommandStep:
    """Send ``command`` (with ``config`` for configure) to ``entity`` at ``at`` seconds."""

    at: float
    entity: EntityName
    command: Command
    config: str | None = None


@dataclass(frozen=True)
class EventStep:
    """Publish the OCS event ``event`` at ``at`` seconds."""

    at: float
    event: OCSEvent
    visit: int = 0
    exposure: int = 0


Step = CommandStep | EventStep


def _number(value: Any, where: str, integer: bool = False) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or value < 0:
        raise ConfigurationError(
            f"{where}: expected a non-negative {'integer' if integer else 'number'}, got {value!r}"
        )
    return value


def _enum(cls: Any, value: Any, where: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise ConfigurationError(f"{where}: {value!r} is not one of {', '.join(m.value for m in cls)}") from None


def parse_script(data: Any, base: Path | None = None) -> list[Step]:
    """Validate a parsed YAML script; relative configuration paths are made absolute from ``base``.

    Raises
    ------
    ConfigurationError
        Not a list of steps, unknown keys, missing or wrong values, naming the step and the key.
    """
    if not isinstance(data, list) or not data:
        raise ConfigurationError(
            "a script is a non-empty list of steps {at, entity, command, [config]} or {at, event, …}"
        )
    steps: list[Step] = []
    for i, raw in enumerate(data, 1):
        where = f"step {i}"
        if not isinstance(raw, dict):
            raise ConfigurationError(f"{where}: expected a mapping, got {raw!r}")
        if "at" not in raw:
            raise ConfigurationError(f"{where}: missing key 'at' (seconds from the start)")
        at = float(_number(raw["at"], f"{where}.at"))
        if "event" in raw:
            unknown = sorted(set(raw) - {"at", "event", "visit", "exposure"})
            if unknown:
                raise ConfigurationError(
                    f"{where}: unknown key {unknown[0]!r}; an event step has at, event, visit, exposure"
                )
            steps.append(EventStep(at, _enum(OCSEvent, raw["event"], f"{where}.event"),
                                   _number(raw.get("visit", 0), f"{where}.visit", True),
                                   _number(raw.get("exposure", 0), f"{where}.exposure", True)))  # fmt: skip
            continue
        unknown = sorted(set(raw) - {"at", "entity", "command", "config"})
        if unknown:
            raise ConfigurationError(
                f"{where}: unknown key {unknown[0]!r}; a command step has at, entity, command, config"
            )
        for key in ("entity", "command"):
            if key not in raw:
                raise ConfigurationError(f"{where}: missing key {key!r} (or give 'event' for an event step)")
        command = _enum(Command, raw["command"], f"{where}.command")
        config = raw.get("config")
        if command is Command.CONFIGURE:
            if not isinstance(config, str) or not config:
                raise ConfigurationError(f"{where}: configure needs 'config': a configuration name or a YAML path")
            if is_path_argument(config) and base is not None and not Path(config).expanduser().is_absolute():
                config = str((base / config).resolve())
        elif config is not None:
            raise ConfigurationError(f"{where}: 'config' is only for configure, not {command.value}")
        steps.append(CommandStep(at, _enum(EntityName, raw["entity"], f"{where}.entity"), command, config))
    return steps


def load_script(path: str | Path) -> list[Step]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"{p}: cannot be read as YAML: {exc}") from None
    try:
        return parse_script(data, p.parent)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{p}: {exc}") from None


def transcript_line(
    item: Response | ErrorEvent, t: float, sent: dict[int, tuple[float, CommandStep]]
) -> dict[str, Any]:
    """One transcript row for a response (or for the error event that rejected a command)."""
    at, step = sent.get(item.seq or 0, (None, None))
    row: dict[str, Any] = {"t": round(t, 4), "at": at, "seq": item.seq}
    if isinstance(item, Response):
        row.update(entity=item.entity.value, command=item.command.value, arg=step.config if step else None,
                   result=item.result.value, reason=item.reason, state=item.state.value,
                   configuration=item.configuration, enabled=item.enabled)  # fmt: skip
    else:
        row.update(entity=step.entity.value if step else None, command=step.command.value if step else None,
                   arg=step.config if step else None, result="FAILED", reason=item.reason, state=None,
                   configuration=None, enabled=None)  # fmt: skip
    return row


def play(
    steps: list[Step],
    client: OCSClient,
    transcript: IO[str] | None = None,
    settle_timeout: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> list[dict[str, Any]]:
    """Send the steps at their times, then wait for every final result; returns the transcript rows.

    Raises
    ------
    TimeoutError
        Some command had no final result ``settle_timeout`` seconds after the last step.
    """
    rows: list[dict[str, Any]] = []
    lock = threading.Lock()
    sent: dict[int, tuple[float, CommandStep]] = {}
    t0 = client.clock()

    def on_item(item: Response | ErrorEvent, t: float) -> None:
        with lock:
            row = transcript_line(item, t - t0, sent)
            rows.append(row)
            if transcript is not None:
                transcript.write(json.dumps(row) + "\n")
                transcript.flush()

    client.listeners.append(on_item)
    try:
        seqs = []
        for step in sorted(steps, key=lambda s: s.at):  # stable: equal times keep script order
            delay = t0 + step.at - client.clock()
            if delay > 0:
                sleep(delay)
            if isinstance(step, EventStep):
                client.publish_event(step.event, step.visit, step.exposure)
                continue
            with lock:  # register before sending, so the ACK finds its step
                seq = client.next_seq()
                sent[seq] = (step.at, step)
            client.send_numbered(seq, step.entity, step.command, step.config)
            seqs.append(seq)
        end = time.monotonic() + settle_timeout
        for seq in seqs:
            client.wait(seq, max(0.0, end - time.monotonic()))
    finally:
        client.listeners.remove(on_item)
    return rows


def comparable(rows: list[dict[str, Any]]) -> dict[int, list[tuple[Any, ...]]]:
    """A transcript without its timing: per sequence number, the (entity, command, result, reason, state,
    configuration, enabled) of each response in order. Two runs of a script whose steps are far enough
    apart (over two transports, say) must give equal results."""
    out: dict[int, list[tuple[Any, ...]]] = {}
    for r in rows:
        key = (r["entity"], r["command"], r["result"], r["reason"], r["state"], r["configuration"], r["enabled"])
        out.setdefault(r["seq"], []).append(key)
    return out
