"""Fast detection of dead ranks with ULFM (User-Level Failure Mitigation) under Open MPI 5.

Under Open MPI 5 launched with ``mpiexec --with-ft ulfm`` (and ``--mca btl tcp,self`` on one machine), the
runtime tells the surviving ranks within milliseconds that a process died: :class:`FailureDetector` turns
that into "ranks newly known to have failed" that the DMCS can reschedule at once, long before a missing
heartbeat would. Everywhere else (MPICH, Open MPI without ``--with-ft ulfm``) the detector is inert —
:meth:`FailureDetector.poll` returns an empty set — and the heartbeats and deadlines of the night stay the
portable way to find a dead rank.

This module talks only to MPI (mpi4py) and the standard library, so that a caller can use it on any
communicator; it never sends a message of its own.

What ULFM gives, as mpi4py ≥ 4 exposes it:

- ``Comm.Get_failed()`` — the group of processes this rank knows to have failed (local knowledge, no
  communication); ``Comm.Ack_failed()`` acknowledges them, after which receives from ``ANY_SOURCE`` work
  again instead of raising ``ERR_PROC_FAILED_PENDING``;
- ``Comm.Revoke()`` — every pending and later operation on the communicator, on every rank, fails with
  ``ERR_REVOKED``, so that ranks blocked on a dead peer wake up;
- ``Comm.Shrink()`` — a new communicator of the survivors (collective over them, ranks renumbered);
- ``Comm.Agree(flag)`` — a fault-tolerant bitwise AND of ``flag`` over the survivors.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

__all__ = ["FailureDetector", "UlfmUnavailable", "is_failure_error", "ulfm_available"]

# How Open MPI's launcher passes ``--with-ft ulfm`` (or ``--mca mpi_ft_enable 1``) to the ranks.
_FT_ENV = "OMPI_MCA_mpi_ft_enable"
_TRUE = {"1", "true", "yes", "on", "enabled", "t", "y"}


class UlfmUnavailable(RuntimeError):
    """A ULFM operation (revoke, shrink) was asked for where the MPI library does not provide it."""


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI


def _is_open_mpi(MPI: Any) -> bool:
    try:
        return str(MPI.get_vendor()[0]) == "Open MPI"
    except Exception:  # noqa: BLE001 — an mpi4py without get_vendor: read the library's version string
        return "Open MPI" in MPI.Get_library_version()


def _ft_enabled_by_mpi_t(MPI: Any) -> bool | None:
    """The value of Open MPI's ``mpi_ft_enable`` control variable, read through MPI_T; None if unreadable.

    mpi4py does not wrap MPI_T, so the C functions are called through the library mpi4py loaded (a
    ``dlopen`` of an already-loaded file returns the same handle and does not initialize anything again).
    """
    try:
        lib = ctypes.CDLL(MPI.__file__)
        provided = ctypes.c_int()
        if lib.MPI_T_init_thread(0, ctypes.byref(provided)) != 0:
            return None
        try:
            index = ctypes.c_int()
            if lib.MPI_T_cvar_get_index(b"mpi_ft_enable", ctypes.byref(index)) != 0:
                return None
            handle, count = ctypes.c_void_p(), ctypes.c_int()
            if lib.MPI_T_cvar_handle_alloc(index, None, ctypes.byref(handle), ctypes.byref(count)) != 0:
                return None
            try:
                if count.value != 1:
                    return None
                value = (ctypes.c_ubyte * 16)()  # a C bool (1 byte) or an int: zeroed, any set byte is true
                if lib.MPI_T_cvar_read(handle, value) != 0:
                    return None
                return any(value)
            finally:
                lib.MPI_T_cvar_handle_free(ctypes.byref(handle))
        finally:
            lib.MPI_T_finalize()
    except (OSError, AttributeError):  # no such symbol or library: this MPI has no MPI_T to ask
        return None


def _ft_enabled(MPI: Any) -> bool:
    by_mpi_t = _ft_enabled_by_mpi_t(MPI)
    if by_mpi_t is not None:
        return by_mpi_t
    return os.environ.get(_FT_ENV, "").strip().lower() in _TRUE


def ulfm_available(comm: Any) -> bool:
    """Whether ULFM failure notification works on ``comm`` in this run.

    True only when all of these hold: the MPI library is Open MPI; it was built with the ``ftmpi``
    extension (``ERR_PROC_FAILED`` is a class of its own, not ``ERR_UNKNOWN``); fault tolerance is
    enabled in this run (``mpiexec --with-ft ulfm``, i.e. the ``mpi_ft_enable`` MCA parameter, read
    through MPI_T, else from ``OMPI_MCA_mpi_ft_enable``); and ``comm.Get_failed()`` answers. MPICH
    provides ``Get_failed`` but does not report a killed rank through it, so it is never taken as ULFM.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        An intracommunicator (usually ``MPI.COMM_WORLD``).

    Returns
    -------
    bool
        True if :class:`FailureDetector` will see failed ranks on ``comm``; False otherwise (use heartbeats).
    """
    MPI = _mpi()
    if not isinstance(comm, MPI.Comm) or comm == MPI.COMM_NULL:
        raise TypeError(f"ulfm_available needs an mpi4py communicator, got {comm!r}")
    if not _is_open_mpi(MPI):
        return False
    if MPI.ERR_PROC_FAILED == MPI.ERR_UNKNOWN or not hasattr(comm, "Get_failed"):
        return False
    if not _ft_enabled(MPI):
        return False
    try:
        _free(MPI, comm.Get_failed())
    except (NotImplementedError, MPI.Exception):
        return False
    return True


def _free(MPI: Any, group: Any) -> None:
    if group not in (MPI.GROUP_EMPTY, MPI.GROUP_NULL):
        group.Free()


def is_failure_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an MPI error that ULFM raises because a process failed or ``comm`` was revoked.

    Those are ``ERR_PROC_FAILED`` (an operation involved a failed rank — also raised by a probe or receive
    from ``ANY_SOURCE`` while a failure is not yet acknowledged), ``ERR_PROC_FAILED_PENDING`` (a
    non-blocking ``ANY_SOURCE`` receive that may still match) and ``ERR_REVOKED``. Always False for an MPI
    without ULFM (where mpi4py maps those classes onto ``ERR_UNKNOWN``) and for anything but
    :class:`mpi4py.MPI.Exception`.

    Parameters
    ----------
    exc : BaseException
        The exception caught around an MPI call.

    Returns
    -------
    bool
        True if the caller should run :meth:`FailureDetector.poll` (which acknowledges) and go on.
    """
    MPI = _mpi()
    if not isinstance(exc, MPI.Exception) or MPI.ERR_PROC_FAILED == MPI.ERR_UNKNOWN:
        return False
    return exc.Get_error_class() in (MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED)


