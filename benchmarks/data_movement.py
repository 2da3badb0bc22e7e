"""Data movement replicator → distributor → worker, and the cost of scheduling one CCD job (issue 5).

Run ``mpiexec -n 3 python -m mpi4py benchmarks/data_movement.py [--ccd-size 4096] [--rafts N] [--compress]
[--store] [--jobs N] [--json PATH]``. Rank 0 is the replicator (and the DMCS), rank 1 the distributor,
rank 2 the worker. Exactly three ranks: with two, the worker would share the distributor's rank, where
:class:`~lsstpipe.runtime.postman.Postman` hands a CCD over by a local copy and there is no MPI hop to
compare with a plain ``Send``/``Recv``.

Each of ``--rafts`` raft images (9 CCDs of 16 int32 segments, ``ccd-size``² noise-like pixels: bias per
segment + sky + Gaussian noise) is made untimed on rank 0 and encoded as a CDS raft-image file
(:func:`lsstpipe.archive.blobs.encode_image`; zlib level 1 on top with ``--compress``, as the replicator
does). Timed regions are bracketed by ``Barrier()`` + ``MPI.Wtime()``; every byte the distributor and the
worker receive is compared (SHA-256) with what rank 0 made, outside the timed regions.

1. **movement** — the same bytes between the same ranks, two ways:
   *plain*: hop 1 ``Send`` of the raft file 0 → 1; hop 2 ``Send`` of each CCD's segments 1 → 2 (pushed);
   *runtime*: hop 1 ``Postman.send(ImageData, bytes)`` received by ``Postman.poll``; hop 2 as the worker
   fetches a CCD: ``CcdRequest`` → ``Postman.wait_for`` a ``CcdData`` header with its segments (checksum
   precomputed, untimed). ``ratio`` = plain time / runtime time (target ≥ 0.70). No verification, no
   storage, no decoding inside the timed regions; receive buffers are allocated inside them for both.
2. **verified** — the runtime with its verification and decoding, no storage: hop 1 adds decompression,
   the SHA-256 of the bytes received against the replicator's and
   :func:`~lsstpipe.archive.blobs.decode_image` on the distributor, as the Distributor does it (the
   pixels' checksum not checked again: those bytes are the ones the replicator verified); hop 2 is
   served by :meth:`Distributor.handle <lsstpipe.runtime.distributor.Distributor.handle>` (SHA-256 of the
   segments) and checked by the worker (SHA-256 against the header, as the worker rank does).
3. **archive** (``--store``) — the real classes end to end: a replicator job of
   :class:`~lsstpipe.runtime.archiving.Replicator` (read the CDS file, verify, Base raw cache / tape and
   outage buffer with fsync, compress if ``--compress``, send) for the raft's crosstalk-corrected and raw
   images, the :class:`~lsstpipe.runtime.distributor.Distributor` receiving them (decompress, verify, store at
   the Archive, read back and verify), then hop 2 as in 2. Stores live in a temporary folder (``--tmp``).
4. **scheduling** — :class:`~lsstpipe.runtime.dmcs_night.NightDMCS` on rank 0 dispatches ``--jobs`` no-op
   CCD jobs (``JobAssignment`` → :class:`~lsstpipe.runtime.worker.Worker` ``.handle`` with an empty ``run``
   → ``JobResult``) to the two worker strings of the ``mini`` camera's 3-rank layout (ranks 1 and 2), one
   visit at a time; against a bare ``comm.send``/``comm.recv`` ping-pong of the same pickled objects. The
   loops poll without sleeping (the night's rank loops sleep 0.5–1 ms when idle; not included).

GiB/s end to end = the raft's pixel bytes delivered to the worker / (hop 1 + hop 2 time); per hop = the
bytes that hop moved (the file, compressed or not, for hop 1; the segments for hop 2) / its time. Each
raft's plain and runtime hops run ``--repeat`` times, alternating which goes first, after an untimed
warm-up pair on the first raft; the median of the repeats is kept per raft (``samples_s`` in the JSON has
every run). The scheduling blocks alternate too (one visit runtime, one plain); medians per job are
reported, means as well.

Waiting: every waiting loop of the benchmark — barriers (``Ibarrier`` + ``Test``), the plain receivers
(``Iprobe`` before ``Recv``/``recv``), the polling loops around the runtime's classes — gives the CPU away
with ``os.sched_yield()`` between probes, the same for both ways. With three ranks on two shared cores,
ranks spinning in MPI starve the ranks that move the bytes and round trips take whole scheduler time
slices (ms); ``--spin`` polls flat out instead (for dedicated cores). The runtime's own waits are left as
they are: the worker's :meth:`Postman.wait_for <lsstpipe.runtime.postman.Postman.wait_for>` sleeps
0.2–5 ms between looks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsstpipe.archive.blobs import ImageKey, decode_image, encode_image  # noqa: E402
from lsstpipe.cds.buffer import CDSBuffer  # noqa: E402
from lsstpipe.cds.image import PreparedImage, prepare_image  # noqa: E402
from lsstpipe.runtime.archiving import ArchiveSettings, Replicator, StoragePaths  # noqa: E402
from lsstpipe.runtime.distributor import Distributor  # noqa: E402
from lsstpipe.runtime.messages import (  # noqa: E402
    Archived,
    CcdData,
    CcdRequest,
    ImageData,
    JobAssignment,
    JobKind,
    JobResult,
    ReadoutStarted,
    Tag,
)
from lsstpipe.runtime.postman import Envelope, Postman  # noqa: E402
from lsstpipe.runtime.worker import Worker  # noqa: E402

REPLICATOR, DISTRIBUTOR, WORKER = 0, 1, 2
RAFT = "R22"
SENSORS = tuple(f"{RAFT}_S{i}{j}" for i in range(3) for j in range(3))
DAY = "20261125"
GIB = float(1 << 30)
XTALK = "crosstalk_corrected"
WAIT_S = 600.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, validated (the same on every rank, before any collective)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ccd-size", type=int, default=4096, help="CCD side in pixels (multiple of 8; 4096: LSSTCam)")
    p.add_argument("--rafts", type=int, default=2, help="raft images to move (default 2)")
    p.add_argument("--compress", action="store_true", help="zlib-compress the raft file (ArchiveSettings.compress)")
    p.add_argument("--store", action="store_true", help="also run the real Replicator/Distributor with storage")
    p.add_argument("--repeat", type=int, default=3, help="plain/runtime pairs per raft and hop (medians kept)")
    p.add_argument("--jobs", type=int, default=2000, help="no-op CCD jobs for the scheduling overhead")
    p.add_argument(
        "--spin",
        action="store_true",
        help="wait by polling flat out instead of yielding the CPU between probes (dedicated cores)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tmp", type=Path, default=None, help="folder for the stores of --store (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.ccd_size < 8 or args.ccd_size % 8:
        p.error(f"--ccd-size must be a multiple of 8 and ≥ 8 (16 segments of size/2 × size/8), not {args.ccd_size}")
    if args.rafts < 1:
        p.error(f"--rafts must be ≥ 1, not {args.rafts}")
    if args.repeat < 1:
        p.error(f"--repeat must be ≥ 1, not {args.repeat}")
    if args.jobs < 1:
        p.error(f"--jobs must be ≥ 1, not {args.jobs}")
    return args


# ---- data ---------------------------------------------------------------------------------------------------
def make_raft(index: int, ccd_size: int, seed: int, kind: str = XTALK) -> PreparedImage:
    """Raft image ``index``: 9 CCDs of 16 int32 segments of bias + sky + Gaussian noise (read noise + shot)."""
    rng = np.random.default_rng([seed, index])
    shape = (16, ccd_size // 2, ccd_size // 8)
    ccds = {}
    for name in SENSORS:
        bias = rng.integers(15000, 25000, size=(16, 1, 1)).astype(np.float32)
        noise = rng.standard_normal(shape, dtype=np.float32)
        noise *= np.float32(math.sqrt(1200.0 + 8.0**2))
        noise += bias + np.float32(1200.0)
        ccds[name] = noise.astype(np.int32)
    image_id = f"MC_O_{DAY}_{index + 1:06d}"
    headers = {n: {"DETNAME": n, "EXPTIME": 15.0, "OBSID": image_id, "FILTER": "r"} for n in SENSORS}
    return prepare_image(image_id, RAFT, kind, ccds, headers, {"FILTER": "r", "AIRMASS": 1.2})


def sha(data: Any) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(data)).cast("B")).hexdigest()


def no_pause() -> None:
    """``--spin``: wait by polling flat out (the night's ranks have a core each)."""


def barrier(comm: Any, pause: Callable[[], None]) -> None:
    """``Barrier()`` that lets ``pause`` give the CPU away while it waits (an idle rank spinning in
    ``MPI_Barrier`` would take one of the two cores from the ranks that move the bytes)."""
    req = comm.Ibarrier()
    while not req.Test():
        pause()


def probe(comm: Any, source: int, tag: int, pause: Callable[[], None]) -> None:
    """Wait until a message from ``source`` under ``tag`` is there (then ``Recv``/``recv`` takes it)."""
    while not comm.Iprobe(source=source, tag=tag):
        pause()


def timed(comm: Any, fn, pause: Callable[[], None]) -> tuple[float, Any]:
    """``fn()`` on every rank between barriers: (seconds, what ``fn`` returned on this rank)."""
    from mpi4py import MPI

    barrier(comm, pause)
    t0 = MPI.Wtime()
    out = fn()
    barrier(comm, pause)
    return MPI.Wtime() - t0, out


def next_of(post: Postman, kind: type, pause: Callable[[], None], other=None) -> Envelope:
    """Busy-poll ``post`` until a ``kind`` message arrives; others go to ``other`` (an error when None)."""
    end = time.monotonic() + WAIT_S
    while time.monotonic() < end:
        env = post.poll()
        if env is None:
            pause()
            continue
        if isinstance(env.payload, kind):
            return env
        if other is None or not other(env):
            raise RuntimeError(f"rank {post.rank}: unexpected {env!r} while waiting for a {kind.__name__}")
    raise TimeoutError(f"rank {post.rank}: no {kind.__name__} within {WAIT_S:g} s")


def fetch_ccds(post: Postman, image_id: str, check: bool) -> dict[str, np.ndarray]:
    """The worker's side of hop 2: request each CCD and wait for it as the worker rank does."""
    got = {}
    for det in SENSORS:
        post.send(CcdRequest(image_id, det), DISTRIBUTOR)
        env = post.wait_for(lambda e, d=det: isinstance(e.payload, CcdData) and e.payload.detector == d, WAIT_S)
        if env is None or env.payload.error:
            raise RuntimeError(f"worker: {det} of {image_id} not served: {env.payload.error if env else 'timeout'}")
        if check and hashlib.sha256(env.data).hexdigest() != env.payload.checksum:
            raise RuntimeError(f"worker: {det} of {image_id} arrived damaged (checksum mismatch)")
        got[det] = env.data
    return got


def serve_ccds(post: Postman, reply, pause: Callable[[], None]) -> None:
    """The distributor's side of hop 2: answer the worker's 9 ``CcdRequest``s with ``reply(envelope)``."""
    for _ in SENSORS:
        reply(next_of(post, CcdRequest, pause))


# ---- one raft, all data phases ------------------------------------------------------------------------------
class Mover:
    """The per-rank state of the data phases; :meth:`raft` moves one raft every way and checks it."""

    def __init__(self, comm: Any, plain: Any, args: argparse.Namespace, tmp: Path) -> None:
        from mpi4py import MPI

        self.MPI, self.comm, self.plain, self.args = MPI, comm, plain, args
        self.rank = comm.Get_rank()
        self.pause = no_pause if args.spin else os.sched_yield
        self.post = Postman(comm)
        # no heartbeats or slow-link reports during a benchmark: each phase's messages are exactly known
        self.settings = ArchiveSettings(compress=args.compress, heartbeat_s=1e9, slow_transfer_s=1e9, keep_rafts=1,
                                        readout_timeout_s=WAIT_S)  # fmt: skip
        self.paths = StoragePaths(tmp)
        self.dist = Distributor(self.post, self.paths, self.settings) if self.rank == DISTRIBUTOR else None
        self.rep = Replicator(self.post, DISTRIBUTOR, self.paths, self.settings) if (
            args.store and self.rank == REPLICATOR) else None  # fmt: skip
        self.times: dict[str, list[float]] = {}  # per raft: seconds (the median of the repeats)
        self.samples: dict[str, list[float]] = {}  # every timed run
        self.bytes = {"hop1": 0, "pixels": 0}
        self.checks = 0

    def _time(self, name: str, fn, record: bool = True) -> Any:
        dt, out = timed(self.comm, fn, self.pause)
        if record:
            self.times.setdefault(name, []).append(dt)
            self.samples.setdefault(name, []).append(dt)
        return out

    def _order(self, warm_up: bool) -> list[tuple[str, bool]]:
        """``--repeat`` plain/runtime pairs, alternating which goes first (the machine's load drifts), after an
        untimed pair on the first raft (MPI sets up its shared-memory transfers on the first large message)."""
        ways = [(w, True) for k in range(self.args.repeat) for w in (("plain", "runtime"), ("runtime", "plain"))[k % 2]]
        return [("plain", False), ("runtime", False), *ways] if warm_up else ways

    def _close_raft(self, hop: str) -> None:
        """Keep the median of this raft's repeats of ``hop`` (robust to other users' bursts on the machine)."""
        for way in ("plain", "runtime"):
            times = self.times[f"{hop}_{way}"]
            self.times[f"{hop}_{way}"] = times[: -self.args.repeat] + [statistics.median(times[-self.args.repeat :])]

    def _check(self, ok: bool, what: str) -> None:
        if not ok:
            raise RuntimeError(f"rank {self.rank}: {what} — the bytes that arrived differ from those sent")
        self.checks += 1

    def raft(self, index: int) -> None:
        MPI, comm, rank = self.MPI, self.comm, self.rank
        info = payload = image = None
        if rank == REPLICATOR:
            image = make_raft(index, self.args.ccd_size, self.args.seed)
            blob = encode_image(image)
            payload = zlib.compress(blob, 1) if self.args.compress else blob
            info = {"image_id": image.image_id, "nbytes": len(payload), "file_sha": sha(np.frombuffer(payload, np.uint8)),
                    "blob_sha": sha(np.frombuffer(blob, np.uint8)),
                    "checksum": image.checksum, "ccd_sha": {d: sha(a) for d, a in image.ccds.items()},
                    "pixels": sum(a.nbytes for a in image.ccds.values())}  # fmt: skip
        info = comm.bcast(info, root=0)
        self.bytes["hop1"] += info["nbytes"]
        self.bytes["pixels"] += info["pixels"]
        header = ImageData(index, index + 1, 0, info["image_id"], RAFT, XTALK, info["checksum"], info["blob_sha"],
                           info["nbytes"], self.args.compress, "science")  # fmt: skip
        data = None if payload is None else np.frombuffer(payload, np.uint8)

        # hop 1, plain and runtime (alternating which goes first), then the runtime with verification
        def plain1():
            if rank == REPLICATOR:
                self.plain.Send([data, MPI.BYTE], dest=DISTRIBUTOR, tag=1)
            elif rank == DISTRIBUTOR:
                buf = np.empty(info["nbytes"], np.uint8)
                probe(self.plain, REPLICATOR, 1, self.pause)
                self.plain.Recv([buf, MPI.BYTE], source=REPLICATOR, tag=1)
                return buf
            return None

        def runtime1():
            if rank == REPLICATOR:
                self.post.send(header, DISTRIBUTOR, data)
            elif rank == DISTRIBUTOR:
                return next_of(self.post, ImageData, self.pause).data
            return None

        for name, record in self._order(index == 0):
            got = self._time(f"hop1_{name}", plain1 if name == "plain" else runtime1, record)
            if rank == DISTRIBUTOR:
                self._check(sha(got) == info["file_sha"], f"hop 1 ({name}) raft file")
            del got
        self._close_raft("hop1")

        def verified1():
            if rank == REPLICATOR:
                self.post.send(header, DISTRIBUTOR, data)
            elif rank == DISTRIBUTOR:
                env = next_of(self.post, ImageData, self.pause)
                blob = zlib.decompress(env.data) if env.payload.compressed else env.data.tobytes()
                if sha(blob) != env.payload.sha256:
                    raise RuntimeError(f"hop 1 (verified): the raft's bytes changed in transit ({len(blob)} bytes)")
                return decode_image(blob, ImageKey(env.payload.image_id, RAFT, XTALK), verify=False)
            return None

        decoded = self._time("hop1_verified", verified1)
        payload = data = None
        if rank == DISTRIBUTOR:
            self._check(decoded.checksum == info["checksum"], "hop 1 (verified) decoded raft")
            self.dist.rafts[(decoded.image_id, RAFT)] = decoded  # what the Distributor keeps for CCD requests
            ccds = {d: np.ascontiguousarray(decoded.ccds[d]) for d in SENSORS}
            replies = {d: CcdData(decoded.image_id, d, a.shape, sha(a), a.nbytes, tuple(decoded.headers[d].items()))
                       for d, a in ccds.items()}  # fmt: skip
            for d in SENSORS:
                self._check(replies[d].checksum == info["ccd_sha"][d], f"hop 1 (verified) CCD {d}")

        # hop 2, plain and runtime, then the runtime with the distributor's and worker's checksums
        def plain2():
            if rank == DISTRIBUTOR:
                for d in SENSORS:
                    self.plain.Send([ccds[d].reshape(-1).view(np.uint8), MPI.BYTE], dest=WORKER, tag=2)
            elif rank == WORKER:
                out = {}
                for d in SENSORS:
                    out[d] = np.empty(info["pixels"] // len(SENSORS), np.uint8)
                    probe(self.plain, DISTRIBUTOR, 2, self.pause)
                    self.plain.Recv([out[d], MPI.BYTE], source=DISTRIBUTOR, tag=2)
                return out
            return None

        def runtime2():
            if rank == DISTRIBUTOR:
                serve_ccds(self.post, lambda env: self.post.send(replies[env.payload.detector], WORKER,
                                                                 ccds[env.payload.detector]), self.pause)  # fmt: skip
            elif rank == WORKER:
                return fetch_ccds(self.post, info["image_id"], check=False)
            return None

        def verified2():
            if rank == DISTRIBUTOR:
                serve_ccds(self.post, self.dist.handle, self.pause)
            elif rank == WORKER:
                return fetch_ccds(self.post, info["image_id"], check=True)
            return None

        for name, record in (*self._order(index == 0), ("verified", True)):
            got = self._time(
                f"hop2_{name}", {"plain": plain2, "runtime": runtime2, "verified": verified2}[name], record
            )
            if rank == WORKER:
                for d in SENSORS:
                    self._check(sha(got[d]) == info["ccd_sha"][d], f"hop 2 ({name}) CCD {d}")
            del got
        self._close_raft("hop2")
        if rank == DISTRIBUTOR:
            ccds = replies = decoded = None
            self.dist.rafts.clear()
        if self.args.store:
            self._archive(index, image, info)

    # ---- the real classes with storage ------------------------------------------------------------------
    def _archive(self, index: int, image: PreparedImage | None, info: dict) -> None:
        rank, image_id = self.rank, info["image_id"]
        if rank == REPLICATOR:  # the camera writes both kinds into the CDS buffer (untimed)
            cds = CDSBuffer(self.paths.cds)
            headers = {d: json.loads(t) for d, t in image.headers_json.items()}
            for kind in (XTALK, "raw"):
                cds.write(image_id, RAFT, kind, image.ccds, headers, json.loads(image.telemetry_json))
        del image
        job = JobAssignment(1000 + index, JobKind.SCIENCE_RAFT, index + 1, 0, RAFT, image_ids=(image_id,))
        inbox: list[Any] = []  # rank 0: what the replicator job and the distributor sent to the DMCS

        def hop1():
            if rank == REPLICATOR:
                self.rep.handle(Envelope(job, rank, Tag.JOB))
                self.rep.handle(Envelope(ReadoutStarted(index + 1, 0, image_id), rank, Tag.READOUT))
                while not any(isinstance(p, JobResult) for p in inbox):  # rank 0 is the DMCS too
                    self.rep.tick()
                    env = self.post.poll()
                    if env is not None:
                        inbox.append(env.payload)
                    else:
                        self.pause()
            elif rank == DISTRIBUTOR:
                for _ in range(2):
                    self.dist.handle(next_of(self.post, ImageData, self.pause, self.dist.handle))

        self._time("hop1_archive", hop1)
        got = self._time("hop2_archive", lambda: (serve_ccds(self.post, self.dist.handle, self.pause) if rank == DISTRIBUTOR else
                                                  fetch_ccds(self.post, image_id, True) if rank == WORKER else None))  # fmt: skip
        if rank == WORKER:
            for d in SENSORS:
                self._check(sha(got[d]) == info["ccd_sha"][d], f"hop 2 (archive) CCD {d}")
        del got
        if rank == REPLICATOR:
            result = next(p for p in inbox if isinstance(p, JobResult))
            self._check(result.ok and result.count("sent") == 2, f"replicator job: {result}")
            archived = [p for p in inbox if isinstance(p, Archived)]
            while len(archived) < 2:
                archived.append(next_of(self.post, Archived, self.pause, lambda env: True).payload)
            self._check(all(a.ok for a in archived), f"archive: {[a.error for a in archived if not a.ok]}")
        barrier(self.comm, self.pause)


# ---- scheduling -----------------------------------------------------------------------------------------------
class NoOpWorker(Worker):
    """The worker rank's job handling (heartbeat thread, result back to the DMCS) around an empty job."""

    def run(self, job: JobAssignment) -> JobResult:
        return JobResult(job.job_id, self.post.rank, True, 0.0)


def schedule(comm: Any, plain: Any, jobs: int, tmp: Path, pause: Callable[[], None]) -> dict[str, float] | None:
    """Per-job µs of NightDMCS dispatch of no-op jobs and of a bare pickled ping-pong (on rank 0)."""
    from mpi4py import MPI

    from lsstpipe.camera import get_camera
    from lsstpipe.control.states import EntityName
    from lsstpipe.repo import Repository
    from lsstpipe.runtime.dmcs_night import NightDMCS, SchedulerSettings
    from lsstpipe.runtime.layout import scaled_layout
    from lsstpipe.runtime.manifest import Manifest
    from lsstpipe.runtime.plan import EventKind, NightPlan, PlannedEvent, Snap, Visit
    from lsstpipe.runtime.worker import WorkerSettings

    rank = comm.Get_rank()
    camera = get_camera("mini")
    layout = scaled_layout(camera, comm.Get_size())
    dets = tuple(d.name for d in camera.detectors)
    n_visits = max(2, math.ceil(jobs / len(dets)))
    visits = [Visit(k + 1, 5000 + k, "r", 0.0, 0.0, 0.0, (Snap(0, f"MC_O_{DAY}_{k + 1:06d}", DAY, 6e4, 15.0),))
              for k in range(n_visits + 1)]  # fmt: skip
    post = Postman(comm)
    if rank == 0:
        Repository(tmp / "repo").create({"camera": "mini", "seed": 0})
    comm.Barrier()

    dmcs = worker = None
    if rank == 0:
        plan = NightPlan(tmp / "repo", camera, tuple(visits), (), (), dets, 1.0, 1.0)
        dmcs = NightDMCS(post, layout, plan, Manifest(tmp / "night"), SchedulerSettings())
    else:
        worker = NoOpWorker(post, Repository(tmp / "repo"), tmp / "worker", WorkerSettings())
    per_job: dict[str, list[float]] = {"runtime": [], "plain": []}
    for k, visit in enumerate(visits):  # visit 0 warms up; blocks of one visit, alternating which goes first
        for way in ("runtime", "plain") if k % 2 == 0 else ("plain", "runtime"):
            if rank != 0:
                _serve_noop(post, plain, worker, way, pause)
                continue
            t0 = MPI.Wtime()
            if way == "runtime":
                dmcs.on_event(EntityName.ALERT_PRODUCTION_CLUSTER, PlannedEvent(0.0, 0, EventKind.NEXT_VISIT, visit))
                while not dmcs.idle():
                    dmcs.dispatch()
                    env = post.poll()
                    if env is None:
                        pause()
                    elif not dmcs.handle(env):
                        raise RuntimeError(f"DMCS: unexpected {env!r}")
            else:
                target = layout.strings[k % len(layout.strings)][0]  # the string NightDMCS gives this visit
                for det in dets:
                    job = JobAssignment(k * 100 + 1, JobKind.CCD, visit.visit, detector=camera[det].id,
                                        deadline=time.time() + 120.0, image_ids=(visit.snaps[0].image_id,))  # fmt: skip
                    plain.send(job, dest=target, tag=7)
                    probe(plain, target, 8, pause)
                    if plain.recv(source=target, tag=8).job_id != job.job_id:
                        raise RuntimeError("plain ping-pong: a result for another job")
            if k:
                per_job[way].append(1e6 * (MPI.Wtime() - t0) / len(dets))
            if way == "runtime":
                dmcs.stop_all("end of block")
            else:
                for w in range(1, comm.Get_size()):
                    plain.send(None, dest=w, tag=7)
    if rank != 0:
        return None
    bad = [r for v in visits for r in dmcs.manifest.ccds_of(v.visit) if r.status != "processed"]
    if bad:
        raise RuntimeError(f"scheduling: {len(bad)} no-op jobs not processed, e.g. {bad[0]}")
    return {"schedule_overhead_us": statistics.median(per_job["runtime"]),
            "schedule_plain_us": statistics.median(per_job["plain"]),
            "schedule_overhead_mean_us": statistics.fmean(per_job["runtime"]),
            "schedule_plain_mean_us": statistics.fmean(per_job["plain"]),
            "schedule_jobs": len(dets) * (len(visits) - 1)}  # fmt: skip


def _serve_noop(post: Postman, plain: Any, worker: Any, way: str, pause: Callable[[], None]) -> None:
    """A worker rank's side of one scheduling block: the runtime's job handling, or the bare ping-pong."""
    from lsstpipe.runtime.messages import Stop

    if way == "runtime":
        while True:
            env = post.poll()
            if env is None:
                pause()
                continue
            if isinstance(env.payload, Stop):
                return
            if not worker.handle(env):
                raise RuntimeError(f"worker {post.rank}: unexpected {env!r}")
    while probe(plain, 0, 7, pause) or (job := plain.recv(source=0, tag=7)) is not None:
        plain.send(JobResult(job.job_id, post.rank, True, 0.0), dest=0, tag=8)


# ---- report ---------------------------------------------------------------------------------------------------
def summarize(m: Mover, args: argparse.Namespace, sched: dict[str, float]) -> dict[str, Any]:
    t = {k: sum(v) for k, v in m.times.items()}
    hop1, pix = m.bytes["hop1"], m.bytes["pixels"]
    out: dict[str, Any] = {"ccd_size": args.ccd_size, "rafts": args.rafts, "compress": args.compress,
                           "store": args.store, "hop1_bytes": hop1, "pixel_bytes": pix}  # fmt: skip
    for way in ("plain", "runtime", "verified", "archive"):
        if f"hop1_{way}" not in t:
            continue
        moved = 2 * hop1 if way == "archive" else hop1  # a replicator job sends the raw image too
        out[f"hop1_{way}_gibps"] = moved / GIB / t[f"hop1_{way}"]
        out[f"hop2_{way}_gibps"] = pix / GIB / t[f"hop2_{way}"]
        out[f"{way}_gibps"] = pix / GIB / (t[f"hop1_{way}"] + t[f"hop2_{way}"])
    out["ratio"] = out["runtime_gibps"] / out["plain_gibps"]
    out["hop1_ratio"] = out["hop1_runtime_gibps"] / out["hop1_plain_gibps"]
    out["hop2_ratio"] = out["hop2_runtime_gibps"] / out["hop2_plain_gibps"]
    out["per_raft_ratio"] = [(p1 + p2) / (r1 + r2) for p1, p2, r1, r2 in
                             zip(*(m.times[k] for k in ("hop1_plain", "hop2_plain", "hop1_runtime", "hop2_runtime")))]  # fmt: skip
    out.update(sched)
    out["schedule_ratio"] = sched["schedule_plain_us"] / sched["schedule_overhead_us"]
    return out


def report(out: dict[str, Any], checks: int, world: Any) -> str:
    from mpi4py import MPI

    lines = [f"data movement replicator → distributor → worker: {out['rafts']} raft(s) of 9 CCDs "
             f"{out['ccd_size']}², {out['pixel_bytes'] / GIB:.3f} GiB of pixels, hop-1 file "
             f"{out['hop1_bytes'] / GIB:.3f} GiB ({'zlib level 1' if out['compress'] else 'uncompressed'})",
             f"{world.Get_size()} ranks on {platform.node()} ({_cpus()} CPUs), "
             f"{MPI.Get_library_version().replace(chr(0), '').splitlines()[0].strip()}, mpi4py {_mpi4py()}",
             f"{'way':<10}{'hop 1 GiB/s':>13}{'hop 2 GiB/s':>13}{'end to end':>12}"]  # fmt: skip
    notes = {"plain": "Send/Recv of the same bytes (anchor)", "runtime": "Postman + runtime headers",
             "verified": "+ decode, checksums", "archive": "real Replicator/Distributor + storage (hop 1: raw image too)"}  # fmt: skip
    for way, note in notes.items():
        if f"{way}_gibps" in out:
            lines.append(f"{way:<10}{out[f'hop1_{way}_gibps']:>13.3f}{out[f'hop2_{way}_gibps']:>13.3f}"
                         f"{out[f'{way}_gibps']:>12.3f}   {note}")  # fmt: skip
    ok = "met" if out["ratio"] >= 0.7 else "NOT met"
    lines += [f"runtime / plain: {out['ratio']:.1%} end to end (hop 1 {out['hop1_ratio']:.1%}, hop 2 "
              f"{out['hop2_ratio']:.1%}); per raft {', '.join(f'{r:.0%}' for r in out['per_raft_ratio'])}; "
              f"target ≥ 70 % {ok}",
              f"scheduling: {out['schedule_overhead_us']:.1f} µs per no-op CCD job through NightDMCS + Postman + "
              f"Worker.handle vs {out['schedule_plain_us']:.1f} µs bare pickled ping-pong (medians of one-visit "
              f"blocks; means {out['schedule_overhead_mean_us']:.1f} vs {out['schedule_plain_mean_us']:.1f} µs; "
              f"{out['schedule_jobs']} jobs)",
              f"intact: {checks} checks passed (every received raft file and CCD equal to what rank 0 made)"]  # fmt: skip
    return "\n".join(lines)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def _mpi4py() -> str:
    import mpi4py

    return mpi4py.__version__


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.Get_size() != 3:
        if world.Get_rank() == 0:
            print(f"data_movement: run with exactly 3 ranks (replicator, distributor, worker), not "
                  f"{world.Get_size()}: mpiexec -n 3 python -m mpi4py benchmarks/data_movement.py", file=sys.stderr)  # fmt: skip
        return 2
    plain = world.Dup()  # the anchor's messages never meet the Postman's probes
    tmp = None
    if world.Get_rank() == 0:
        if args.tmp is not None:
            args.tmp.mkdir(parents=True, exist_ok=True)
        tmp = str(Path(tempfile.mkdtemp(prefix="data_movement-", dir=args.tmp)))
    tmp = Path(world.bcast(tmp, root=0))
    try:
        mover = Mover(world, plain, args, tmp)
        for index in range(args.rafts):
            mover.raft(index)
        checks = world.reduce(mover.checks, root=0)
        sched = schedule(world, plain, args.jobs, tmp, mover.pause)
        world.Barrier()
    except BaseException:
        if world.Get_rank() == 0:  # the job aborts (python -m mpi4py): leave no stores behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if world.Get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        out = summarize(mover, args, sched)
        out["checks"], out["intact"] = checks, True
        out["samples_s"] = mover.samples
        print(report(out, checks, world), flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
