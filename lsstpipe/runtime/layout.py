"""The rank layout of the observing night on MPI (LDM-230 §2.3–2.4): which rank plays which role.

The full layout, in rank order (every role a contiguous range, so one ``srun --multi-prog`` line each):

- rank 0 — the :attr:`Role.DMCS` (Base and Archive DMCS roles, the only rank that talks to the OCS);
- ``P`` replicators, then their ``P`` distributors: replicator ``k`` is paired with distributor ``k``.
  ``P`` is one pair per science raft plus one for the wavefront sensors, plus hot spares (21 + 1 + 3 = 25
  on LSSTCam, as LDM-230 suggests; 2 + 1 + 1 = 4 on ``mini``). Each pair starts in the fully-operational
  pool unless the configuration lists it as local-only (its distributor cannot be reached at boot);
- the Catch-Up Archiver's own pairs: ``C`` catch-up replicators, then their ``C`` distributors;
- ``S`` worker strings of ``W`` workers each (a string takes a whole visit while the other still processes
  the last one: ``W`` ≥ 189 + 4 on LSSTCam, one per CCD and wavefront sensor; 19 on ``mini``);
- spare workers, which take over the jobs of dead workers.

A *scaled* layout (:func:`scaled_layout`) fits the night into a small world of ``K`` ranks, where ranks
may play several roles (the first is the rank's primary role, its colour in
:func:`~lsstpipe.runtime.ranks.split_roles`):

- ``K = 1``: rank 0 does everything (DMCS, replicator, distributor, catch-up, worker);
- ``K = 2, 3``: rank 0 is DMCS + replicator + distributor + catch-up; the others are workers (two
  strings of one worker at ``K = 3``);
- ``K ≥ 4``: rank 0 is the DMCS, ranks 1 and 2 a replicator/distributor pair, rank 3 a worker; the
  remaining ``K - 4`` ranks are handed out one unit at a time — a worker, a pair (2 ranks), a spare worker
  or a catch-up pair (2 ranks) — always to the pool that is least full relative to the full layout (ties
  go in that order), never beyond the full layout's counts. While there is no catch-up pair, catch-up runs
  on pair 0's ranks. Every role gets a rank of its own from ``K = 7`` on.

:func:`layout_for_world` picks the full layout when the world is exactly its size and a scaled one when
the world is smaller, so the same function gives the same layout under ``mpiexec`` and ``srun
--multi-prog`` (:func:`multi_prog`).
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from lsstpipe.camera.geometry import Camera, get_camera
from lsstpipe.control.config import Pool


class LayoutError(ValueError):
    """A layout configuration that cannot be built, or a world that does not fit the layout."""


_S = TypeVar("_S")


class Role(enum.IntEnum):
    """What a rank does during the night. The value is the colour of the rank in ``COMM_WORLD.Split``."""

    DMCS = 0
    """Rank 0: the Base DMCS (OCS commands and events, scheduling) and the Archive DMCS (which distributor
    holds which raft)."""

    REPLICATOR = 1
    """A Base-side replicator: fetches raft images from the CDS, stores them locally, sends them to its
    paired distributor."""

    DISTRIBUTOR = 2
    """An Archive-side distributor: receives its replicator's images, archives them, cuts rafts into CCDs
    and serves workers."""

    CATCHUP = 3
    """A Catch-Up Archiver rank (its own replicator/distributor pairs): archives images missed in real
    time from the CDS buffer and the network outage buffer."""

    WORKER = 4
    """A worker of a worker string: runs one CCD or wavefront-sensor job per visit."""

    SPARE = 5
    """A spare worker: idle until the job of a dead worker is rescheduled on it."""


@dataclass(frozen=True, kw_only=True)
class LayoutConfig:
    """How many ranks each pool gets. ``None`` means "derived from the camera" as documented per field."""

    spare_pairs: int | None = None
    """Hot-spare replicator/distributor pairs beyond one per raft job; default ceil(jobs / 8): 3 on LSSTCam
    (25 pairs), 1 on ``mini``."""

    catchup_pairs: int | None = None
    """Replicator/distributor pairs of the Catch-Up Archiver; default ceil(jobs / 6): 4 on LSSTCam, 1 on
    ``mini``."""

    worker_strings: int = 2
    """Worker strings: one takes the current visit while another finishes the last one."""

    workers_per_string: int | None = None
    """Workers per string, at least one per CCD and wavefront sensor; default exactly that (193 on
    LSSTCam, 19 on ``mini``)."""

    spare_workers: int | None = None
    """Spare workers; default ceil(string workers / 28): 14 on LSSTCam (400 workers in all), 2 on ``mini``."""

    local_only: tuple[int, ...] = ()
    """Indices of pairs that start in the local-only pool (their distributor cannot be reached at boot)."""

    def __post_init__(self) -> None:
        for name in ("spare_pairs", "catchup_pairs", "spare_workers"):
            _check_int(name, getattr(self, name), 0, optional=True)
        _check_int("worker_strings", self.worker_strings, 1)
        _check_int("workers_per_string", self.workers_per_string, 1, optional=True)
        if not isinstance(self.local_only, tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.local_only
        ):
            raise LayoutError(f"local_only must be a list of pair indices (integers ≥ 0), not {self.local_only!r}")
        if len(set(self.local_only)) != len(self.local_only):
            raise LayoutError(f"local_only lists a pair twice: {list(self.local_only)}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> LayoutConfig:
        """A configuration from a YAML/JSON mapping (:func:`settings_from_mapping`); unknown keys are errors."""
        return settings_from_mapping(cls, data, "layout")


def settings_from_mapping(cls: type[_S], data: object, section: str, error: type[Exception] = LayoutError) -> _S:
    """A settings dataclass ``cls`` from a YAML/JSON mapping of its fields; unknown keys are errors.

    The one validator of the night's configuration sections (``layout`` here; ``archive``, ``worker`` and
    ``scheduler`` in :func:`lsstpipe.runtime.night.validate_config`). Lists become tuples (YAML has none);
    ``cls.__post_init__`` range-checks the values. An error of ``cls`` other than ``error`` is raised again
    as ``error``, prefixed by ``section``: every message names the setting, the value and what is allowed.
    """
    if not isinstance(data, Mapping):
        raise error(f"{section} must be a mapping of settings to values (write {{}} for the defaults), "
                    f"not {type(data).__name__} {data!r}")  # fmt: skip
    known = {f.name for f in fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise error(f"unknown {section} setting(s) {', '.join(unknown)}; settings are {', '.join(sorted(known))}")
    values = {str(k): tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, error):
            raise
        raise error(f"{section}: {exc}") from exc


def _check_int(name: str, value: object, least: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise LayoutError(f"{name} must be an integer ≥ {least}{' or null' if optional else ''}, not {value!r}")


@dataclass(frozen=True)
class Pair:
    """A replicator and its distributor (the same rank for both in the smallest scaled layouts)."""

    index: int
    replicator: int
    distributor: int
    pool: Pool
    """Initial pool: fully-operational or local-only for the Archiver's pairs, catch-up for the others."""
    hot_spare: bool = False
    """Beyond the one pair per raft job: used when a pair fails or the fully-operational pool runs short."""


