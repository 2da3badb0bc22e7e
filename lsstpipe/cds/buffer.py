"""The Camera Data System buffer: the camera writes raft images into it, DM clients retrieve them.

LDM-230 has the replicator "request retrieval of the crosstalk-corrected exposure for the raft using the
CDS client interface, blocking until it is available", verify it "using a hash or checksum", then fetch
the raw exposure; the Catch-Up Archiver scans the camera buffer for images never archived, oldest first.
Here the buffer is a directory tree shared by both sides (layout and file format in
:mod:`lsstpipe.cds.store`):

* :class:`CDSBuffer` is the camera's side. :meth:`CDSBuffer.write` stores one raft of one exposure in
  one :class:`~lsstpipe.cds.image.ImageKind`, atomically, and, when the buffer has a capacity, evicts the
  oldest whole images (the real CDS buffer is a ring buffer of limited depth).
* :class:`CDSClient` is DM's side: :meth:`CDSClient.retrieve` blocks until an image is there, reads it
  and verifies its checksum; :meth:`CDSClient.scan` lists the buffer oldest first for catch-up.

Verification
------------
A reader checks the recomputed content checksum against the one in the file and, when present, the
sidecar. On a mismatch it waits ``poll_interval`` and reads once more, because a camera re-writing the
image (``overwrite=True``) replaces the sidecar just before the file; a second mismatch raises
:class:`~lsstpipe.cds.image.CDSChecksumError`, not retriable: the stored copy is damaged.

Concurrency
-----------
One :class:`CDSBuffer` (the camera) writes to a root; its threads may write different rafts at once.
Any number of clients, in any processes, may read. Eviction never removes an image while this buffer is
writing one of its rafts. A reader that finds its image evicted under it gets
:class:`~lsstpipe.cds.image.CDSNotFound`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lsstpipe.cds.image import (
    CDSChecksumError,
    CDSNotFound,
    CDSTimeout,
    ImageKind,
    PreparedImage,
    RaftImage,
    finite_mjd,
    prepare_image,
    raft_of_detector,
)
from lsstpipe.cds.store import (
    SIDECAR_SUFFIX,
    BufferEntry,
    Lister,
    StoredFile,
    check_compression,
    checksum_problem,
    fsync_path,
    image_path,
    now_mjd,
    publish,
    read_file,
    remove_image,
    sidecar_path,
    write_file,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from lsstpipe.camera import Camera

_log = logging.getLogger(__name__)


class _BufferView:
    """What both sides can do with a buffer root: locate images and list them."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root)
        self._lister = Lister(self._root)

    @property
    def root(self) -> Path:
        """The buffer's root directory."""
        return self._root

    def path(self, image_id: str, raft: str, kind: ImageKind | str) -> Path:
        """The file that holds (or will hold) one raft image; see :func:`~lsstpipe.cds.store.image_path`."""
        return image_path(self._root, image_id, raft, kind)

    def available(self, image_id: str, raft: str, kind: ImageKind | str) -> bool:
        """Whether the raft image is in the buffer now (complete: files are published atomically)."""
        return self.path(image_id, raft, kind).is_file()

    def scan(self, older_than: float | None = None) -> list[BufferEntry]:
        """The raft images in the buffer, oldest first, for the Catch-Up Archiver.

        Parameters
        ----------
        older_than : float, optional
            Only images written before this MJD.

        Returns
        -------
        list of BufferEntry
            ``(image_id, raft, kind, mjd)`` sorted by write time, then image id, raft, and
            crosstalk-corrected before raw (the order the replicator sends them).
            Unreadable files are skipped with a warning naming them.
        """
        limit = None if older_than is None else finite_mjd(older_than)
        return [f.entry for f in self._lister.files() if limit is None or f.entry.mjd < limit]


