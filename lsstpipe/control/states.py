"""The vocabulary of the control plane: summary states, commands, results, entities, modes and OCS events.

Everything the OCS and the Base DMCS say to each other is drawn from these enumerations, so a typo is a
decoding error at the boundary instead of a string that silently matches nothing (LDM-230 §2.1).
"""

from __future__ import annotations

import enum


class SummaryState(enum.Enum):
    """The summary state of a commandable entity as the OCS sees it (LDM-230 §2.1)."""

    OFFLINE = "OFFLINE"
    """Not under OCS control: after a cold boot or a ``release``. Only ``init`` brings it to IDLE."""

    IDLE = "IDLE"
    """Commandable. The entity does its work in this state too: "enabled" is a flag, not a state."""

    ERROR = "ERROR"
    """Entered by ``abort``. An enabled entity keeps taking data; ``reset`` or ``release`` leaves ERROR."""


class CommandResult(enum.Enum):
    """What the DMCS answers to a command: first ``ACK``, then exactly one final result."""

    ACK = "ACK"
    """The command was well formed, authenticated and accepted for processing; a final result follows."""

    COMPLETE = "COMPLETE"
    """The command did what it says."""

    FAILED = "FAILED"
    """The command was rejected or could not be carried out; ``reason`` says why and what to do next."""

    ABORTED = "ABORTED"
    """A configure ended early because a ``stop`` or ``abort`` arrived while it ran."""

    IGNORED = "IGNORED"
    """Nothing to do: ``stop`` outside a configure."""

    @property
    def is_final(self) -> bool:
        """True for every result but ``ACK``."""
        return self is not CommandResult.ACK


class Command(enum.Enum):
    """The generic OCS commands every commandable entity obeys (LDM-230 §2.1.1–2.1.8)."""

    INIT = "init"
    """OFFLINE → IDLE, unless DM engineering has locked out OCS control."""

    CONFIGURE = "configure"
    """Check, then install a named configuration; always ends disabled. Takes an argument."""

    ENABLE = "enable"
    """Start taking events and data with the installed configuration."""

    DISABLE = "disable"
    """Stop taking new events; jobs already running finish."""

    RELEASE = "release"
    """Disable, then OFFLINE."""

    STOP = "stop"
    """During a configure: end it and leave no configuration. Otherwise ignored."""

    ABORT = "abort"
    """During a configure: ERROR with no configuration. Otherwise ERROR only (data taking goes on)."""

    RESET = "reset"
    """Disable, then IDLE with no configuration."""


class EntityName(enum.Enum):
    """The four OCS commandable entities of the Alert Production hardware (LDM-230 §2.1)."""

    ARCHIVER = "archiver"
    """Archives images in real time (replicator/distributor pairs)."""

    CATCHUP_ARCHIVER = "catchup_archiver"
    """Archives images missed in real time, on dedicated catch-up pairs."""

    EFD_REPLICATOR = "efd_replicator"
    """Makes the US DAC EFD replica follow the Chilean one."""

    ALERT_PRODUCTION_CLUSTER = "alert_production_cluster"
    """Produces the Level 1 data products on the workers."""


class Mode(enum.Enum):
    """Operating modes; each named configuration is one mode of one entity."""

    SCIENCE = "science"
    """Normal science observing: visits, alerts."""

    CALIBRATION = "calibration"
    """Raw calibration images: no visits, different data products."""

    ENGINEERING = "engineering"
    """Engineering images: no visits."""

    DAYTIME = "daytime"
    """Daytime DM operations, disconnected from the camera (orbit fitting, daily maintenance)."""


class OCSEvent(enum.Enum):
    """OCS events the Base DMCS may subscribe to (LDM-230 §2.1.9–2.1.10)."""

    NEXT_VISIT = "nextVisit"
    """A visit is about to start: the Alert Production Cluster (science) launches worker jobs."""

    START_INTEGRATION = "startIntegration"
    """An exposure starts integrating: the Archiver launches replicator jobs."""

    START_READOUT = "startReadout"
    """The camera starts reading out."""

    START_EXPOSURE = "startExposure"
    """An exposure starts (calibration/engineering modes of the Alert Production Cluster)."""