class FailureDetector:
    """Non-blocking detection of failed ranks on a communicator, plus revoke/shrink and agreement.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        The communicator to watch (its error handler is set to ``MPI.ERRORS_RETURN``, so that an
        operation involving a failed rank raises :class:`mpi4py.MPI.Exception` instead of aborting).

    Attributes
    ----------
    comm : mpi4py.MPI.Comm
        The communicator being watched.
    enabled : bool
        :func:`ulfm_available` on ``comm``: False under MPICH, where :meth:`poll` always returns an empty set.
    failed : set of int
        Every rank of ``comm`` known (by this rank) to have failed so far.

    Notes
    -----
    Within milliseconds of a death, on *every* surviving rank, ``comm.Iprobe(source=ANY_SOURCE)`` (and any
    receive from ``ANY_SOURCE``) starts raising ``ERR_PROC_FAILED`` and keeps doing so until that rank
    acknowledges the failure. :meth:`poll` acknowledges what it reports (``Ack_failed``), so every rank
    that probes ``ANY_SOURCE`` on ``comm`` needs a detector of its own on that same communicator, and
    probes with :meth:`iprobe` (or calls :meth:`poll` when its probe raises, see :func:`is_failure_error`).
    Whoever polled, :attr:`failed` holds every failure seen, so a consumer that must not miss one reads
    ``failed`` rather than only what its own :meth:`poll` returned. A point-to-point operation naming a failed rank
    (a send to it, a receive of bytes it had not finished sending) raises ``ERR_PROC_FAILED`` for ever:
    do not address ranks in :attr:`failed`.
    """

    def __init__(self, comm: Any) -> None:
        MPI = _mpi()
        if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
            raise TypeError(f"FailureDetector needs an mpi4py intracommunicator (e.g. MPI.COMM_WORLD), got {comm!r}")
        self._MPI = MPI
        self.comm = comm
        comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.enabled = ulfm_available(comm)
        self.failed: set[int] = set()
        self._group = comm.Get_group()

    # ---- detection ----------------------------------------------------------------------------------------
    def poll(self) -> set[int]:
        """The ranks of ``comm`` newly known to have failed since the last call (non-blocking, local).

        Returns
        -------
        set of int
            Ranks not reported before; empty when nothing new failed, and always empty without ULFM.
        """
        if not self.enabled:
            return set()
        self._nudge()
        known = self._known_failed()
        new = known - self.failed
        if new:
            self.failed |= new
            self.comm.Ack_failed()
        return new

    def iprobe(self, status: Any = None) -> bool:
        """``comm.Iprobe(source=ANY_SOURCE, tag=ANY_TAG, status=status)`` that survives failed ranks.

        Under ULFM a plain probe from ``ANY_SOURCE`` raises ``ERR_PROC_FAILED`` on every survivor from the
        moment a failure is known until it is acknowledged; this one then runs :meth:`poll` (which
        acknowledges and adds the ranks to :attr:`failed`) and probes again. A drop-in for the probe of a
        receive loop; the caller learns of the failure from :attr:`failed`.

        Parameters
        ----------
        status : mpi4py.MPI.Status, optional
            Filled with the source and tag of the pending message, if there is one.

        Returns
        -------
        bool
            Whether a message is waiting.
        """
        MPI = self._MPI
        for _ in range(self.comm.Get_size() + 1):  # each retry follows a newly acknowledged failure
            try:
                return bool(self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status))
            except MPI.Exception as exc:
                if not self.enabled or not is_failure_error(exc) or exc.Get_error_class() == MPI.ERR_REVOKED:
                    raise
                if not self.poll():
                    raise
        raise RuntimeError("probe kept failing: more new failures than ranks")

    def _nudge(self) -> None:
        """Let MPI progress (a probe that receives nothing), so that failure notices are taken in."""
        MPI = self._MPI
        try:
            self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
        except MPI.Exception as exc:  # the unacknowledged failure that poll() is about to report
            if not is_failure_error(exc):
                raise

    def _known_failed(self) -> set[int]:
        MPI = self._MPI
        group = self.comm.Get_failed()
        try:
            size = group.Get_size()
            if size == 0:
                return set()
            ranks = MPI.Group.Translate_ranks(group, list(range(size)), self._group)
        finally:
            _free(MPI, group)
        return {r for r in ranks if r != MPI.UNDEFINED}

    # ---- recovery -----------------------------------------------------------------------------------------
    def shrink(self) -> Any:
        """Revoke ``comm`` and return a new communicator of its surviving ranks.

        Collective over the survivors: every surviving rank must call it (revoking wakes up ranks blocked
        in an operation on ``comm``, which then raise ``ERR_REVOKED`` and should call :meth:`shrink` too).
        The new communicator renumbers the ranks; its error handler is ``ERRORS_RETURN``. ``comm`` is
        unusable afterwards.

        Returns
        -------
        mpi4py.MPI.Intracomm
            The survivors' communicator.

        Raises
        ------
        UlfmUnavailable
            Without ULFM (e.g. under MPICH): run under Open MPI 5 with ``mpiexec --with-ft ulfm``.
        """
        if not self.enabled:
            raise UlfmUnavailable("shrink needs ULFM: run under Open MPI 5 with 'mpiexec --with-ft ulfm' "
                                  "(without it, a dead rank can only be detected and avoided, not removed)")  # fmt: skip
        MPI = self._MPI
        self.poll()
        if not self.comm.Is_revoked():
            self.comm.Revoke()
        survivors = self.comm.Shrink()
        survivors.Set_errhandler(MPI.ERRORS_RETURN)
        return survivors

    def agree(self, flag: int) -> int:
        """The bitwise AND of ``flag`` over the surviving ranks of ``comm`` (collective over them).

        Under ULFM a failure not yet acknowledged makes ``Agree`` raise ``ERR_PROC_FAILED``; the failures
        are then acknowledged (and added to :attr:`failed`) and the agreement is run again, until it
        completes. Without ULFM it is an ``Allreduce`` with ``BAND`` (which needs every rank alive).

        Parameters
        ----------
        flag : int
            A non-negative integer that fits in a C ``int``.

        Returns
        -------
        int
            The agreed value, the same on every surviving rank.
        """
        if isinstance(flag, bool) or not isinstance(flag, int) or not 0 <= flag < 2**31:
            raise ValueError(f"agree needs a non-negative integer below 2**31, got {flag!r}")
        MPI = self._MPI
        if not self.enabled:
            return int(self.comm.allreduce(flag, op=MPI.BAND))
        for _ in range(self.comm.Get_size() + 1):
            try:
                return int(self.comm.Agree(flag))
            except MPI.Exception as exc:
                if not is_failure_error(exc) or exc.Get_error_class() == MPI.ERR_REVOKED:
                    raise
                self.failed |= self._known_failed()
                self.comm.Ack_failed()
        raise RuntimeError(f"agreement on {flag} did not complete after {self.comm.Get_size() + 1} tries, "
                           "each interrupted by a new failure")  # fmt: skip

    def free(self) -> None:
        """Release the group this detector holds (the communicator is the caller's)."""
        _free(self._MPI, self._group)
        self._group = self._MPI.GROUP_NULL
