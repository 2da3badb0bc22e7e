"""The simulated Alert Production cluster the Base DMCS configures: pairs, workers, software, EFD replicas.

It stands in for the machines, the Orchestration Manager and the Alert Production database as far as the
control plane needs them, and the configure prerequisites are checked against it for real:

- **pairs and workers** — how many replicator/distributor pairs are up in each pool, how many workers;
- **software** — the files of each version as installed on the machines, and the SHA-256 checksum that
  system management registered for that version in the Alert Production database. Verification recomputes
  the checksum over the installed files (sorted paths, each path and content length-framed), so a version
  that is missing, unregistered or altered on the machines fails;
- **EFD replicas** — reachable or not, following or not. With a real EFD attached (:meth:`SimulatedCluster.
  attach_efd`, e.g. an :class:`lsstpipe.db.EFDChain`), the replicas it has are pinged and switched for
  real; replicas it does not have keep the simulated flags;
- **installations** — the configuration installed for each entity. Installing is two-phase: a *staging*
  that :meth:`SimulatedCluster.commit` turns into the installation atomically, or that
  :meth:`SimulatedCluster.discard` drops. Nothing is ever half-installed.
- **jobs** — batches submitted on OCS events, which run for a while whatever the entity does next
  (disable does not terminate running jobs). How many jobs one event launches comes from the camera the
  cluster serves (:class:`JobCounts`): one replicator job per science raft plus one for the wavefront
  sensors on ``startIntegration``, one worker job per CCD and wavefront sensor on ``nextVisit``/
  ``startExposure`` (22 and 193 on LSSTCam, 3 and 19 on the ``mini`` camera).

A cluster can be described in YAML (:class:`ClusterDescription`, ``--cluster`` on the command line).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from lsstpipe.camera.geometry import Camera, get_camera
from lsstpipe.control.config import Configuration, Pool, validate_mapping
from lsstpipe.control.errors import ConfigurationError, NotInstallable, PrerequisiteError
from lsstpipe.control.states import EntityName

log = logging.getLogger(__name__)

#: The software version the shipped configurations name and the default cluster has installed.
DEFAULT_SOFTWARE_VERSION = "w.2026.48"


def software_checksum(files: dict[str, bytes]) -> str:
    """SHA-256 over the files of a software version (sorted paths, each path and content length-framed)."""
    h = hashlib.sha256(b"lsstpipe-software-v1")
    for path in sorted(files):
        p = path.encode()
        h.update(len(p).to_bytes(8, "little") + p + len(files[path]).to_bytes(8, "little") + files[path])
    return h.hexdigest()


def fake_software(version: str) -> dict[str, bytes]:
    """Deterministic stand-in files of a software version."""
    return {
        "bin/lsstpipe": f"#!/bin/sh\n# lsstpipe {version}\n".encode(),
        "lib/lsstpipe/VERSION": version.encode(),
        "lib/lsstpipe/manifest.txt": hashlib.sha256(version.encode()).hexdigest().encode(),
    }


class ReplicaControl(Protocol):
    """A real EFD replication chain as the EFD Replicator drives it (:class:`lsstpipe.db.EFDChain`)."""

    def replica_names(self) -> tuple[str, ...]:
        """The replicas it has (e.g. ``chile_dac``, ``us_dac``)."""
        ...

    def ping(self, name: str, timeout: float) -> None:
        """Raise (with the reason) unless replica ``name`` answers within ``timeout`` seconds."""
        ...

    def set_following(self, name: str, on: bool) -> None:
        """Make replica ``name`` follow its upstream, or stop; raise (with the reason) if it cannot."""
        ...


@dataclass(frozen=True)
class Installation:
    """A configuration installed (or staged) on the cluster for one entity."""

    entity: EntityName
    configuration: str
    software_version: str
    checksum: str
    token: int


def batch_label(event: str, visit: int, exposure: int) -> str:
    """The label of the job batch one OCS event launches (the control database finds the visit in it)."""
    return f"{event} visit {visit} exposure {exposure}"


@dataclass(frozen=True)
class JobCounts:
    """How many jobs one OCS event launches on a cluster.

    Parameters
    ----------
    per_exposure
        Replicator jobs per ``startIntegration`` (the Archiver).
    per_visit
        Worker jobs per ``nextVisit`` or ``startExposure`` (the Alert Production Cluster).
    """

    per_exposure: int
    per_visit: int

    def __post_init__(self) -> None:
        for name in ("per_exposure", "per_visit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"JobCounts.{name} must be a non-negative int, not {value!r}")

    @classmethod
    def of_camera(cls, camera: Camera | str) -> JobCounts:
        """LDM-230's counts for ``camera``: one replicator job per science raft plus one for the wavefront
        sensors; one worker job per CCD and wavefront sensor.

        Raises
        ------
        ConfigurationError
            ``camera`` is not a known camera name.
        """
        if isinstance(camera, str):
            try:
                camera = get_camera(camera)
            except ValueError as exc:
                raise ConfigurationError(str(exc)) from None
        return cls(len(camera.science_rafts) + (1 if camera.wavefront else 0), len(camera.detectors))


@dataclass(frozen=True)
class JobBatch:
    """Jobs launched for one OCS event; they run for ``seconds`` whatever the entity does meanwhile."""

    entity: EntityName
    label: str
    n_jobs: int
    started: float
    seconds: float


@dataclass(frozen=True, kw_only=True)
class ClusterDescription:
    """A simulated cluster in YAML; every field has a default (the cluster the shipped configurations fit)."""

    pairs_fully_operational: int = field(
        default=24, metadata={"doc": "replicator/distributor pairs up with a link to the US", "min": 0}
    )
    pairs_local_only: int = field(default=4, metadata={"doc": "pairs up that can only store at the Base", "min": 0})
    pairs_catchup: int = field(default=4, metadata={"doc": "pairs dedicated to the Catch-Up Archiver", "min": 0})
    workers: int = field(default=400, metadata={"doc": "worker machines up", "min": 0})
    software_versions: tuple[str, ...] = field(
        default=(DEFAULT_SOFTWARE_VERSION,), metadata={"doc": "versions installed and registered", "min": None}
    )
    altered_versions: tuple[str, ...] = field(
        default=(),
        metadata={"doc": "installed versions whose files no longer match their registered checksum", "min": None},
    )
    us_replica_reachable: bool = field(
        default=True, metadata={"doc": "whether the US DAC EFD replica 'us_dac' answers", "min": None}
    )
    job_seconds: float = field(default=0.5, metadata={"doc": "how long a batch of simulated jobs runs", "min": 0.0})  # fmt: skip
    camera: str = field(
        default="lsstcam",
        metadata={"doc": "the camera served (lsstcam or mini): how many jobs each OCS event launches", "min": None},
    )


class SimulatedCluster:
    """Machines, software, EFD replicas, installations and jobs, shared by the entities (thread-safe)."""

    def __init__(
        self,
        pairs: dict[Pool, int] | None = None,
        workers: int = 400,
        software: dict[str, dict[str, bytes]] | None = None,
        registered: dict[str, str] | None = None,
        replicas: dict[str, bool] | None = None,
        job_seconds: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        jobs: JobCounts | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self.pairs: dict[Pool, int] = dict(pairs if pairs is not None else {Pool.FULLY_OPERATIONAL: 24, Pool.LOCAL_ONLY: 4, Pool.CATCHUP: 4})  # fmt: skip
        self.workers = workers
        if software is None:
            software = {DEFAULT_SOFTWARE_VERSION: fake_software(DEFAULT_SOFTWARE_VERSION)}
        self.software: dict[str, dict[str, bytes]] = {v: dict(f) for v, f in software.items()}
        self.registered: dict[str, str] = (
            dict(registered) if registered is not None else {v: software_checksum(f) for v, f in self.software.items()}
        )
        self.replicas: dict[str, bool] = dict(replicas if replicas is not None else {"us_dac": True})
        self.following: dict[str, bool] = {name: False for name in self.replicas}
        self.installed: dict[EntityName, Installation] = {}
        self.staged: dict[EntityName, Installation] = {}
        self.batches: list[JobBatch] = []
        self.job_seconds = job_seconds
        self.clock = clock
        self.jobs = jobs if jobs is not None else JobCounts.of_camera("lsstcam")
        """How many jobs one OCS event launches (default: LSSTCam's)."""
        self._tokens = 0
        self.efd: ReplicaControl | None = None

    def attach_efd(self, efd: ReplicaControl) -> None:
        """Drive ``efd``'s replicas for real from now on; the ones the entities switch start not following."""
        with self._lock:
            self.efd = efd
            names = [n for n in efd.replica_names() if n in self.following]
        for name in names:
            try:
                self.set_following(name, False)
            except PrerequisiteError as exc:  # the chain keeps the wanted state and applies it when it can
                log.warning("EFD replica %s: %s", name, exc)

    def _real(self, name: str) -> ReplicaControl | None:
        with self._lock:
            efd = self.efd
        return efd if efd is not None and name in efd.replica_names() else None

    @classmethod
    def from_description(cls, desc: ClusterDescription) -> SimulatedCluster:
        software = {v: fake_software(v) for v in desc.software_versions}
        registered = {v: software_checksum(f) for v, f in software.items()}
        for v in desc.altered_versions:
            if v not in software:
                raise ConfigurationError(f"altered_versions: {v!r} is not in software_versions")
            software[v] = {**software[v], "lib/lsstpipe/manifest.txt": b"altered on the machines"}
        pairs = {Pool.FULLY_OPERATIONAL: desc.pairs_fully_operational, Pool.LOCAL_ONLY: desc.pairs_local_only,
                 Pool.CATCHUP: desc.pairs_catchup}  # fmt: skip
        return cls(pairs, desc.workers, software, registered, {"us_dac": desc.us_replica_reachable}, desc.job_seconds,
                   jobs=JobCounts.of_camera(desc.camera))  # fmt: skip

    @classmethod
    def from_yaml(cls, path: Path) -> SimulatedCluster:
        """A cluster from a YAML :class:`ClusterDescription` (unknown keys are errors)."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigurationError(f"{path}: cannot be read as YAML: {exc}") from None
        try:
            return cls.from_description(validate_mapping(ClusterDescription, data))
        except ConfigurationError as exc:
            raise ConfigurationError(f"{path}: {exc}") from None

    # ---- prerequisites -------------------------------------------------------------------------------
    def require_pairs(self, pools: Iterable[Pool], needed: int, what: str) -> None:
        """Raise :class:`PrerequisiteError` unless ``needed`` pairs are up in ``pools``."""
        pools = tuple(pools)
        with self._lock:
            have = sum(self.pairs.get(p, 0) for p in pools)
        if have < needed:
            names = "+".join(p.value for p in pools)
            raise PrerequisiteError(f"{what} needs {needed} replicator/distributor pairs in {names} but only {have} "
                                    "are up; bring pairs back or configure fewer")  # fmt: skip

    def require_workers(self, needed: int) -> None:
        with self._lock:
            have = self.workers
        if have < needed:
            raise PrerequisiteError(f"the configuration needs {needed} workers but only {have} are up; "
                                    "bring workers back or configure fewer")  # fmt: skip

    def verify_software(self, version: str) -> str:
        """The verified checksum of ``version``; :class:`NotInstallable` if missing, unregistered or altered."""
        with self._lock:
            files = self.software.get(version)
            expected = self.registered.get(version)
        if files is None:
            have = ", ".join(sorted(self.software)) or "none"
            raise NotInstallable(f"software version {version} is not installed on the machines (installed: {have}); "
                                 "install it with the system management tools first")  # fmt: skip
        if expected is None:
            raise NotInstallable(f"software version {version} has no checksum registered in the Alert Production "
                                 "database; register it before configuring")  # fmt: skip
        actual = software_checksum(files)
        if actual != expected:
            raise NotInstallable(f"software version {version} fails its checksum (registered {expected[:12]}…, "
                                 f"found {actual[:12]}…); reinstall it on the machines")  # fmt: skip
        return actual

    def ping_replica(self, name: str, timeout: float) -> None:
        """Raise :class:`PrerequisiteError` unless EFD replica ``name`` answers (for real when attached)."""
        efd = self._real(name)
        if efd is not None:
            try:
                efd.ping(name, timeout)
            except Exception as exc:  # whatever the database says, the configure fails with it
                raise PrerequisiteError(f"EFD replica {name!r} did not answer within {timeout:g} s ({exc}); "
                                        "check the DAC link and the replica's server, then retry") from None  # fmt: skip
            return
        with self._lock:
            reachable = self.replicas.get(name)
        if reachable is None:
            raise PrerequisiteError(f"the cluster has no EFD replica {name!r} (replicas: {', '.join(self.replicas)})")
        if not reachable:
            raise PrerequisiteError(f"EFD replica {name!r} did not answer within {timeout:g} s; check the "
                                    "US DAC link and retry")  # fmt: skip

    # ---- installations -------------------------------------------------------------------------------
    def stage(self, config: Configuration, checksum: str) -> Installation:
        with self._lock:
            self._tokens += 1
            inst = Installation(config.entity, config.name, config.settings.software_version, checksum, self._tokens)
            self.staged[config.entity] = inst
            return inst

    def commit(self, inst: Installation) -> None:
        """Make a staged installation the installed one, after checking the software once more."""
        with self._lock:
            if self.staged.get(inst.entity) != inst:
                raise NotInstallable(f"the staging of {inst.configuration} for the {inst.entity.value} was discarded")
            try:
                self.verify_software(inst.software_version)
            except NotInstallable:
                del self.staged[inst.entity]
                raise
            self.installed[inst.entity] = self.staged.pop(inst.entity)

    def discard(self, entity: EntityName) -> None:
        with self._lock:
            self.staged.pop(entity, None)

    def uninstall(self, entity: EntityName) -> None:
        """Remove both the staged and the installed configuration of ``entity``."""
        with self._lock:
            self.staged.pop(entity, None)
            self.installed.pop(entity, None)

    # ---- effects of enable/disable and events --------------------------------------------------------
    def set_following(self, replica: str, on: bool) -> None:
        """Make ``replica`` follow its upstream or stop (for real when attached).

        Raises
        ------
        PrerequisiteError
            The attached EFD could not switch it: switching on leaves it as it was; switching off is kept
            as the wanted state and applied by the EFD as soon as the replica answers.
        """
        efd = self._real(replica)
        if efd is not None:
            try:
                efd.set_following(replica, on)
            except Exception as exc:
                if not on:  # off is what the chain now wants, and applies as soon as it can
                    with self._lock:
                        self.following[replica] = False
                raise PrerequisiteError(f"EFD replica {replica!r} could not be switched "
                                        f"{'on' if on else 'off'} ({exc}); check its server") from None  # fmt: skip
        with self._lock:
            self.following[replica] = on

    def submit(self, entity: EntityName, label: str, n_jobs: int, event: Any = None) -> JobBatch:
        """Launch ``n_jobs`` simulated jobs for ``entity``; ``event`` is the OCS event that launched them."""
        batch = JobBatch(entity, label, n_jobs, self.clock(), self.job_seconds)
        with self._lock:
            self.batches.append(batch)
        return batch

    def running(self, entity: EntityName) -> list[JobBatch]:
        now = self.clock()
        with self._lock:
            return [b for b in self.batches if b.entity is entity and now < b.started + b.seconds]