class CDSBuffer(_BufferView):
    """The camera's side of the CDS: writes raft images into the buffer at ``root``.

    Parameters
    ----------
    root : path-like
        The buffer directory; created if missing.
    capacity_bytes : int, optional
        Most bytes (image files and sidecars) the buffer may hold; after each write the oldest whole
        images are evicted until it fits. None (default) for no limit.
    camera : Camera, optional
        When given, writes are checked against it: the raft's detectors and their raw segment shapes.
    compression : {None, 'gzip', 'lzf', 'blosc-lz4'}
        HDF5 compression of the pixel datasets (:data:`lsstpipe.cds.store.COMPRESSIONS`); None (default) and
        ``blosc-lz4`` are the fastest to read, ``blosc-lz4`` takes a quarter of the space.
    fsync : bool
        Flush each file to disk before publishing it (default True), so a crash cannot publish a
        partial file. Turn off only for scratch buffers.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        capacity_bytes: int | None = None,
        camera: Camera | None = None,
        compression: str | None = None,
        fsync: bool = True,
    ) -> None:
        super().__init__(root)
        if capacity_bytes is not None and (isinstance(capacity_bytes, bool) or int(capacity_bytes) <= 0):
            raise ValueError(f"capacity_bytes must be a positive number of bytes or None, not {capacity_bytes!r}")
        check_compression(compression)
        self._capacity = None if capacity_bytes is None else int(capacity_bytes)
        self._camera = camera
        self._compression = compression
        self._fsync = bool(fsync)
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()
        self._root.mkdir(parents=True, exist_ok=True)

    @property
    def capacity_bytes(self) -> int | None:
        """The capacity, or None for an unlimited buffer."""
        return self._capacity

    def nbytes(self) -> int:
        """Bytes the buffer holds now (published image files and sidecars)."""
        return sum(r.nbytes for r in self._lister.files())

    def write(
        self,
        image_id: str,
        raft: str,
        kind: ImageKind | str,
        ccds: Mapping[str, np.ndarray],
        headers: Mapping[str, Mapping[str, Any]] | None = None,
        telemetry: Mapping[str, Any] | None = None,
        mjd: float | None = None,
        *,
        overwrite: bool = False,
    ) -> list[BufferEntry]:
        """Store one raft of one exposure in one kind; readers see it all at once or not at all.

        Parameters
        ----------
        image_id : str
            The exposure's OBSID, e.g. ``MC_O_20240101_000012``.
        raft : str
            Raft name, e.g. ``R22``.
        kind : ImageKind or str
            ``'raw'`` or ``'crosstalk_corrected'``.
        ccds : mapping of str to numpy.ndarray
            Detector name (``R22_S11``, of this raft) to an integer array ``(16, raw_height, raw_width)``
            of segments in HDU order; all detectors share one shape. Never modified.
        headers : mapping of str to dict, optional
            One primary header per detector (same names as ``ccds``), JSON-able values; None for empty.
        telemetry : dict, optional
            JSON-able telemetry recorded with the exposure.
        mjd : float, optional
            Write time (MJD); now by default. Orders ``scan`` and eviction.
        overwrite : bool
            Replace an image already in the buffer (a camera re-write); otherwise that is an error.

        Returns
        -------
        list of BufferEntry
            The raft images evicted to respect the capacity, oldest first (empty if none).

        Raises
        ------
        ValueError, TypeError
            If the arguments are malformed; the message says which and what is expected.
        FileExistsError
            If the image is already in the buffer and ``overwrite`` is False.
        """
        image = prepare_image(image_id, raft, kind, ccds, headers, telemetry, camera=self._camera)
        written = now_mjd() if mjd is None else finite_mjd(mjd)
        final = self.path(image_id, raft, image.kind)
        with self._lock:
            self._in_flight[image_id] += 1
            final.parent.mkdir(parents=True, exist_ok=True)
        try:
            if final.exists() and not overwrite:
                raise FileExistsError(
                    f"image {image_id} raft {raft} ({image.kind.value}) is already in the CDS buffer at "
                    f"{final}; "
                    "pass overwrite=True to replace it (readers see the old or the new image, never a mix)"
                )
            self._write_published(final, image, written)
            _log.debug("wrote %s (%d detectors, mjd %.6f)", final, len(image.ccds), written)
            return self._evict() if self._capacity is not None else []
        finally:
            with self._lock:
                self._in_flight[image_id] -= 1
                if self._in_flight[image_id] <= 0:
                    del self._in_flight[image_id]

    def _write_published(self, final: Path, image: PreparedImage, mjd: float) -> None:
        tag = f"{os.getpid()}.{uuid.uuid4().hex}.tmp"
        tmp = final.with_name(f".{final.name}.{tag}")
        sidecar, sidecar_tmp = sidecar_path(final), final.with_name(f".{final.name}{SIDECAR_SUFFIX}.{tag}")
        try:
            write_file(tmp, image, mjd, self._compression)
            sidecar_tmp.write_text(image.checksum + "\n")
            if self._fsync:
                fsync_path(tmp)
                fsync_path(sidecar_tmp)
            publish(sidecar_tmp, sidecar)
            publish(tmp, final)
            if self._fsync:
                fsync_path(final.parent)
        finally:
            tmp.unlink(missing_ok=True)
            sidecar_tmp.unlink(missing_ok=True)

    def _evict(self) -> list[BufferEntry]:
        """Remove the oldest whole images until the buffer fits its capacity; return what went."""
        assert self._capacity is not None
        evicted: list[BufferEntry] = []
        with self._lock:
            records = self._lister.files()
            total = sum(r.nbytes for r in records)
            by_image: dict[str, list[StoredFile]] = defaultdict(list)
            for r in records:
                by_image[r.entry.image_id].append(r)
            oldest_first = sorted(by_image, key=lambda i: (min(r.entry.mjd for r in by_image[i]), i))
            for image_id in oldest_first:
                if total <= self._capacity:
                    break
                if self._in_flight[image_id] > 0:
                    continue
                group = by_image[image_id]
                remove_image(group)
                freed = sum(r.nbytes for r in group)
                total -= freed
                evicted.extend(r.entry for r in group)
                _log.info(
                    "evicted image %s (%d raft images, %d bytes) from the CDS buffer %s to stay within "
                    "%d bytes",
                    image_id, len(group), freed, self._root, self._capacity,
                )  # fmt: skip
            if total > self._capacity:
                _log.warning(
                    "CDS buffer %s holds %d bytes, over its capacity of %d, with only images being written "
                    "left; raise capacity_bytes to hold at least one full exposure",
                    self._root, total, self._capacity,
                )  # fmt: skip
        return evicted


class CDSClient(_BufferView):
    """DM's side of the CDS: retrieves raft images from the buffer at ``root``, verifying each.

    Parameters
    ----------
    root : path-like
        The buffer directory; it must exist (a mistyped path would otherwise block forever).

    Raises
    ------
    FileNotFoundError
        If ``root`` is not a directory.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        if not self._root.is_dir():
            raise FileNotFoundError(
                f"CDS buffer {self._root} does not exist; check the path, or create the buffer "
                "(CDSBuffer(root)) before starting clients"
            )

    def retrieve(
        self,
        image_id: str,
        raft: str,
        kind: ImageKind | str,
        timeout: float | None = None,
        poll_interval: float = 0.02,
    ) -> RaftImage:
        """Wait for one raft image, read it and verify its checksum.

        Parameters
        ----------
        image_id, raft, kind
            Which image: OBSID, raft name, ``'raw'`` or ``'crosstalk_corrected'``.
        timeout : float, optional
            Seconds to wait for the image to appear; None (default) waits forever.
        poll_interval : float
            Seconds between looks at the buffer (and before the one re-read after a checksum mismatch).

        Returns
        -------
        RaftImage
            With read-only arrays.

        Raises
        ------
        CDSTimeout
            If the image did not appear in time (retriable).
        CDSChecksumError
            If the content does not match its checksum twice in a row (not retriable).
        CDSNotFound
            If the image was evicted while being read.
        CDSFormatError
            If the file is not a readable CDS raft image.
        """
        kind = ImageKind.parse(kind)
        path = self.path(image_id, raft, kind)
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be None or a number of seconds >= 0, not {timeout!r}")
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be a positive number of seconds, not {poll_interval!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not path.is_file():
            if deadline is None:
                time.sleep(poll_interval)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CDSTimeout(
                    f"image {image_id} raft {raft} ({kind.value}) did not appear in the CDS buffer "
                    f"{self._root} "
                    f"within {timeout:g} s; the readout may be late or may have failed — retry, or leave the "
                    "image to the Catch-Up Archiver",
                    path=path,
                )
            time.sleep(min(poll_interval, remaining))
        return self._load(path, image_id, raft, kind, poll_interval)

    def read(self, image_id: str, raft: str, kind: ImageKind | str) -> RaftImage:
        """Read and verify one raft image that should be in the buffer now, without waiting.

        Raises
        ------
        CDSNotFound
            If it is not there; use :meth:`retrieve` to wait for it.
        CDSChecksumError, CDSFormatError
            As for :meth:`retrieve`.
        """
        kind = ImageKind.parse(kind)
        path = self.path(image_id, raft, kind)
        if not path.is_file():
            raise CDSNotFound(
                f"image {image_id} raft {raft} ({kind.value}) is not in the CDS buffer {self._root}; use "
                "retrieve() to wait for it, or take it from the raw image cache if it was evicted",
                path=path,
            )
        return self._load(path, image_id, raft, kind, 0.02)

    def retrieve_ccd(
        self,
        image_id: str,
        detector: str,
        kind: ImageKind | str,
        timeout: float | None = None,
        poll_interval: float = 0.02,
    ) -> tuple[dict[str, Any], np.ndarray]:
        """Wait for the raft image holding ``detector`` and return that detector's header and segments.

        Parameters
        ----------
        detector : str
            Detector name such as ``R22_S11``.
        image_id, kind, timeout, poll_interval
            As for :meth:`retrieve`.

        Returns
        -------
        header : dict
            The detector's primary header keywords.
        segments : numpy.ndarray
            Read-only int32 array ``(16, raw_height, raw_width)`` in HDU order.

        Raises
        ------
        CDSNotFound
            If the raft image does not include ``detector``; otherwise as for :meth:`retrieve`.
        """
        image = self.retrieve(image_id, raft_of_detector(detector), kind, timeout, poll_interval)
        if detector not in image.ccds:
            raise CDSNotFound(
                f"raft image {image_id} {image.raft} ({image.kind.value}) has no detector {detector}; "
                f"it holds "
                f"{', '.join(image.detectors)} — check the detector name",
                path=self.path(image_id, image.raft, image.kind),
            )
        return image.headers[detector], image.ccds[detector]

    def _load(self, path: Path, image_id: str, raft: str, kind: ImageKind, reread_delay: float) -> RaftImage:
        for attempt in (1, 2):
            try:
                image = read_file(path, image_id, raft, kind)
            except FileNotFoundError:
                raise CDSNotFound(
                    f"image {image_id} raft {raft} ({kind.value}) was evicted from the CDS buffer "
                    f"{self._root} "
                    "while being read; take it from the raw image cache or the network outage buffer",
                    path=path,
                ) from None
            problem = checksum_problem(image, path)
            if problem is None:
                return image
            if attempt == 1:
                _log.warning("%s: %s; reading it again", path, problem)
                time.sleep(reread_delay)
        raise CDSChecksumError(
            f"image {image_id} raft {raft} ({kind.value}) in {path}: {problem}, twice; the stored copy is "
            "damaged — do not archive it; ask the camera to re-write it or take it from the raw image cache",
            path=path,
        )
