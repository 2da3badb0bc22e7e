"""Commandable entities: one transition function implements the whole command table of issue 4 / LDM-230 §2.1.

============  ===========  ====================================================================================
command       accepted in  effect
============  ===========  ====================================================================================
init          OFFLINE      → IDLE; FAILED while DM engineering has locked out OCS control
configure     IDLE         ACK after the format check (done by the DMCS); then, asynchronously, legality and
                           consistency of the configuration and the prerequisites; then disable, install
                           (``install_seconds``), COMPLETE — always ending disabled. Check failure: FAILED,
                           nothing changed
enable        IDLE         subscribe (entity-specific); FAILED without a configuration
disable       IDLE         unsubscribe; running jobs finish
release       IDLE, ERROR  disable, then OFFLINE (the configuration stays installed)
stop          any          during a configure: the configure is ABORTED, no configuration; otherwise IGNORED
abort         any          during a configure: ERROR, no configuration; otherwise ERROR only (enabled stays)
reset         IDLE, ERROR  disable; IDLE with no configuration
============  ===========  ====================================================================================

Any other command in a state not listed is FAILED with a reason and changes nothing; while a configure
runs every command but stop and abort is FAILED as busy (:class:`~lsstpipe.control.errors.EntityBusy`).

Invariant: an entity with no configuration is never enabled.

A configure runs on its own thread in three phases, each entering :meth:`CommandableEntity.transition`
as a :class:`Phase`: the checks (:attr:`Phase.CHECKS_FAILED` → FAILED, nothing changed), then
:attr:`Phase.CHECKED` (disable and stage the installation on the cluster), then after ``install_seconds``
:attr:`Phase.INSTALLED` (commit atomically → COMPLETE). ``stop``/``abort`` set the configure's cancel
flag and remove the staging and the installation under the same lock, so a late phase of a cancelled
configure finds itself stale and does nothing. If the commit itself fails (the software changed on the
machines during the install), the configure is FAILED, the staging is dropped and the previous
configuration stays installed — disabled, as a configure always ends.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from lsstpipe.control.cluster import Installation, SimulatedCluster
from lsstpipe.control.config import (
    AlertProductionSettings,
    ArchiverSettings,
    CatchupSettings,
    Configuration,
    EFDReplicatorSettings,
    Pool,
    Settings,
    load_configuration,
)
from lsstpipe.control.errors import (
    CommandRejected,
    ControlError,
    EntityBusy,
    LockedOut,
    NoWork,
)
from lsstpipe.control.states import Command, CommandResult, EntityName, Mode, OCSEvent, SummaryState

log = logging.getLogger(__name__)

_ALL = frozenset(SummaryState)


@dataclass(frozen=True)
class Rule:
    """Where a command is accepted."""

    allowed_from: frozenset[SummaryState]
    while_configuring: bool = False


#: The command table (states in which each command is accepted; stop and abort also during a configure).
RULES: dict[Command, Rule] = {
    Command.INIT: Rule(frozenset({SummaryState.OFFLINE})),
    Command.CONFIGURE: Rule(frozenset({SummaryState.IDLE})),
    Command.ENABLE: Rule(frozenset({SummaryState.IDLE})),
    Command.DISABLE: Rule(frozenset({SummaryState.IDLE})),
    Command.RELEASE: Rule(frozenset({SummaryState.IDLE, SummaryState.ERROR})),
    Command.STOP: Rule(_ALL, while_configuring=True),
    Command.ABORT: Rule(_ALL, while_configuring=True),
    Command.RESET: Rule(frozenset({SummaryState.IDLE, SummaryState.ERROR})),
}

_HINT = {
    SummaryState.OFFLINE: "send init first",
    SummaryState.IDLE: "it is already initialised",
    SummaryState.ERROR: "send reset or release first",
}


class Phase(enum.Enum):
    """Internal steps of a running configure, entering the transition function from its thread."""

    CHECKS_FAILED = "checks_failed"
    """The configuration is illegal, inconsistent, not installable or a prerequisite is missing."""

    CHECKED = "checked"
    """The checks passed: disable, stage the installation."""

    INSTALLED = "installed"
    """``install_seconds`` have passed: commit the installation, COMPLETE."""


@dataclass(frozen=True)
class EntityStatus:
    """What the OCS sees of an entity, plus whether a configure is running."""

    state: SummaryState
    configuration: str | None
    enabled: bool
    configuring: bool

    @property
    def visible(self) -> tuple[SummaryState, str | None, bool]:
        """What the OCS sees: state, configuration, enabled."""
        return self.state, self.configuration, self.enabled


@dataclass(frozen=True)
class Reply:
    """One response to one command (the DMCS adds the entity's status when it publishes it)."""

    seq: int
    command: Command
    result: CommandResult
    reason: str = ""
    sender: str = "ocs"


@dataclass
class _ConfigureJob:
    seq: int
    arg: str
    sender: str
    cancel: threading.Event = field(default_factory=threading.Event)
    config: Configuration | None = None
    staged: Installation | None = None
    thread: threading.Thread | None = None


class EntityOutput(Protocol):
    """Where an entity's responses, status changes, errors and telemetry go (the DMCS)."""

    def reply(self, entity: EntityName, reply: Reply, status: EntityStatus) -> None: ...

    def state(self, entity: EntityName, status: EntityStatus) -> None: ...

    def error(self, entity: EntityName, exc: ControlError, seq: int | None, sender: str | None = None) -> None: ...

    def telemetry(self, entity: EntityName, name: str, value: float) -> None: ...

    def installed(self, entity: EntityName, inst: Installation) -> None: ...


class CommandableEntity:
    """An OCS commandable entity: summary state, configuration (or None), enabled flag, one transition function.

    Parameters
    ----------
    cluster
        The simulated cluster the prerequisites are checked against and configurations installed on.
    output
        Receives responses, status changes, errors and telemetry.
    lockout
        Returns the reason OCS control is locked out by DM engineering, or None.
    config_root
        Folder of named configurations (default: the shipped ``lsstpipe/configs``).
    """

    name: ClassVar[EntityName]

    def __init__(
        self,
        cluster: SimulatedCluster,
        output: EntityOutput,
        lockout: Callable[[], str | None] = lambda: None,
        config_root: Path | None = None,
    ) -> None:
        self.cluster = cluster
        self._out = output
        self._lockout = lockout
        self._config_root = config_root
        self._lock = threading.RLock()
        self._state = SummaryState.OFFLINE
        self._configuration: str | None = None
        self._settings: Settings | None = None
        self._enabled = False
        self._job: _ConfigureJob | None = None
        self._idle = threading.Condition(self._lock)

    # ---- what the OCS sees -----------------------------------------------------------------------------
    @property
    def status(self) -> EntityStatus:
        with self._lock:
            return EntityStatus(self._state, self._configuration, self._enabled, self._job is not None)

    @property
    def settings(self) -> Settings | None:
        """The settings of the installed configuration, or None."""
        with self._lock:
            return self._settings

    def subscriptions(self) -> frozenset[OCSEvent]:
        """The OCS events this entity handles now (none unless enabled)."""
        with self._lock:
            if not self._enabled or self._settings is None:
                return frozenset()
            return self._subscriptions(self._settings)

    def wait_until_not_configuring(self, timeout: float) -> bool:
        """Block until no configure runs (tests and one-shot tools)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._job is None, timeout)

    # ---- the transition function -----------------------------------------------------------------------
    def transition(
        self,
        trigger: Command | Phase,
        seq: int,
        arg: str | None = None,
        sender: str = "ocs",
        job: _ConfigureJob | None = None,
        error: ControlError | None = None,
    ) -> list[Reply]:
        """Apply one command (or one configure phase) and publish the replies and status changes.

        Returns the final replies published (a configure that starts returns none: its final result comes
        from its thread). Rejections are returned as FAILED/IGNORED replies, never raised.
        """
        with self._lock:
            before = self.status
            try:
                replies = self._decide(trigger, seq, arg, sender, job, error)
            except ControlError as exc:
                assert isinstance(trigger, Command), "configure phases do not raise"
                result = CommandResult.IGNORED if isinstance(exc, NoWork) else CommandResult.FAILED
                replies = [Reply(seq, trigger, result, str(exc), sender)]
                if result is CommandResult.FAILED:
                    self._out.error(self.name, exc, seq, sender)
            after = self.status
            if after.visible != before.visible:
                self._out.state(self.name, after)
            for r in replies:
                self._out.reply(self.name, r, after)
            if self._job is None:
                self._idle.notify_all()
            return replies

    def _decide(
        self,
        trigger: Command | Phase,
        seq: int,
        arg: str | None,
        sender: str,
        job: _ConfigureJob | None,
        error: ControlError | None,
    ) -> list[Reply]:
        if isinstance(trigger, Phase):
            return self._phase(trigger, job, error)
        rule = RULES[trigger]
        running = self._job
        if running is not None and not rule.while_configuring:
            raise EntityBusy(f"the {self.name.value} is busy configuring {running.arg!r} (seq {running.seq}); only "
                             f"stop and abort are accepted until it ends; send {trigger.value} again afterwards")  # fmt: skip
        if self._state not in rule.allowed_from:
            allowed = " or ".join(sorted(s.value for s in rule.allowed_from))
            raise CommandRejected(f"{trigger.value} is accepted when the {self.name.value} is {allowed}, but it is "
                                  f"{self._state.value}; {_HINT[self._state]}")  # fmt: skip
        done = CommandResult.COMPLETE
        if trigger is Command.INIT:
            reason = self._lockout()
            if reason is not None:
                raise LockedOut(f"OCS control is locked out by DM engineering ({reason}); init again after "
                                "'lsstpipe dmcs lockout off'")  # fmt: skip
            self._state = SummaryState.IDLE
            return [Reply(seq, trigger, done, "", sender)]
        if trigger is Command.CONFIGURE:
            assert arg is not None, "the DMCS's format check guarantees a configure argument"
            self._job = _ConfigureJob(seq, arg, sender)
            self._job.thread = threading.Thread(target=self._configure, args=(self._job,), daemon=True,
                                                name=f"configure-{self.name.value}-{seq}")  # fmt: skip
            self._job.thread.start()
            return []
        if trigger is Command.ENABLE:
            if self._configuration is None:
                raise CommandRejected(f"the {self.name.value} has no configuration; configure it first")
            self._set_enabled(True)
            return [Reply(seq, trigger, done, "", sender)]
        if trigger is Command.DISABLE:
            self._set_enabled(False)
            return [Reply(seq, trigger, done, "running jobs finish", sender)]
        if trigger is Command.RELEASE:
            self._set_enabled(False)
            self._state = SummaryState.OFFLINE
            return [Reply(seq, trigger, done, "", sender)]
        if trigger is Command.RESET:
            self._set_enabled(False)
            self._drop_configuration()
            self._state = SummaryState.IDLE
            return [Reply(seq, trigger, done, "", sender)]
        if trigger in (Command.STOP, Command.ABORT):
            if running is not None:
                running.cancel.set()
                self._job = None
                self._set_enabled(False)
                self._drop_configuration()
                if trigger is Command.ABORT:
                    self._state = SummaryState.ERROR
                why = f"{trigger.value} (seq {seq}) ended the configure: the {self.name.value} has no configuration"
                return [Reply(running.seq, Command.CONFIGURE, CommandResult.ABORTED, why, running.sender),
                        Reply(seq, trigger, done, why, sender)]  # fmt: skip
            if trigger is Command.STOP:
                raise NoWork(f"no configure is running on the {self.name.value}; stop only ends a configure")
            self._state = SummaryState.ERROR
            note = " (still enabled: data taking goes on; disable with reset or release)" if self._enabled else ""
            return [Reply(seq, trigger, done, f"ERROR{note}", sender)]
        raise AssertionError(f"no rule for {trigger}")  # every Command is in RULES

    def _phase(self, phase: Phase, job: _ConfigureJob | None, error: ControlError | None) -> list[Reply]:
        if job is None or job is not self._job:
            return []  # a stop/abort ended this configure already
        if phase is Phase.CHECKS_FAILED:
            assert error is not None
            self._job = None
            self._out.error(self.name, error, job.seq, job.sender)
            return [Reply(job.seq, Command.CONFIGURE, CommandResult.FAILED, str(error), job.sender)]
        assert job.config is not None
        if phase is Phase.CHECKED:
            try:  # once more, under the lock, right before the staging
                checksum = self.cluster.verify_software(job.config.settings.software_version)
            except ControlError as exc:
                return self._phase(Phase.CHECKS_FAILED, job, exc)
            self._set_enabled(False)
            job.staged = self.cluster.stage(job.config, checksum)
            return []
        assert phase is Phase.INSTALLED and job.staged is not None
        self._job = None
        try:
            self.cluster.commit(job.staged)
        except ControlError as exc:
            self._out.error(self.name, exc, job.seq, job.sender)
            return [Reply(job.seq, Command.CONFIGURE, CommandResult.FAILED,
                          f"{exc}; the previous configuration stays installed", job.sender)]  # fmt: skip
        self._configuration, self._settings = job.arg, job.config.settings
        self._out.installed(self.name, job.staged)
        return [Reply(job.seq, Command.CONFIGURE, CommandResult.COMPLETE, "installed; disabled", job.sender)]

    def _configure(self, job: _ConfigureJob) -> None:
        """The configure thread: checks, then the install wait; every outcome enters :meth:`transition`."""
        try:
            config = load_configuration(job.arg, self.name, self._config_root)
            self.cluster.verify_software(config.settings.software_version)
            self.check_prerequisites(config.settings)
        except ControlError as exc:
            self.transition(Phase.CHECKS_FAILED, job.seq, job=job, error=exc)
            return
        except Exception as exc:  # a bug: report it as a failed configure instead of losing the thread
            log.exception("configure %s of the %s", job.arg, self.name.value)
            self.transition(Phase.CHECKS_FAILED, job.seq, job=job, error=ControlError(f"internal error: {exc!r}"))
            return
        job.config = config
        self.transition(Phase.CHECKED, job.seq, job=job)
        if job.staged is None:
            return  # failed at the staging, or stopped/aborted meanwhile
        if job.cancel.wait(config.settings.install_seconds):
            return
        self.transition(Phase.INSTALLED, job.seq, job=job)

    # ---- helpers (called under the lock) ----------------------------------------------------------------
    def _drop_configuration(self) -> None:
        self._configuration = self._settings = None
        self.cluster.uninstall(self.name)

    def _set_enabled(self, on: bool) -> None:
        """Enable (side effects first: if they raise a ControlError the entity stays disabled) or disable
        (always: a side effect that fails is published as an error, and the entity is disabled anyway)."""
        if on == self._enabled:
            return
        assert self._settings is not None or not on
        if on:
            assert self._settings is not None
            self._on_enabled(self._settings, True)
            self._enabled = True
            return
        self._enabled = False
        if self._settings is not None:
            try:
                self._on_enabled(self._settings, False)
            except ControlError as exc:
                log.warning("%s disabled, but: %s", self.name.value, exc)
                self._out.error(self.name, exc, None)

    # ---- what differs between entities -----------------------------------------------------------------
    def check_prerequisites(self, settings: Settings) -> None:
        """Raise :class:`~lsstpipe.control.errors.PrerequisiteError` if the cluster cannot run ``settings``."""
        raise NotImplementedError

    def _subscriptions(self, settings: Settings) -> frozenset[OCSEvent]:
        return frozenset()

    def _on_enabled(self, settings: Settings, on: bool) -> None:
        """Side effects of enabling/disabling beyond the subscriptions (under the lock)."""

    def jobs_for(self, event: OCSEvent) -> int:
        """How many jobs one ``event`` launches on :attr:`cluster` (0 for an event the entity does not handle)."""
        return 0


class Archiver(CommandableEntity):
    """Enabled: subscribed to startIntegration; each one launches the cluster's replicator jobs per exposure
    (one per science raft plus one for the wavefront sensors: 21 + 1 on LSSTCam)."""

    name = EntityName.ARCHIVER

    def check_prerequisites(self, settings: Settings) -> None:
        assert isinstance(settings, ArchiverSettings)
        self.cluster.require_pairs(settings.pools, settings.replicator_pairs, "the Archiver")

    def _subscriptions(self, settings: Settings) -> frozenset[OCSEvent]:
        return frozenset({OCSEvent.START_INTEGRATION})

    def jobs_for(self, event: OCSEvent) -> int:
        return self.cluster.jobs.per_exposure if event is OCSEvent.START_INTEGRATION else 0


class CatchupArchiver(CommandableEntity):
    """Enabled: scans for unarchived images and lets the Orchestration Manager schedule archive jobs."""

    name = EntityName.CATCHUP_ARCHIVER

    def check_prerequisites(self, settings: Settings) -> None:
        assert isinstance(settings, CatchupSettings)
        self.cluster.require_pairs([Pool.CATCHUP], settings.catchup_pairs, "the Catch-Up Archiver")

    @property
    def scanning(self) -> bool:
        return self.status.enabled

    def _on_enabled(self, settings: Settings, on: bool) -> None:
        self._out.telemetry(self.name, "scanning", float(on))


class EFDReplicator(CommandableEntity):
    """Enabled: the US DAC EFD replica follows the Chilean DAC replica (for real when the cluster has an EFD
    attached; an enable the replica refuses is FAILED and leaves the entity disabled)."""

    name = EntityName.EFD_REPLICATOR

    def check_prerequisites(self, settings: Settings) -> None:
        assert isinstance(settings, EFDReplicatorSettings)
        self.cluster.ping_replica(settings.us_replica, settings.connect_timeout_seconds)

    def _on_enabled(self, settings: Settings, on: bool) -> None:
        assert isinstance(settings, EFDReplicatorSettings)
        self.cluster.set_following(settings.us_replica, on)
        self._out.telemetry(self.name, "us_replica_following", float(on))


class AlertProductionCluster(CommandableEntity):
    """Enabled: subscribed to nextVisit (science) or startExposure (calibration, engineering); none in daytime.
    Each event launches the cluster's worker jobs per visit (one per CCD and wavefront sensor: 189 + 4 on
    LSSTCam)."""

    name = EntityName.ALERT_PRODUCTION_CLUSTER

    def check_prerequisites(self, settings: Settings) -> None:
        assert isinstance(settings, AlertProductionSettings)
        self.cluster.require_workers(settings.workers)

    def _subscriptions(self, settings: Settings) -> frozenset[OCSEvent]:
        if settings.mode is Mode.SCIENCE:
            return frozenset({OCSEvent.NEXT_VISIT})
        if settings.mode in (Mode.CALIBRATION, Mode.ENGINEERING):
            return frozenset({OCSEvent.START_EXPOSURE})
        return frozenset()

    def jobs_for(self, event: OCSEvent) -> int:
        if event in (OCSEvent.NEXT_VISIT, OCSEvent.START_EXPOSURE):
            return self.cluster.jobs.per_visit
        return 0


ENTITY_CLASSES: dict[EntityName, type[CommandableEntity]] = {
    cls.name: cls for cls in (Archiver, CatchupArchiver, EFDReplicator, AlertProductionCluster)
}
