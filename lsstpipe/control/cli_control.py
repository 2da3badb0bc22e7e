"""Command-line handlers of the control plane: ``config``, ``ocs`` and ``dmcs``.

Wiring into :mod:`lsstpipe.cli`::

    from lsstpipe.control import cli_control
    ...
    cli_control.add_parsers(sub)          # in build_parser(), adds 'config', 'ocs', 'dmcs'
    COMMANDS.update(cli_control.HANDLERS)  # each handler takes the parsed args and returns an exit code

Settings are resolved here, in the entry point: ``--state-dir`` > ``$LSSTPIPE_STATE_DIR`` > ``~/.lsstpipe``;
``--secret`` > ``$LSSTPIPE_SECRET_FILE`` > a fresh random secret (in-process, both ends share it; over DDS
there is no default: both processes must read the same file); ``--domain`` > ``$LSSTPIPE_DDS_DOMAIN`` > 42.

Over DDS (:mod:`lsstpipe.control.dds`, imported only when used): ``dmcs serve`` runs a Base DMCS until
SIGINT/SIGTERM; ``ocs send … --connect`` and ``ocs script … --connect`` talk to it, each session under a
sender name of its own. ``dmcs serve`` records into the control database (``--control-db`` >
``$LSSTPIPE_CONTROL_DB`` > ``STATE_DIR/control.sqlite3``) and into the Summit EFD (``--efd`` >
``$LSSTPIPE_EFD`` > the embedded chain in ``STATE_DIR/efd``); a restarted ``dmcs serve`` on the same control
database comes up OFFLINE with its history and still rejects replayed commands.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lsstpipe.control.cluster import SimulatedCluster
from lsstpipe.control.config import load_configuration, schema_text
from lsstpipe.control.dmcs import BaseDMCS, LockoutFlag, resolve_state_dir
from lsstpipe.control.errors import ControlError
from lsstpipe.control.ocs import OCSClient
from lsstpipe.control.protocol import Codec, ErrorEvent, Response, create_secret, load_secret
from lsstpipe.control.recorder import InMemoryRecorder
from lsstpipe.control.script import CommandStep, Step, load_script, play, transcript_line
from lsstpipe.control.states import Command, EntityName
from lsstpipe.control.transport import InProcessTransport
from lsstpipe.db.control import ControlDatabase, resolve_control_db_url
from lsstpipe.db.efd_replication import EFDChain, open_efd, resolve_efd
from lsstpipe.db.sql import DatabaseError

SECRET_ENV = "LSSTPIPE_SECRET_FILE"


def _common(p: argparse.ArgumentParser, cluster: bool = True) -> None:
    p.add_argument("--state-dir", default=None,
                   help="state directory with the lockout flag (default: $LSSTPIPE_STATE_DIR, else ~/.lsstpipe)")  # fmt: skip
    if cluster:
        p.add_argument("--cluster", default=None, help="YAML description of the simulated cluster (default: one "
                       "the shipped configurations fit; fields: lsstpipe.control.cluster.ClusterDescription)")  # fmt: skip
        p.add_argument("--config-root", "--config", dest="config_root", default=None,
                       help="folder of named configurations {entity}/{name}.yaml (default: the shipped ones)")  # fmt: skip
        p.add_argument("--secret", default=None, help="shared-secret file, private to its owner "
                       "(default: $LSSTPIPE_SECRET_FILE, else a fresh in-process secret)")  # fmt: skip


def _connect(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", action="store_true",
                   help="talk to a running Base DMCS ('lsstpipe dmcs serve') over DDS on loopback instead of "
                   "booting one in-process; needs --secret (or $LSSTPIPE_SECRET_FILE), the DMCS's secret")  # fmt: skip
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help="with --connect: seconds to wait for the DMCS to be discovered (default 10)")  # fmt: skip
    _domain(p, "with --connect: ")


def _domain(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument("--domain", type=int, default=None,
                   help=f"{prefix}DDS domain id, 0-232 (default: $LSSTPIPE_DDS_DOMAIN, else 42)")  # fmt: skip


def add_parsers(subparsers: Any) -> None:
    """Add the ``config``, ``ocs`` and ``dmcs`` subcommands to an ``argparse`` subparsers object."""
    entities = [e.value for e in EntityName]
    p = subparsers.add_parser("config", help="check entity configurations, print their schema",
                              description="Validate named configurations of the OCS commandable entities.")  # fmt: skip
    s = p.add_subparsers(dest="config_command", metavar="ACTION")
    s.required = True
    c = s.add_parser("check", help="validate configuration files", description="Validate each FILE: schema "
                     "(unknown keys are errors), types, ranges, consistency. Exit 1 if any is invalid.")  # fmt: skip
    c.add_argument("files", nargs="+", metavar="FILE")
    c = s.add_parser("schema", help="print the fields of an entity's configurations with defaults and docs")
    c.add_argument("entity", choices=entities)

    p = subparsers.add_parser("ocs", help="act as the OCS: send commands, play scripts",
                              description="Commands to the Base DMCS: an in-process one, or with --connect a running "
                              "'lsstpipe dmcs serve' over DDS on loopback.")  # fmt: skip
    s = p.add_subparsers(dest="ocs_command", metavar="ACTION")
    s.required = True
    c = s.add_parser("send", help="send one command (to an in-process DMCS, or --connect), print its results",
                     description="Boot an in-process Base DMCS (or with --connect reach a running one over DDS), "
                     "send ENTITY COMMAND [ARG], print the ACK and the final result as JSON lines. Exit 0 if "
                     "COMPLETE or IGNORED, 1 otherwise.")  # fmt: skip
    c.add_argument("entity", choices=entities)
    c.add_argument("entity_command", metavar="COMMAND", choices=[m.value for m in Command])
    c.add_argument("arg", nargs="?", default=None, help="the configuration (name or YAML path) for configure")
    c.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the final result")
    _common(c)
    _connect(c)
    c = s.add_parser("script", help="play a timed OCS script against an in-process DMCS (or --connect)",
                     description="Send the steps of SCRIPT.yaml at their times (not waiting for results) to an "
                     "in-process Base DMCS (or with --connect a running one over DDS) and write one JSON line "
                     "per ACK/result to --transcript. Exit 0 if every command's final result is COMPLETE or "
                     "IGNORED, 1 if one is not or got none (those steps are named on stderr).")  # fmt: skip
    c.add_argument("script", metavar="SCRIPT.yaml")
    c.add_argument("--transcript", required=True, metavar="OUT.jsonl")
    c.add_argument("--settle-timeout", type=float, default=60.0,
                   help="seconds to wait for the last results after the last step")  # fmt: skip
    _common(c)
    _connect(c)
    c = s.add_parser("secret", help="create a shared-secret file readable only by you")
    c.add_argument("file")

    p = subparsers.add_parser("dmcs", help="run the Base DMCS over DDS; DM-engineering lockout",
                              description="Administration of the Base DMCS.")  # fmt: skip
    s = p.add_subparsers(dest="dmcs_command", metavar="ACTION")
    s.required = True
    c = s.add_parser("lockout", help="lock OCS control out (init fails), lift the lockout, or show it",
                     description="DM engineering's lockout of OCS control: while on, init fails with the reason.")  # fmt: skip
    c.add_argument("action", choices=("on", "off", "status"))
    c.add_argument("--reason", default="", help="why (shown to the OCS in the init failure)")
    _common(c, cluster=False)
    c = s.add_parser("serve", help="run a Base DMCS on DDS (loopback only) until SIGINT/SIGTERM",
                     description="Boot a Base DMCS on a Cyclone DDS domain confined to 127.0.0.1 (no multicast) "
                     "and serve OCS commands and events until interrupted (SIGINT or SIGTERM: clean "
                     "shutdown, exit 0). Rejected messages are logged to stderr; the shutdown line says how "
                     "many records the control database and the Summit EFD lost.")  # fmt: skip
    _common(c)
    _domain(c)
    c.add_argument("--control-db", default=None, metavar="PATH_OR_URL",
                   help="control database: a SQLite path or sqlite:///PATH, or postgresql://… (default: "
                   "$LSSTPIPE_CONTROL_DB, else STATE_DIR/control.sqlite3)")  # fmt: skip
    c.add_argument("--efd", default=None, metavar="DIR_OR_URL",
                   help="Summit EFD: a directory for the embedded chain (three SQLite copies fed by log "
                   "shipping), or the Summit primary's postgresql://… (default: $LSSTPIPE_EFD, else STATE_DIR/efd)")  # fmt: skip
    c.add_argument("--efd-replica", action="append", default=[], metavar="SITE=URL",
                   help="with a PostgreSQL --efd: a standby, SITE chile_dac or us_dac (repeat for both)")  # fmt: skip
    c.add_argument("--efd-interval", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between EFD replication steps and lag telemetry (default 1)")  # fmt: skip


def open_stores(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[ControlDatabase, EFDChain]:
    """The control database and the EFD of ``dmcs serve`` (settings resolved here; the caller closes both).

    Raises
    ------
    DatabaseError
        Either cannot be opened.
    ValueError
        A malformed ``--efd-replica``.
    """
    state_dir = resolve_state_dir(args.state_dir, environ)
    replicas: dict[str, str] = {}
    for item in args.efd_replica:
        site, sep, url = item.partition("=")
        if not sep or not url:
            raise ValueError(f"--efd-replica {item!r}: write SITE=URL, e.g. us_dac=postgresql://…")
        replicas[site] = url
    if args.efd_interval <= 0:
        raise ValueError(f"--efd-interval must be > 0 seconds (got {args.efd_interval})")
    control = ControlDatabase(resolve_control_db_url(args.control_db, environ, state_dir))
    try:
        efd = open_efd(resolve_efd(args.efd, environ, state_dir), replicas)
    except BaseException:
        control.close()
        raise
    return control, efd


def _error(args: argparse.Namespace, exc: Exception) -> int:
    print(f"lsstpipe {args.command}: error: {exc}", file=sys.stderr)
    return 2


def cmd_config(args: argparse.Namespace) -> int:
    if args.config_command == "schema":
        print(schema_text(EntityName(args.entity)))
        return 0
    bad = 0
    for f in args.files:
        try:
            cfg = load_configuration(f if f.endswith((".yaml", ".yml")) or "/" in f else f"./{f}")
        except ControlError as exc:
            print(f"INVALID {exc}", file=sys.stderr)
            bad += 1
            continue
        s = cfg.settings
        print(f"OK {f}: {s.entity.value} {s.mode.value}, software {s.software_version}, "
              f"install {s.install_seconds:g} s{' — ' + s.description if s.description else ''}")  # fmt: skip
    return 1 if bad else 0


@contextlib.contextmanager
def in_process_session(
    args: argparse.Namespace, recorder: InMemoryRecorder | None = None
) -> Iterator[tuple[BaseDMCS, OCSClient]]:
    """Boot an in-process Base DMCS and an OCS client on one in-process transport (settings resolved here)."""
    secret_file = args.secret or os.environ.get(SECRET_ENV)
    secret = load_secret(secret_file) if secret_file else os.urandom(32).hex().encode()
    codec = Codec(secret)
    cluster = SimulatedCluster.from_yaml(Path(args.cluster)) if args.cluster else SimulatedCluster()
    transport = InProcessTransport("ocs")
    try:
        dmcs = BaseDMCS(transport, codec, cluster, lockout=LockoutFlag(resolve_state_dir(args.state_dir)),
                        config_root=Path(args.config_root) if args.config_root else None, recorder=recorder)  # fmt: skip
        dmcs.boot()
        client = OCSClient(transport, codec)
        try:
            yield dmcs, client
        finally:
            client.close()
            dmcs.close()
    finally:
        transport.close()


def _secret_file(args: argparse.Namespace, what: str) -> str:
    """The shared-secret file a DDS session needs (a fresh random secret could not be shared)."""
    path = args.secret or os.environ.get(SECRET_ENV)
    if not path:
        raise ControlError(f"{what} needs the secret file the other end uses: pass --secret FILE or set "
                           f"${SECRET_ENV} (make one with 'lsstpipe ocs secret FILE')")  # fmt: skip
    return str(path)


@contextlib.contextmanager
def dds_session(args: argparse.Namespace) -> Iterator[OCSClient]:
    """An OCS client on DDS, once a running Base DMCS has been discovered (settings resolved here)."""
    from lsstpipe.control.dds import DDSTransport, resolve_domain, unique_sender

    for option, value in (("--cluster", args.cluster), ("--config-root", args.config_root),
                          ("--state-dir", args.state_dir)):  # fmt: skip
        if value is not None:
            raise ControlError(f"{option} is for an in-process DMCS; with --connect the running DMCS uses its own "
                               "(give it to 'lsstpipe dmcs serve')")  # fmt: skip
    codec = Codec(load_secret(_secret_file(args, "--connect")))
    transport = DDSTransport(resolve_domain(args.domain), "ocs")
    try:
        client = OCSClient(transport, codec, sender=unique_sender())
        try:
            transport.wait_for_peer(args.connect_timeout)
            yield client
        finally:
            client.close()
    finally:
        transport.close()


@contextlib.contextmanager
def ocs_session(args: argparse.Namespace) -> Iterator[OCSClient]:
    """The OCS client of ``ocs send``/``ocs script``: over DDS with ``--connect``, else with an in-process DMCS."""
    if args.connect:
        with dds_session(args) as client:
            yield client
        return
    if args.domain is not None:
        raise ControlError("--domain needs --connect (without it the DMCS runs in this process)")
    with in_process_session(args) as (_dmcs, client):
        yield client


def cmd_ocs(args: argparse.Namespace) -> int:
    try:
        if args.ocs_command == "secret":
            create_secret(args.file)
            print(f"wrote a new secret to {args.file} (mode 0600)")
            return 0
        if args.ocs_command == "send":
            return _send(args)
        return _script(args)
    except (ControlError, TimeoutError, OSError) as exc:
        return _error(args, exc)


def _send(args: argparse.Namespace) -> int:
    with ocs_session(args) as client:
        lines: list[Response | ErrorEvent] = []
        client.listeners.append(lambda item, t: lines.append(item))
        seq = client.send(EntityName(args.entity), Command(args.entity_command), args.arg)
        client.wait(seq, args.timeout)
    final = "FAILED"
    for item in lines:
        row = transcript_line(item, 0.0, {})
        del row["t"], row["at"]
        row.update(entity=args.entity, command=args.entity_command, arg=args.arg)
        print(json.dumps(row))
        final = row["result"]
    return 0 if final in ("COMPLETE", "IGNORED") else 1


def _script(args: argparse.Namespace) -> int:
    steps = load_script(args.script)
    Path(args.transcript).parent.mkdir(parents=True, exist_ok=True)
    unsettled = None
    with ocs_session(args) as client, open(args.transcript, "w") as out:
        try:
            play(steps, client, out, settle_timeout=args.settle_timeout)
        except TimeoutError as exc:  # the transcript holds what came back; the steps without a result fail
            unsettled = exc
    with open(args.transcript) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["result"]] = counts.get(r["result"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"{len(steps)} steps played, {len(rows)} responses ({summary}) written to {args.transcript}")
    failed = failed_steps(steps, rows)
    if unsettled is not None:
        print(f"lsstpipe ocs script: {unsettled}", file=sys.stderr)
    for line in failed:
        print(f"lsstpipe ocs script: {line}", file=sys.stderr)
    return 1 if failed else 0


def failed_steps(steps: list[Step], rows: list[dict[str, Any]]) -> list[str]:
    """The command steps whose final result is neither COMPLETE nor IGNORED, or that got none, one line each
    (``rows``: the transcript of playing ``steps``)."""
    results: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("seq") is not None and r.get("at") is not None:  # a response to a step of this script
            results.setdefault(r["seq"], []).append(r)
    answered: dict[tuple[Any, ...], list[list[dict[str, Any]]]] = {}
    for seq in sorted(results):  # sent in order of their times, equal times in script order (as play sends)
        first = results[seq][0]
        answered.setdefault((first["at"], first["entity"], first["command"], first["arg"]), []).append(results[seq])
    lines = []
    order = sorted(range(len(steps)), key=lambda k: steps[k].at)
    for k in order:
        step = steps[k]
        if not isinstance(step, CommandStep):
            continue
        arg = f" {step.config}" if step.config else ""
        what = f"step {k + 1} ({step.entity.value} {step.command.value}{arg} at {step.at:g} s)"
        got = answered.get((step.at, step.entity.value, step.command.value, step.config))
        responses = got.pop(0) if got else []
        final = [r for r in responses if r["result"] != "ACK"]
        if not final:
            lines.append(f"{what}: no final result")
        elif final[-1]["result"] not in ("COMPLETE", "IGNORED"):
            lines.append(f"{what}: {final[-1]['result']}: {final[-1]['reason']}")
    return lines


def cmd_dmcs(args: argparse.Namespace) -> int:
    if args.dmcs_command == "serve":
        try:
            return serve(args)
        except (ControlError, OSError, DatabaseError, ValueError) as exc:
            return _error(args, exc)
    flag = LockoutFlag(resolve_state_dir(args.state_dir))
    try:
        if args.action == "on":
            flag.set(args.reason)
            print(f"OCS control locked out ({flag.reason()}); init will fail until 'lsstpipe dmcs lockout off'")
        elif args.action == "off":
            print("lockout lifted" if flag.clear() else "OCS control was not locked out")
        else:
            reason = flag.reason()
            print(f"locked out {reason}" if reason else "not locked out")
    except OSError as exc:
        return _error(args, exc)
    return 0


def serve(args: argparse.Namespace) -> int:
    """``dmcs serve``: a Base DMCS on DDS until SIGINT/SIGTERM."""
    from lsstpipe.control.dds import LOOPBACK, DDSTransport, resolve_domain

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    codec = Codec(load_secret(_secret_file(args, "lsstpipe dmcs serve")))
    domain = resolve_domain(args.domain)
    cluster = SimulatedCluster.from_yaml(Path(args.cluster)) if args.cluster else SimulatedCluster()
    control, efd = open_stores(args, os.environ)
    dmcs: BaseDMCS | None = None
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        transport = DDSTransport(domain, "dmcs")
        try:
            dmcs = BaseDMCS(transport, codec, cluster, lockout=LockoutFlag(resolve_state_dir(args.state_dir)),
                            config_root=Path(args.config_root) if args.config_root else None, recorder=control,
                            efd=efd, efd_monitor_interval=args.efd_interval)  # fmt: skip
            dmcs.boot()
            try:
                print(f"Base DMCS serving on DDS domain {domain} ({LOOPBACK} only, no multicast); control database "
                      f"{control.db.url}, Summit EFD {efd.summit.db.url}; stop with Ctrl-C or SIGTERM",
                      flush=True)  # fmt: skip
                while not stop.wait(0.2):
                    pass
            finally:
                dmcs.close()
        finally:
            transport.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        efd.close()
        control.close()
    assert dmcs is not None, "a DMCS that failed to start raised above"
    print(stopped_message(dmcs.lost_records()), flush=True)
    return 0


def stopped_message(lost: Mapping[str, int]) -> str:
    """The shutdown line of ``dmcs serve``: with the records each store lost (failed writes, logged as they
    happened), so an operator knows the history is incomplete."""
    counts = ", ".join(f"{n} in the {store}" for store, n in lost.items())
    if not any(lost.values()):
        return f"Base DMCS stopped; no record lost ({counts or 'nothing recorded'})"
    return (f"Base DMCS stopped; records LOST: {counts} (the errors are in the log above; the history in those "
            "stores is incomplete)")  # fmt: skip


#: Subcommand name → handler, to merge into :data:`lsstpipe.cli.COMMANDS`.
HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {"config": cmd_config, "ocs": cmd_ocs, "dmcs": cmd_dmcs}


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m lsstpipe.control.cli_control …``) until lsstpipe.cli wires these in."""
    parser = argparse.ArgumentParser(prog="lsstpipe")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_parsers(sub)
    args = parser.parse_args(argv)
    return HANDLERS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
