"""One rank's mailbox: small messages pickled, bytes as raw buffers, delivery to itself without MPI.

A rank of a scaled layout plays several roles (rank 0 may be the DMCS, a replicator and a distributor),
so a message may be addressed to the sender's own rank: :class:`Postman` queues it locally instead of
sending it (a large ``Send`` to oneself would deadlock). Bytes (a raft image, a CCD's segments) follow
their header from the same sender under :attr:`~lsstpipe.runtime.messages.Tag.DATA`; MPI keeps messages
from one sender in order, so the receiver takes them with a ``Recv`` right after the header.

Ranks that the night has given up on (dead, or cut off by an injected fault) are in :attr:`Postman.dead`:
nothing is sent to them; what still comes from one is delivered (the DMCS then knows it was alive). Under ULFM a failed peer raises an MPI error
that :meth:`Postman.send` turns into :class:`PeerLost`.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lsstpipe.runtime.messages import Payload, Tag, expect, tag_of

__all__ = ["Envelope", "PeerLost", "Postman"]


class PeerLost(RuntimeError):
    """A message could not reach a rank that MPI reports failed (or that the night declared dead)."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


class Envelope:
    """A received message: its payload, sender and tag, and its bytes when it carried some."""

    __slots__ = ("data", "payload", "source", "tag")

    def __init__(self, payload: Payload, source: int, tag: Tag, data: np.ndarray | None = None) -> None:
        self.payload = payload
        self.source = source
        self.tag = tag
        self.data = data

    def __repr__(self) -> str:
        extra = f", {self.data.nbytes} bytes" if self.data is not None else ""
        return f"Envelope({type(self.payload).__name__} from {self.source}{extra})"


class Postman:
    """Send and receive the night's messages on ``comm`` for the rank ``comm.Get_rank()``.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        The world communicator (its error handler is set to return errors, so a failed peer raises).
    """

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.dead: set[int] = set()
        self._local: collections.deque[Envelope] = collections.deque()
        self._held: collections.deque[Envelope] = collections.deque()
        self.bytes_sent = 0
        self.bytes_received = 0
        try:
            comm.Set_errhandler(MPI.ERRORS_RETURN)
        except Exception:  # noqa: BLE001 — a communicator that cannot take one keeps the default
            pass
        from lsstpipe.runtime.ulfm import FailureDetector

        self.detector = FailureDetector(comm)
        """ULFM's failure reports under Open MPI 5 (``--with-ft ulfm``); inert under MPICH."""

    # ---- sending ------------------------------------------------------------------------------------------
    def send(self, payload: Payload, dest: int, data: np.ndarray | bytes | None = None) -> None:
        """Send ``payload`` (and ``data`` right after it, under ``Tag.DATA``) to ``dest``.

        Raises
        ------
        PeerLost
            ``dest`` is dead (declared, or reported failed by MPI).
        """
        if dest in self.dead:
            raise PeerLost(dest, f"rank {dest} is out of the night (dead or cut off); not sending "
                                 f"{type(payload).__name__}")  # fmt: skip
        buf = None if data is None else np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
        if buf is not None and buf.dtype != np.uint8:
            buf = buf.view(np.uint8).reshape(-1)
        if dest == self.rank:
            self._local.append(Envelope(payload, dest, tag_of(payload), None if buf is None else buf.copy()))
            return
        try:
            self.comm.send(payload, dest=dest, tag=int(tag_of(payload)))
            if buf is not None:
                self.comm.Send([buf, self.MPI.BYTE], dest=dest, tag=int(Tag.DATA))
                self.bytes_sent += buf.nbytes
        except self.MPI.Exception as exc:
            raise PeerLost(dest, f"sending {type(payload).__name__} to rank {dest} failed: {exc}") from exc

    # ---- receiving ----------------------------------------------------------------------------------------
    def poll(self) -> Envelope | None:
        """The next message for this rank (held, local, then MPI), or None when there is none now."""
        if self._held:
            return self._held.popleft()
        if self._local:
            return self._local.popleft()
        return self._probe()

    def _probe(self) -> Envelope | None:
        status = self.MPI.Status()
        while self.detector.iprobe(status):  # an ANY_SOURCE probe that survives failures under ULFM
            env = self._receive(status.Get_source(), status.Get_tag())
            if env is not None:
                return env
        return None

    def _receive(self, source: int, tag: int) -> Envelope | None:
        try:
            return self._receive_from(source, tag)
        except self.MPI.Exception as exc:
            from lsstpipe.runtime.ulfm import is_failure_error

            if not is_failure_error(exc):
                raise
            self.detector.poll()
            self.dead.add(source)  # died between a header and its bytes
            return None

    def _receive_from(self, source: int, tag: int) -> Envelope | None:
        if tag == Tag.DATA:  # bytes without a header we were waiting for: a sender that died mid-message
            status = self.MPI.Status()
            self.comm.Probe(source=source, tag=tag, status=status)
            self.comm.Recv([np.empty(status.Get_count(self.MPI.BYTE), np.uint8), self.MPI.BYTE], source, tag)
            return None
        payload = expect(tag, self.comm.recv(source=source, tag=tag))
        data = None
        nbytes = int(getattr(payload, "nbytes", 0)) if tag in (Tag.IMAGE, Tag.CCD_DATA) else 0
        if nbytes:
            data = np.empty(nbytes, np.uint8)
            self.comm.Recv([data, self.MPI.BYTE], source=source, tag=int(Tag.DATA))
            self.bytes_received += nbytes
        return Envelope(payload, source, Tag(tag), data)  # from a rank presumed dead too: it may be alive

    def wait_for(self, match: Callable[[Envelope], bool], timeout: float,
                 idle: Callable[[], None] | None = None) -> Envelope | None:  # fmt: skip
        """Receive until a message satisfies ``match``; others are held for :meth:`poll` in arrival order.

        Returns None after ``timeout`` seconds without a match. ``idle`` runs between looks (heartbeats).
        """
        end = time.monotonic() + timeout
        skipped: list[Envelope] = []
        pause = 0.0002
        try:
            while True:
                env = self._next_unheld()
                if env is not None:
                    if match(env):
                        return env
                    skipped.append(env)
                    pause = 0.0002
                    continue
                if time.monotonic() >= end:
                    return None
                if idle is not None:
                    idle()
                time.sleep(pause)
                pause = min(pause * 2, 0.005)
        finally:
            self._held.extend(skipped)

    def _next_unheld(self) -> Envelope | None:
        if self._local:
            return self._local.popleft()
        return self._probe()
