"""The distributor rank of a replicator/distributor pair: the Archive's end of the link (LDM-230 §2.2).

It verifies what its replicator sends (the bytes' SHA-256, then the blob's header and checksum), publishes
each verified crosstalk-corrected raft to the Archive DMCS at once and serves workers' requests for its
CCDs from memory (alert latency does not wait for the archive), stores the image at the Archive
(crosstalk-corrected images in the raw image cache, raw images on tape), and reads the stored copy back and
compares it with the bytes received before it reports the image
:class:`~lsstpipe.runtime.messages.Archived`. The replicator side is :mod:`lsstpipe.runtime.archiving`.
"""

from __future__ import annotations

import time
import zlib
from collections import OrderedDict

import numpy as np

from lsstpipe.archive.blobs import ImageKey, ItemMeta, blob_checksum, decode_image
from lsstpipe.archive.storage import RawImageCache
from lsstpipe.archive.tape import TapeArchive
from lsstpipe.cds.image import CDSChecksumError, CDSError, RaftImage
from lsstpipe.runtime.archiving import ArchiveSettings, StoragePaths, report_transfer, sha256_hex
from lsstpipe.runtime.layout import Role
from lsstpipe.runtime.messages import Archived, CcdData, CcdRequest, Expect, Heartbeat, ImageData, RaftPublished
from lsstpipe.runtime.postman import Envelope, PeerLost, Postman

__all__ = ["Distributor"]


class Distributor:
    """The distributor side of a pair, on rank ``postman.rank``."""

    def __init__(self, postman: Postman, paths: StoragePaths, settings: ArchiveSettings, dmcs: int = 0) -> None:
        self.post, self.paths, self.settings, self.dmcs = postman, paths, settings, dmcs
        self.name = f"distributor {postman.rank}"
        self.raw_cache = RawImageCache(paths.archive_raw_cache)
        self.tape = TapeArchive(paths.archive_tape, f"archive-{postman.rank:04d}")
        self.rafts: OrderedDict[tuple[str, str], RaftImage] = OrderedDict()
        self.expected: set[tuple[str, str]] = set()
        self.rejected: dict[tuple[str, str, str], int] = {}
        self._ccd_sha: dict[tuple[str, str], str] = {}

    def handle(self, env: Envelope) -> bool:
        p = env.payload
        if isinstance(p, Expect):
            self.expected.add((p.image_id, p.raft))
        elif isinstance(p, ImageData):
            self._receive(p, env.data, env.source)
        elif isinstance(p, CcdRequest):
            self._serve(p, env.source)
        elif isinstance(p, Heartbeat) and p.role is Role.REPLICATOR:
            try:
                self.post.send(Heartbeat(self.post.rank, Role.DISTRIBUTOR, p.sequence, time.time()), env.source)
            except PeerLost:
                pass
        else:
            return False
        return True

    def _receive(self, h: ImageData, data: np.ndarray | None, source: int) -> None:
        key = ImageKey(h.image_id, h.raft, h.kind)
        where = "tape" if h.kind == "raw" else "raw_cache"
        try:
            blob = zlib.decompress(data.tobytes()) if h.compressed else data.tobytes()
            digest = sha256_hex(blob)
            if digest != h.sha256:
                raise CDSChecksumError(f"{key}: {len(blob)} bytes with SHA-256 {digest[:12]}… arrived, the replicator "
                                       f"sent {h.sha256[:12]}…")  # fmt: skip
            # The replicator verified the content before sending these very bytes (their SHA-256 just matched):
            # a crosstalk-corrected raft is decoded to serve workers without checking its pixels' checksum again
            # (~0.45 s of SHA-256 per full-size raft); a raw one only goes to tape: its header is checked.
            image = decode_image(blob, key, verify=False) if h.kind == "crosstalk_corrected" else None
            checksum = image.checksum if image is not None else blob_checksum(key, blob)
            if checksum != h.checksum:
                raise CDSError(f"{key} carries checksum {checksum[:12]}…, the replicator sent {h.checksum[:12]}…")
        except (zlib.error, CDSError, ValueError) as exc:
            n = self.rejected[(h.image_id, h.raft, h.kind)] = self.rejected.get((h.image_id, h.raft, h.kind), 0) + 1
            retry = n <= self.settings.max_retries
            error = f"damaged in transit ({exc}); " + ("resend" if retry else "given up: left to catch-up")
            self._transfer(key, f"replicator {source}", self.name, None, int(data.nbytes), False, error)
            self._report(Archived(h.job_id, h.image_id, h.raft, h.kind, False, where, None, self.post.rank, 0,
                                  error), source)  # fmt: skip
            return
        if image is not None:  # verified: workers may have it now, while the Archive stores it
            self.rafts[(h.image_id, h.raft)] = image
            while len(self.rafts) > self.settings.keep_rafts:
                self.rafts.popitem(last=False)
            self.post.send(RaftPublished(h.visit, h.exposure, h.image_id, h.raft, self.post.rank), self.dmcs)
        meta = ItemMeta(checksum, len(blob), h.mode)
        try:  # the copy read back is compared with the verified bytes received (no second decoding)
            if where == "tape":
                self.tape.append(key, blob, meta)
                stored = self.tape.verify(key, received=blob)
            else:
                self.raw_cache.put(key, blob, meta)
                stored = self.raw_cache.verify(key, received=blob)
            if stored != meta.checksum:
                raise CDSError(f"the Archive's {where} recorded checksum {stored[:12]}… for {key}, whose content "
                               f"has {meta.checksum[:12]}…")  # fmt: skip
        except Exception as exc:  # noqa: BLE001 — any storage failure is reported, the image stays at the Base
            error = f"storing at the Archive failed: {exc}"
            self._transfer(key, f"replicator {source}", f"archive {where}", None, len(blob), False, error)
            self._report(Archived(h.job_id, h.image_id, h.raft, h.kind, False, where, None, self.post.rank, 0,
                                  error), source)  # fmt: skip
            return
        self._transfer(key, f"replicator {source}", f"archive {where}", checksum, len(blob), True)
        self._report(Archived(h.job_id, h.image_id, h.raft, h.kind, True, where, checksum, self.post.rank, len(blob)),
                     source)  # fmt: skip

    def _report(self, archived: Archived, replicator: int) -> None:
        self.post.send(archived, self.dmcs)

    def _serve(self, req: CcdRequest, worker: int) -> None:
        raft = req.detector.split("_")[0]
        image = self.rafts.get((req.image_id, raft))
        try:
            if image is None:
                key = ImageKey(req.image_id, raft, "crosstalk_corrected")
                image = decode_image(self.raw_cache.get(key), key)
            pixels = np.ascontiguousarray(image.ccds[req.detector])
            header = tuple(image.headers[req.detector].items())
        except (LookupError, CDSError, OSError) as exc:
            reply = CcdData(req.image_id, req.detector, (), "", 0, (), f"{self.name} cannot serve it: {exc}")
            self.post.send(reply, worker)
            return
        key = (req.image_id, req.detector)
        if key not in self._ccd_sha:  # once per CCD: a rescheduled job asks again
            self._ccd_sha[key] = sha256_hex(pixels)
        reply = CcdData(req.image_id, req.detector, pixels.shape, self._ccd_sha[key], pixels.nbytes, header)
        self.post.send(reply, worker, pixels)

    def _transfer(self, key: ImageKey, source: str, dest: str, checksum: str | None, nbytes: int, ok: bool,
                  error: str | None = None) -> None:  # fmt: skip
        report_transfer(self.post, self.dmcs, key, source, dest, checksum, nbytes, ok, error)
