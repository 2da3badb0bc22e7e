"""The control plane's error taxonomy, with retry semantics.

Every failure the DMCS reports is a :class:`ControlError`. Its ``retriable`` attribute says whether the
same command may succeed later without anyone changing the request (a prerequisite may come back, a
lockout may be lifted, a busy entity becomes free); the message says what to do next. "Nothing to do"
is its own case (:class:`NoWork`), answered ``IGNORED`` rather than ``FAILED``.
"""

from __future__ import annotations


class ControlError(Exception):
    """Base class of control-plane failures."""

    retriable: bool = False


class NoWork(ControlError):
    """The command has nothing to act on (``stop`` outside a configure): answered IGNORED."""


class CommandRejected(ControlError):
    """The command is not accepted in the entity's current state; nothing changed."""


class EntityBusy(CommandRejected):
    """A configure is running; only ``stop`` and ``abort`` are accepted until it ends. Retry afterwards."""

    retriable = True


class LockedOut(ControlError):
    """DM engineering has locked out OCS control; retry after ``lsstpipe dmcs lockout off``."""

    retriable = True


class ConfigurationError(ControlError, ValueError):
    """A configuration file or name is illegal: unreadable, unknown keys, wrong types, inconsistent."""


class NotInstallable(ControlError):
    """The configuration is legal but cannot be installed: its software is missing or fails its checksum."""


class PrerequisiteError(ControlError):
    """Not enough pairs or workers available, or the US EFD replica unreachable. May clear by itself."""

    retriable = True


class MessageError(ControlError):
    """A message on the OCS link could not be accepted; the DMCS logs it and keeps serving."""


class MalformedMessage(MessageError):
    """Not valid JSON, missing or mistyped fields, unknown entity/command/event, duplicate sequence number."""


class AuthenticationError(MessageError):
    """No MAC, or a MAC that does not verify with the shared secret."""


class SecretFileError(ControlError, ValueError):
    """The shared-secret file is missing, empty, or readable by someone other than its owner."""


class BootError(ControlError):
    """The cold-boot self test failed: the event transport or the OCS link does not deliver."""

    retriable = True
