"""A one-rank stand-in for an MPI communicator, for jobs run without mpi4py (a notebook, a single process).

The collectives behave as on a communicator of one rank: ``bcast`` and ``allreduce`` return their value,
``scatter`` the first item, ``gather`` a one-item list, ``Barrier`` returns at once.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SelfComm"]


class SelfComm:
    """The communicator of a job that is its only rank."""

    rank, size = 0, 1

    def Get_rank(self) -> int:  # noqa: N802 (MPI's name)
        return 0

    def Get_size(self) -> int:  # noqa: N802 (MPI's name)
        return 1

    def Barrier(self) -> None:  # noqa: N802 (MPI's name)
        pass

    def bcast(self, value: Any, root: int = 0) -> Any:
        return value

    def allreduce(self, value: Any) -> Any:
        return value

    def scatter(self, values: Any, root: int = 0) -> Any:
        return values[0]

    def gather(self, value: Any, root: int = 0) -> list:
        return [value]
