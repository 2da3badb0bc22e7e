"""Each rank's place in the night's layout at run time: its roles and its MPI communicators.

:func:`split_roles` splits the world once, collectively, by the layout of :mod:`lsstpipe.runtime.layout`:
a communicator per primary role, one over every worker (focal-plane collectives) and one per worker string
(the ranks that take a visit together). Only this module and the roles' loops touch MPI; the layout itself is
plain data, the same on every rank and in the tools that write launch files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lsstpipe.runtime.layout import LayoutError, NightLayout, Pair, Role

__all__ = ["RankContext", "split_roles"]


@dataclass(frozen=True)
class RankContext:
    """What one rank knows after :func:`split_roles`: its roles and its communicators."""

    layout: NightLayout
    world: Any
    rank: int
    roles: tuple[Role, ...]
    role_comm: Any
    """The ranks with the same primary role (``COMM_WORLD.Split(color=role, key=rank)``)."""
    workers: Any
    """Every worker rank of every string (focal-plane collectives); ``MPI.COMM_NULL`` on other ranks."""
    string: Any
    """The workers of this rank's string, which take one visit together; ``MPI.COMM_NULL`` elsewhere."""

    @property
    def role(self) -> Role:
        return self.roles[0]

    def has(self, role: Role) -> bool:
        """Whether this rank plays ``role``."""
        return role in self.roles

    @property
    def pair(self) -> Pair | None:
        return self.layout.pair_of(self.rank)

    def free(self) -> None:
        """Free the communicators (collective over the world, like their creation)."""
        for comm in (self.string, self.workers, self.role_comm):
            if comm != _mpi().COMM_NULL:
                comm.Free()


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI


def split_roles(comm: Any, layout: NightLayout) -> RankContext:
    """Split ``comm`` into per-role communicators for ``layout`` (collective over ``comm``).

    Before any collective, every rank checks that the world has ``layout.size`` ranks, so a wrong world
    raises the same :class:`LayoutError` on every rank instead of hanging. Then the ranks compare layout
    digests (one ``allgather``) so ranks that computed different layouts also fail together.
    """
    if comm.Get_size() != layout.size:
        raise LayoutError(
            f"the world has {comm.Get_size()} ranks but the {layout.camera} layout needs {layout.size}: start "
            f"the job with -n {layout.size}, or compute the layout with layout_for_world(camera, {comm.Get_size()})"
        )
    MPI = _mpi()
    digests = comm.allgather(layout.digest())
    if len(set(digests)) != 1:
        raise LayoutError(f"ranks computed different layouts (digests {sorted(set(digests))}); give every rank "
                          "the same camera and layout configuration")  # fmt: skip
    rank = comm.Get_rank()
    info = layout.ranks[rank]
    role_comm = comm.Split(color=int(info.role), key=rank)
    is_worker = Role.WORKER in info.roles
    workers = comm.Split(color=0 if is_worker else MPI.UNDEFINED, key=rank)
    string = comm.Split(color=info.string if is_worker and info.string is not None else MPI.UNDEFINED, key=rank)
    return RankContext(layout, comm, rank, info.roles, role_comm, workers, string)