@dataclass(frozen=True)
class RankInfo:
    """One rank of the layout: its roles (primary first), its pair and its worker string."""

    rank: int
    roles: tuple[Role, ...]
    pair: int | None = None
    """Index of the Archiver pair this rank is a side of."""
    catchup_pair: int | None = None
    """Index of the catch-up pair this rank is a side of."""
    string: int | None = None
    """Worker string of a worker rank."""

    @property
    def role(self) -> Role:
        """The primary role: the rank's colour when COMM_WORLD is split."""
        return self.roles[0]


@dataclass(frozen=True)
class NightLayout:
    """The validated assignment of every rank of the night's world to its roles."""

    camera: str
    ranks: tuple[RankInfo, ...]
    pairs: tuple[Pair, ...]
    catchup_pairs: tuple[Pair, ...]
    strings: tuple[tuple[int, ...], ...]
    spare_workers: tuple[int, ...]
    jobs_per_exposure: int
    """Replicator jobs per exposure: one per science raft plus one for the wavefront sensors."""
    detectors_per_visit: int
    """Worker jobs per visit: one per CCD and wavefront sensor."""
    scaled: bool = False
    _by_role: dict[Role, tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.ranks or [r.rank for r in self.ranks] != list(range(len(self.ranks))):
            raise LayoutError("layout ranks must be numbered 0, 1, 2, … without gaps")
        if self.ranks[0].role is not Role.DMCS:
            raise LayoutError("rank 0 must be the DMCS")
        by_role = {role: tuple(r.rank for r in self.ranks if role in r.roles) for role in Role}
        object.__setattr__(self, "_by_role", by_role)
        for role in (Role.DMCS, Role.REPLICATOR, Role.DISTRIBUTOR, Role.CATCHUP, Role.WORKER):
            if not by_role[role]:
                raise LayoutError(f"no rank plays the {role.name} role")
        if len(by_role[Role.DMCS]) != 1:
            raise LayoutError("exactly one rank is the DMCS")
        for pairs, side in (
            (self.pairs, (Role.REPLICATOR, Role.DISTRIBUTOR)),
            (self.catchup_pairs, (Role.CATCHUP,) * 2),
        ):
            if not pairs:
                raise LayoutError("a layout needs at least one pair of each kind")
            for k, p in enumerate(pairs):
                if (
                    p.index != k
                    or side[0] not in self.roles_of(p.replicator)
                    or side[1] not in self.roles_of(p.distributor)
                ):
                    raise LayoutError(f"pair {p} does not match the ranks' roles")
        if any(
            self.ranks[p.replicator].pair != k or self.ranks[p.distributor].pair != k for k, p in enumerate(self.pairs)
        ):
            raise LayoutError("the ranks of each pair must name that pair")
        if any(self.ranks[w].string != k for k, s in enumerate(self.strings) for w in s):
            raise LayoutError("the ranks of each worker string must name that string")
        strung = [w for s in self.strings for w in s]
        if not self.strings or any(not s for s in self.strings) or sorted(strung) != list(by_role[Role.WORKER]):
            raise LayoutError("every worker rank belongs to exactly one non-empty worker string")
        if tuple(self.spare_workers) != by_role[Role.SPARE]:
            raise LayoutError("spare_workers must list the SPARE ranks")

    @property
    def size(self) -> int:
        """Ranks in the world this layout needs."""
        return len(self.ranks)

    def roles_of(self, rank: int) -> tuple[Role, ...]:
        """The roles of ``rank``, primary first."""
        if not 0 <= rank < len(self.ranks):
            raise LayoutError(f"rank {rank} is outside this layout of {len(self.ranks)} ranks")
        return self.ranks[rank].roles

    def ranks_of(self, role: Role) -> tuple[int, ...]:
        """Every rank that plays ``role`` (as primary role or not), in rank order."""
        return self._by_role[role]

    def counts(self) -> dict[Role, int]:
        """How many ranks play each role."""
        return {role: len(self._by_role[role]) for role in Role}

    def pair_of(self, rank: int) -> Pair | None:
        """The Archiver pair ``rank`` is a side of, if any."""
        k = self.ranks[rank].pair
        return None if k is None else self.pairs[k]

    def digest(self) -> str:
        """A short hash of the layout, equal on every rank that computed the same layout."""
        text = repr((self.camera, self.ranks, self.pairs, self.catchup_pairs, self.strings, self.spare_workers))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """One line per role: how many ranks and which."""
        lines = [f"night layout for {self.camera}: {self.size} ranks{' (scaled)' if self.scaled else ''}"]
        for role, ranks in self._by_role.items():
            lines.append(f"  {role.name.lower():<11} {len(ranks):>4}  {_ranges(ranks) or '-'}")
        return "\n".join(lines)


def _ranges(ranks: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` → ``"1-3,7"``."""
    out: list[str] = []
    for r in sorted(ranks):
        if out and int(out[-1].split("-")[-1]) == r - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ",".join(out)


@dataclass(frozen=True)
class _Counts:
    pairs: int
    catchup: int
    per_string: tuple[int, ...]
    spares: int


def _camera(camera: Camera | str) -> Camera:
    return get_camera(camera) if isinstance(camera, str) else camera


def _full_counts(cam: Camera, config: LayoutConfig) -> _Counts:
    jobs, dets = _jobs_and_dets(cam)
    spare_pairs = math.ceil(jobs / 8) if config.spare_pairs is None else config.spare_pairs
    catchup = math.ceil(jobs / 6) if config.catchup_pairs is None else config.catchup_pairs
    per_string = dets if config.workers_per_string is None else config.workers_per_string
    if per_string < dets:
        raise LayoutError(
            f"workers_per_string = {per_string} is too small: a string takes a whole visit of camera {cam.name}, "
            f"one worker per CCD and wavefront sensor ({dets}); set it to at least {dets} or leave it out"
        )
    if catchup < 1:
        raise LayoutError("catchup_pairs must be at least 1: the Catch-Up Archiver needs its own pair")
    workers = config.worker_strings * per_string
    spares = math.ceil(workers / 28) if config.spare_workers is None else config.spare_workers
    bad = [k for k in config.local_only if k >= jobs + spare_pairs]
    if bad:
        raise LayoutError(f"local_only names pair(s) {bad} but the layout has pairs 0…{jobs + spare_pairs - 1}")
    return _Counts(jobs + spare_pairs, catchup, (per_string,) * config.worker_strings, spares)


def _jobs_and_dets(cam: Camera) -> tuple[int, int]:
    return len(cam.science_rafts) + (1 if cam.wavefront else 0), len(cam.detectors)


def _pool(k: int, config: LayoutConfig) -> Pool:
    return Pool.LOCAL_ONLY if k in config.local_only else Pool.FULLY_OPERATIONAL


def _assemble(cam: Camera, config: LayoutConfig, counts: _Counts, scaled: bool) -> NightLayout:
    """Lay out a world with separate ranks for every role, in the documented order."""
    jobs, dets = _jobs_and_dets(cam)
    p, c = counts.pairs, counts.catchup
    roles: list[tuple[Role, ...]] = [(Role.DMCS,)]
    info: dict[int, dict[str, int]] = {}
    first_rep, first_dist = 1, 1 + p
    pairs = tuple(Pair(k, first_rep + k, first_dist + k, _pool(k, config), k >= jobs) for k in range(p))
    for k in range(p):
        info[first_rep + k], info[first_dist + k] = {"pair": k}, {"pair": k}
    roles += [(Role.REPLICATOR,)] * p + [(Role.DISTRIBUTOR,)] * p
    if c:
        base = 1 + 2 * p
        catchup = tuple(Pair(k, base + k, base + c + k, Pool.CATCHUP) for k in range(c))
        for k in range(c):
            info[base + k], info[base + c + k] = {"catchup_pair": k}, {"catchup_pair": k}
        roles += [(Role.CATCHUP,)] * (2 * c)
    else:  # catch-up runs on pair 0's ranks (a scaled world)
        catchup = (Pair(0, pairs[0].replicator, pairs[0].distributor, Pool.CATCHUP),)
        for r in (pairs[0].replicator, pairs[0].distributor):
            roles[r] += (Role.CATCHUP,)
            info[r]["catchup_pair"] = 0
    strings = []
    for s, n in enumerate(counts.per_string):
        start = len(roles)
        strings.append(tuple(range(start, start + n)))
        for r in strings[-1]:
            info[r] = {"string": s}
        roles += [(Role.WORKER,)] * n
    spares = tuple(range(len(roles), len(roles) + counts.spares))
    roles += [(Role.SPARE,)] * counts.spares
    ranks = tuple(RankInfo(r, roles[r], **info.get(r, {})) for r in range(len(roles)))
    return NightLayout(cam.name, ranks, pairs, catchup, tuple(strings), spares, jobs, dets, scaled)


def full_layout(camera: Camera | str, config: LayoutConfig | None = None) -> NightLayout:
    """The production layout of ``camera`` (see the module docstring): 25 pairs and 2 × 193 workers on LSSTCam."""
    cam = _camera(camera)
    config = config or LayoutConfig()
    return _assemble(cam, config, _full_counts(cam, config), scaled=False)


def _split_strings(workers: int, strings: int) -> tuple[int, ...]:
    n = max(1, min(strings, workers))
    return tuple(workers // n + (1 if s < workers % n else 0) for s in range(n))


def scaled_layout(camera: Camera | str, world_size: int, config: LayoutConfig | None = None) -> NightLayout:
    """A layout of ``world_size`` ranks for a small world, by the policy in the module docstring."""
    cam = _camera(camera)
    config = config or LayoutConfig()
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise LayoutError(f"the world needs at least 1 rank, not {world_size!r}")
    full = _full_counts(cam, config)
    jobs, dets = _jobs_and_dets(cam)
    if world_size <= 3:
        head = (Role.DMCS, Role.REPLICATOR, Role.DISTRIBUTOR, Role.CATCHUP)
        workers = world_size - 1
        ranks = [RankInfo(0, head + ((Role.WORKER,) if workers == 0 else ()), pair=0, catchup_pair=0,
                          string=0 if workers == 0 else None)]  # fmt: skip
        per = _split_strings(workers, config.worker_strings) if workers else ()
        strings = []
        for s, n in enumerate(per):
            strings.append(tuple(range(len(ranks), len(ranks) + n)))
            ranks += [RankInfo(r, (Role.WORKER,), string=s) for r in strings[-1]]
        strings = strings or [(0,)]
        return NightLayout(
            cam.name, tuple(ranks), (Pair(0, 0, 0, _pool(0, config), False),), (Pair(0, 0, 0, Pool.CATCHUP),),
            tuple(strings), (), jobs, dets, scaled=True,
        )  # fmt: skip
    # K ≥ 4: one pair and one worker, then fill the least-full pool one unit at a time.
    have = {"worker": 1, "pair": 1, "spare": 0, "catchup": 0}
    limit = {"worker": sum(full.per_string), "pair": full.pairs, "catchup": full.catchup, "spare": full.spares}
    cost = {"worker": 1, "pair": 2, "catchup": 2, "spare": 1}
    left = world_size - 4
    if world_size > 1 + 2 * full.pairs + 2 * full.catchup + limit["worker"] + full.spares:
        raise LayoutError(f"world of {world_size} ranks is larger than the full layout; use full_layout")
    while left > 0:
        fits = [u for u in have if have[u] < limit[u] and cost[u] <= left]
        if not fits:
            raise LayoutError(f"cannot place {left} rank(s) of a {world_size}-rank world: every pool is full")
        unit = min(fits, key=lambda u: (have[u] / limit[u], list(have).index(u)))
        have[unit] += 1
        left -= cost[unit]
    counts = _Counts(have["pair"], have["catchup"], _split_strings(have["worker"], config.worker_strings),
                     have["spare"])  # fmt: skip
    return _assemble(cam, config, counts, scaled=True)


def layout_for_world(camera: Camera | str, world_size: int, config: LayoutConfig | None = None) -> NightLayout:
    """The full layout if ``world_size`` is its size, otherwise the scaled layout of ``world_size`` ranks."""
    full = full_layout(camera, config)
    if world_size == full.size:
        return full
    if isinstance(world_size, int) and world_size > full.size:
        raise LayoutError(
            f"the world has {world_size} ranks but the full {full.camera} layout needs {full.size}: run with "
            f"-n {full.size}, or give the extra ranks a role (e.g. spare_workers = "
            f"{world_size - full.size + len(full.spare_workers)})"
        )
    return scaled_layout(camera, world_size, config)


_SAFE_PROGRAM = re.compile(r"^[A-Za-z0-9_./:,=@%+ -]+$")


def multi_prog(layout: NightLayout, program: str | Mapping[Role, str], path: str | Path | None = None) -> str:
    """An ``srun --multi-prog`` configuration that runs ``layout``: one line per range of ranks with the same roles.

    Parameters
    ----------
    layout
        The night's layout; ``srun`` must start exactly ``layout.size`` tasks.
    program
        Either one command line, to which ``--role ROLES`` is appended (roles joined by ``+``, primary
        first, e.g. ``--role dmcs+replicator+distributor+catchup``), or a command line per primary role.
    path
        Where to write the configuration (also returned).

    Raises
    ------
    LayoutError
        A command line that is empty, not shell-safe, or missing for a role of the layout.
    """
    groups: list[tuple[tuple[Role, ...], list[int]]] = []
    for info in layout.ranks:
        if groups and groups[-1][0] == info.roles:
            groups[-1][1].append(info.rank)
        else:
            groups.append((info.roles, [info.rank]))
    lines = [f"# srun --multi-prog configuration: {layout.camera} night, {layout.size} tasks, layout {layout.digest()}"]
    for roles, ranks in groups:
        if isinstance(program, str):
            line = f"{program.strip()} --role {'+'.join(r.name.lower() for r in roles)}"
        else:
            if roles[0] not in program:
                raise LayoutError(f"no program line for role {roles[0].name.lower()} (ranks {_ranges(ranks)})")
            line = program[roles[0]]
        if not line.strip() or not _SAFE_PROGRAM.match(line):
            raise LayoutError(
                f"program line {line!r} is empty or not shell-safe: use letters, digits, spaces and ./:,=@%+-_"
            )
        lines.append(f"{_ranges(ranks)} {line.strip()}")
    text = "\n".join(lines) + "\n"
    if path is not None:
        Path(path).write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lsstpipe.runtime.layout``: print a layout, or write its ``srun --multi-prog`` file."""
    ap = argparse.ArgumentParser(prog="python -m lsstpipe.runtime.layout", description=main.__doc__)
    ap.add_argument("--camera", default="mini", help="camera name (lsstcam or mini)")
    ap.add_argument("--ranks", type=int, default=None, help="world size (default: the full layout's)")
    ap.add_argument("--program", help="command line of every rank; --role ROLES is appended")
    ap.add_argument("--output", help="write the multi-prog configuration here (default: standard output)")
    args = ap.parse_args(argv)
    try:
        layout = full_layout(args.camera) if args.ranks is None else layout_for_world(args.camera, args.ranks)
        if args.program is None:
            print(layout.describe())
        else:
            text = multi_prog(layout, args.program, args.output)
            if args.output is None:
                sys.stdout.write(text)
    except (LayoutError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
