"""The DM control plane: the Base DMCS, its four OCS commandable entities, the command protocol (LDM-230 §2.1).

Modules, bottom to top: :mod:`~lsstpipe.control.states` (enumerations), :mod:`~lsstpipe.control.errors`
(taxonomy), :mod:`~lsstpipe.control.config` (named configurations), :mod:`~lsstpipe.control.transport`
(publish/subscribe), :mod:`~lsstpipe.control.protocol` (messages, HMAC), :mod:`~lsstpipe.control.cluster`
(the simulated cluster), :mod:`~lsstpipe.control.recorder` (what is recorded),
:mod:`~lsstpipe.control.entity` (the transition function), :mod:`~lsstpipe.control.dmcs` (the Base DMCS),
:mod:`~lsstpipe.control.ocs` (the OCS client), :mod:`~lsstpipe.control.script` (the script player) and
:mod:`~lsstpipe.control.cli_control` (the command line).
"""

from lsstpipe.control.cluster import ClusterDescription, SimulatedCluster
from lsstpipe.control.config import Configuration, load_configuration
from lsstpipe.control.dmcs import BaseDMCS, LockoutFlag, resolve_state_dir
from lsstpipe.control.entity import RULES, CommandableEntity, EntityStatus, Phase
from lsstpipe.control.errors import (
    AuthenticationError,
    BootError,
    CommandRejected,
    ConfigurationError,
    ControlError,
    EntityBusy,
    LockedOut,
    MalformedMessage,
    MessageError,
    NotInstallable,
    NoWork,
    PrerequisiteError,
    SecretFileError,
)
from lsstpipe.control.ocs import OCSClient
from lsstpipe.control.protocol import Codec, CommandMessage, Response, create_secret, load_secret
from lsstpipe.control.recorder import ControlRecorder, InMemoryRecorder
from lsstpipe.control.script import load_script, play
from lsstpipe.control.states import Command, CommandResult, EntityName, Mode, OCSEvent, SummaryState
from lsstpipe.control.transport import InProcessTransport, Topic, Transport

__all__ = [
    "AuthenticationError", "BaseDMCS", "BootError", "ClusterDescription", "Codec", "Command", "CommandMessage",
    "CommandRejected", "CommandResult", "CommandableEntity", "Configuration", "ConfigurationError", "ControlError",
    "ControlRecorder", "EntityBusy", "EntityName", "EntityStatus", "InMemoryRecorder", "InProcessTransport",
    "LockedOut", "LockoutFlag", "MalformedMessage", "MessageError", "Mode", "NoWork", "NotInstallable", "OCSClient",
    "OCSEvent", "Phase", "PrerequisiteError", "RULES", "Response", "SecretFileError", "SimulatedCluster",
    "SummaryState", "Topic", "Transport", "create_secret", "load_configuration", "load_script", "load_secret",
    "play", "resolve_state_dir",
]  # fmt: skip
