"""Where the night's images are kept: image blobs, the network outage buffer and the raw image cache.

LDM-230 §2.1–2.2: the replicator writes each crosstalk-corrected raft image to the network outage buffer
and the raw image cache, and each raw one to the outage buffer and the tape archive
(:mod:`lsstpipe.archive.tape`); the distributor writes what it receives to the Archive's raw image cache
and tape. Every item is tagged with the Archiver mode.

What moves is an *image blob*: the bytes of one CDS raft-image HDF5 file (:func:`encode_image`, the
format of :mod:`lsstpipe.cds.store`), decoded and verified without touching disk by
:func:`decode_image`. Every stored item has an :class:`ImageKey` and an :class:`ItemMeta` (content
checksum, size, mode, time stored).

On disk both stores use ``root/{day_obs}/{image_id}/{raft}_{kind}.h5`` (the blob, a readable HDF5 file)
and a sidecar ``….h5.json`` (the metadata). A put writes the blob, then the sidecar, each under a hidden
temporary name, flushed to disk and renamed into place: the sidecar's appearance is the commit. A blob
without a sidecar, or a temporary file of a dead writer of this host, is a crash's leftover and is removed
when a store is opened. Puts and removals hold an ``flock`` on ``root/.lock``, so several processes may
share a store.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import io
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import h5py
import numpy as np

from lsstpipe.cds.image import (
    CDSChecksumError,
    CDSFormatError,
    ImageKind,
    PreparedImage,
    RaftImage,
    canonical_json,
    check_raft,
    finite_mjd,
    image_day_obs,
)
from lsstpipe.cds.store import FORMAT_NAME, check_compression, fsync_path, now_mjd, read_file, write_file

_log = logging.getLogger(__name__)

_HOST = socket.gethostname().replace(".", "_")


class ArchiveError(Exception):
    """Base class of archive storage failures; ``retriable`` says whether trying later may succeed."""

    retriable: bool = False


class ArchiveNotFound(ArchiveError, LookupError):
    """No item under that key in this store."""


class ArchiveConflict(ArchiveError):
    """A different image (another content checksum) is already stored under that key."""


class OutageBufferFull(ArchiveError):
    """The network outage buffer cannot take the item without dropping unconfirmed images (retriable)."""

    retriable = True


class ArchiverMode(enum.Enum):
    """The Archiver mode every stored image is tagged with (LDM-230)."""

    SCIENCE = "science"
    """Science visits: the Archiver feeding Alert Production."""
    CALIBRATION = "calibration"
    """Calibration frames, no visits."""
    ENGINEERING = "engineering"
    """Engineering images, no visits."""
    CATCHUP = "catchup"
    """Images archived late by the Catch-Up Archiver."""

    @classmethod
    def parse(cls, mode: ArchiverMode | str) -> ArchiverMode:
        """The mode named by ``mode``; ``ValueError`` naming the choices otherwise."""
        if isinstance(mode, cls):
            return mode
        try:
            return cls(mode)
        except ValueError:
            raise ValueError(f"unknown Archiver mode {mode!r}; use one of {[m.value for m in cls]}") from None


@dataclass(frozen=True, order=True)
class ImageKey:
    """Which raft image an item is: ``str(key)`` is ``MC_O_20261125_000001/R11/raw``.

    ``kind`` may be given as an :class:`~lsstpipe.cds.image.ImageKind`; it is kept as its value.
    """

    image_id: str
    raft: str
    kind: str

    def __post_init__(self) -> None:
        image_day_obs(self.image_id)
        check_raft(self.raft)
        object.__setattr__(self, "kind", ImageKind.parse(self.kind).value)

    def __str__(self) -> str:
        return f"{self.image_id}/{self.raft}/{self.kind}"

    @property
    def image_kind(self) -> ImageKind:
        """The kind as an :class:`~lsstpipe.cds.image.ImageKind`."""
        return ImageKind(self.kind)

    @property
    def day_obs(self) -> str:
        """Observing day ``YYYYMMDD`` of the image."""
        return image_day_obs(self.image_id)

    @classmethod
    def parse(cls, text: str) -> ImageKey:
        """The key written as ``image_id/raft/kind``; ``ValueError`` for anything else."""
        parts = text.split("/") if isinstance(text, str) else []
        if len(parts) != 3:
            raise ValueError(f"image key {text!r} is not of the form MC_O_20261125_000001/R11/raw")
        return cls(*parts)

    @classmethod
    def of(cls, image: RaftImage | PreparedImage) -> ImageKey:
        """The key of a raft image."""
        return cls(image.image_id, image.raft, image.kind.value)


def as_key(key: ImageKey | str) -> ImageKey:
    """``key`` as an :class:`ImageKey` (from one or from its ``str``); ``TypeError`` otherwise."""
    if isinstance(key, ImageKey):
        return key
    if isinstance(key, str):
        return ImageKey.parse(key)
    raise TypeError(f"key must be an ImageKey (or 'image_id/raft/kind'), not {type(key).__name__}")


@dataclass(frozen=True)
class ItemMeta:
    """What is stored with every item.

    Attributes
    ----------
    checksum : str
        The image's SHA-256 content checksum (:func:`lsstpipe.cds.image.compute_checksum`), 64 hex digits.
    nbytes : int
        Size of the blob in bytes.
    mode : ArchiverMode
        Archiver mode the image was taken in (a str is parsed).
    stored_mjd : float or None
        When the item was stored (MJD); None before storing — the store fills it in.
    """

    checksum: str
    nbytes: int
    mode: ArchiverMode
    stored_mjd: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.checksum, str) and len(self.checksum) == 64 and _is_hex(self.checksum)):
            raise ValueError(f"checksum {self.checksum!r} is not a SHA-256 hex digest (64 lowercase hex digits)")
        if not isinstance(self.nbytes, int) or isinstance(self.nbytes, bool) or self.nbytes <= 0:
            raise ValueError(f"nbytes must be a positive int (the blob's length), not {self.nbytes!r}")
        object.__setattr__(self, "mode", ArchiverMode.parse(self.mode))
        if self.stored_mjd is not None:
            object.__setattr__(self, "stored_mjd", finite_mjd(self.stored_mjd))

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (``mode`` as its value)."""
        return {
            "checksum": self.checksum,
            "nbytes": self.nbytes,
            "mode": self.mode.value,
            "stored_mjd": self.stored_mjd,
        }


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def encode_image(
    image: RaftImage | PreparedImage, compression: str | None = None, *, mjd: float | None = None
) -> bytes:
    """The image blob of a raft image: the bytes of its CDS raft-image HDF5 file.

    The same image, compression and ``mjd`` always give the same bytes. The content is not re-verified
    here (the stored checksum travels with it; :func:`decode_image` verifies).

    Parameters
    ----------
    image : RaftImage or PreparedImage
        From :class:`~lsstpipe.cds.CDSClient` or :func:`~lsstpipe.cds.image.prepare_image`.
    compression : {None, 'gzip', 'lzf', 'blosc-lz4'}
        HDF5 compression of the pixels (:data:`lsstpipe.cds.store.COMPRESSIONS`).
    mjd : float, optional
        The camera's write time recorded in the blob; defaults to ``image.written_mjd`` for a
        ``RaftImage`` and 0.0 (unknown) for a ``PreparedImage``.

    Raises
    ------
    TypeError, ValueError
        If ``image`` is neither kind of image, holds pixels that are not int32 segments, or the
        compression is unknown.
    """
    check_compression(compression)
    if isinstance(image, RaftImage):
        for name, pixels in image.ccds.items():
            if not isinstance(pixels, np.ndarray) or pixels.dtype != np.int32 or pixels.ndim != 3:
                raise ValueError(f"detector {name} of {ImageKey.of(image)} does not hold int32 segments; "
                                 "build the image with lsstpipe.cds.image.prepare_image")  # fmt: skip
        if set(image.headers) != set(image.ccds):
            raise ValueError(f"{ImageKey.of(image)} has headers for {sorted(image.headers)} but pixels for "
                             f"{sorted(image.ccds)}; every detector needs exactly one header")  # fmt: skip
        headers = {name: canonical_json(dict(image.headers[name]), f"header of {name}") for name in image.ccds}
        telemetry = canonical_json(dict(image.telemetry), "telemetry")
        prepared = PreparedImage(image.image_id, image.raft, image.kind, dict(image.ccds), headers, telemetry,
                                 image.checksum)  # fmt: skip
        written = image.written_mjd
    elif isinstance(image, PreparedImage):
        prepared, written = image, 0.0
    else:
        raise TypeError(f"encode_image takes a RaftImage or PreparedImage, not {type(image).__name__}")
    buffer = io.BytesIO()
    # h5py writes to a file-like object as to a path; write_file's hint only names paths.
    write_file(cast(Path, buffer), prepared, finite_mjd(written if mjd is None else mjd), compression)
    return buffer.getvalue()


def decode_image(data: bytes, key: ImageKey | str, verify: bool = True) -> RaftImage:
    """The verified raft image held by a blob.

    ``verify=False`` skips the content check (the SHA-256 of every pixel, most of the decoding's time) for a
    caller that has established otherwise that these are the bytes of a verified copy, e.g. by the SHA-256 of
    the bytes themselves; the header and the layout are still checked.

    Raises
    ------
    CDSFormatError
        If ``data`` is not a readable CDS raft image of ``key`` (damaged, truncated or mislabelled).
    CDSChecksumError
        If it reads but its content does not match its checksum (damaged).
    """
    key = as_key(key)
    data = check_data(data)
    try:
        image = read_file(cast(Path, io.BytesIO(data)), key.image_id, key.raft, key.image_kind)
    except CDSFormatError as exc:
        raise CDSFormatError(_damaged(key, len(data), str(exc.__cause__ or exc))) from exc
    except Exception as exc:  # noqa: BLE001 - HDF5 reports some damage as other errors
        raise CDSFormatError(_damaged(key, len(data), f"{type(exc).__name__}: {exc}")) from exc
    if verify:
        image.verify()
    return image


def check_copy(key: ImageKey, stored: bytes, received: bytes, where: str) -> None:
    """Raise :class:`CDSChecksumError` unless the copy of ``key`` read back from ``where`` is ``received``,
    byte for byte."""
    if stored != received:
        raise CDSChecksumError(
            f"the copy of {key} read back from {where} ({len(stored)} bytes) differs from the {len(received)} "
            "bytes stored; the store damaged it — store it again (the Base keeps its copy until the Archive confirms)"
        )


def _damaged(key: ImageKey, nbytes: int, why: str) -> str:
    return (f"the {nbytes}-byte blob of {key} is not a readable CDS raft image ({why}); the copy is damaged or "
            "is another image — do not archive it; take the image from another copy (CDS buffer, outage buffer, "
            "raw image cache or tape)")  # fmt: skip


def blob_meta(key: ImageKey | str, data: bytes, mode: ArchiverMode | str) -> ItemMeta:
    """The :class:`ItemMeta` of a blob, from its header (cheap: the pixels are not read or verified).

    Raises
    ------
    CDSFormatError
        If the blob is not a CDS raft image of ``key``.
    """
    key = as_key(key)
    data = check_data(data)
    return ItemMeta(blob_checksum(key, data), len(data), ArchiverMode.parse(mode))


def blob_checksum(key: ImageKey, data: bytes) -> str:
    """The content checksum in a blob's header; ``CDSFormatError`` if it is not a blob of ``key``."""
    try:
        with h5py.File(io.BytesIO(data), "r", locking=False) as f:
            attrs = f.attrs
            if attrs.get("format") != FORMAT_NAME:
                raise ValueError(f"no '{FORMAT_NAME}' format marker")
            found = ImageKey(str(attrs["image_id"]), str(attrs["raft"]), str(attrs["kind"]))
            checksum = str(attrs["checksum"])
    except Exception as exc:  # noqa: BLE001
        raise CDSFormatError(_damaged(key, len(data), f"{type(exc).__name__}: {exc}")) from exc
    if found != key:
        raise CDSFormatError(f"the blob stored under {key} holds image {found}; store it under its own key")
    return checksum


def check_data(data: Any) -> bytes:
    """``data`` as non-empty bytes; ``TypeError``/``CDSFormatError`` otherwise."""
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"an image blob must be bytes (from encode_image), not {type(data).__name__}")
    if not data:
        raise CDSFormatError("the image blob is empty; the transfer lost it — fetch the image again")
    return data


class StoredItem(NamedTuple):
    """One item of a store: its key, metadata and the store's sequence number (put order)."""

    key: ImageKey
    meta: ItemMeta
    sequence: int


def prepare_root(root: str | os.PathLike[str], what: str) -> Path:
    """``root`` as a directory (created if missing); ``NotADirectoryError`` if it is something else."""
    path = Path(root)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"the {what} root {path} exists and is not a directory; pass a directory path")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(final: Path, data: bytes, fsync: bool) -> None:
    """Write ``data`` to ``final`` under a hidden temporary name, flush it and rename it into place."""
    tmp = final.with_name(f".{final.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, final)
        if fsync:
            fsync_path(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _stale_tmp(name: str) -> bool:
    """Whether a hidden temporary file was left by a dead writer of this host."""
    parts = name.split(".")
    if len(parts) < 5 or parts[-1] != "tmp" or parts[-4] != _HOST or not parts[-3].isdigit():
        return False
    try:
        os.kill(int(parts[-3]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


@contextlib.contextmanager
def flocked(path: Path, exclusive: bool = True) -> Iterator[None]:
    """Hold an ``flock`` on ``path`` (created if missing) for the duration of the block."""
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _BlobStore:
    """A directory of blobs with JSON sidecars; see the module docstring for the layout."""

    _what = "blob store"

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self._root = prepare_root(root, self._what)
        self._fsync = fsync
        self._lock = self._root / ".lock"
        self._cache: dict[Path, tuple[tuple[int, int, int], StoredItem]] = {}
        with flocked(self._lock):
            self._scan(clean=True)

    @property
    def root(self) -> Path:
        """The store's directory."""
        return self._root

    def path(self, key: ImageKey | str) -> Path:
        """Where the blob of ``key`` is (or would be) kept."""
        key = as_key(key)
        return self._root / key.day_obs / key.image_id / f"{key.raft}_{key.kind}.h5"

    def _scan(self, clean: bool = False) -> dict[ImageKey, StoredItem]:
        items: dict[ImageKey, StoredItem] = {}
        cache: dict[Path, tuple[tuple[int, int, int], StoredItem]] = {}
        if clean:  # temporary files of the metadata and counters at the root
            for path in _entries(self._root, dirs=False):
                if path.name.startswith(".") and _stale_tmp(path.name):
                    path.unlink(missing_ok=True)
        for day in _entries(self._root, dirs=True):
            for image_dir in _entries(day, dirs=True):
                for path in _entries(image_dir, dirs=False):
                    name = path.name
                    if clean and name.startswith(".") and _stale_tmp(name):
                        _log.warning("removing %s, left by a writer that died, from the %s", path, self._what)
                        path.unlink(missing_ok=True)
                    elif clean and name.endswith(".h5") and not path.with_name(name + ".json").exists():
                        _log.warning("removing %s: a put that never committed (no metadata sidecar)", path)
                        path.unlink(missing_ok=True)
                    elif name.endswith(".h5.json") and not name.startswith("."):
                        item = self._read_meta(path, cache)
                        if item is not None:
                            items[item.key] = item
        self._cache = cache
        return items

    def _read_meta(self, path: Path, cache: dict) -> StoredItem | None:
        try:
            st = path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._cache.get(path)
            if cached is not None and cached[0] == stamp:
                item = cached[1]
            else:
                record = json.loads(path.read_text())
                key = ImageKey.parse(record.pop("key"))
                sequence = int(record.pop("sequence"))
                item = StoredItem(key, ItemMeta(**record), sequence)
                if path != self._sidecar(key):
                    raise ValueError(f"it describes {key}, which belongs elsewhere")
        except FileNotFoundError:
            return None  # removed while we looked
        except (OSError, ValueError, TypeError, KeyError) as exc:
            _log.warning("skipping unreadable %s metadata %s (%s); remove it and its blob", self._what, path, exc)
            return None
        cache[path] = (stamp, item)
        return item

    def _put(self, key: ImageKey | str, data: bytes, meta: ItemMeta, capacity: int | None = None) -> ItemMeta:
        key, data = as_key(key), check_data(data)
        if not isinstance(meta, ItemMeta):
            raise TypeError(f"meta must be an ItemMeta (see blob_meta), not {type(meta).__name__}")
        if meta.nbytes != len(data):
            raise ValueError(f"meta says {meta.nbytes} bytes but the blob of {key} has {len(data)}")
        checksum = blob_checksum(key, data)
        if checksum != meta.checksum:
            raise ValueError(f"meta checksum {meta.checksum[:16]}… is not the blob's {checksum[:16]}… ({key})")
        with flocked(self._lock):
            old = self._lookup(key)
            if old is not None:
                if old.meta.checksum != meta.checksum:
                    raise ArchiveConflict(
                        f"{self._what} {self._root} already holds {key} with content checksum "
                        f"{old.meta.checksum[:16]}…, not {meta.checksum[:16]}…; a stored image is never "
                        "overwritten — find out which copy is right before removing the stored one"
                    )
                return old.meta
            if capacity is not None:
                self._check_room(key, len(data), self._scan(), capacity)
            stored = ItemMeta(
                meta.checksum, meta.nbytes, meta.mode, now_mjd() if meta.stored_mjd is None else meta.stored_mjd
            )
            sequence = self._next_sequence()
            final = self.path(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(final, data, self._fsync)
            record = {"key": str(key), "sequence": sequence, **stored.to_json()}
            write_atomic(self._sidecar(key), json.dumps(record).encode(), self._fsync)
        return stored

    def _next_sequence(self) -> int:
        """The next put's sequence number, from the counter in ``root/.sequence`` (call under the lock)."""
        counter = self._root / ".sequence"
        try:
            sequence = int(counter.read_text()) + 1
        except (FileNotFoundError, ValueError):
            sequence = max((i.sequence for i in self._scan().values()), default=0) + 1
        write_atomic(counter, str(sequence).encode(), self._fsync)
        return sequence

    def _check_room(self, key: ImageKey, nbytes: int, items: dict[ImageKey, StoredItem], capacity: int) -> None:
        pass

    def _remove(self, key: ImageKey) -> None:
        final = self.path(key)
        self._sidecar(key).unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        for d in (final.parent, final.parent.parent):
            with contextlib.suppress(OSError):  # other items remain
                d.rmdir()

    def _sidecar(self, key: ImageKey) -> Path:
        final = self.path(key)
        return final.with_name(final.name + ".json")

    def _lookup(self, key: ImageKey) -> StoredItem | None:
        item = self._read_meta(self._sidecar(key), self._cache)
        return item if item is not None and item.key == key else None

    def _item(self, key: ImageKey | str) -> StoredItem:
        key = as_key(key)
        item = self._lookup(key)
        if item is None:
            raise ArchiveNotFound(f"{key} is not in the {self._what} {self._root}; check the key, or take the "
                                  "image from another copy")  # fmt: skip
        return item

    def get(self, key: ImageKey | str) -> bytes:
        """The blob stored under ``key``; :class:`ArchiveNotFound` if there is none."""
        self._item(key)
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise ArchiveNotFound(f"{key} was removed from the {self._what} {self._root} while it was read") from None

    def meta(self, key: ImageKey | str) -> ItemMeta:
        """The metadata stored with ``key``; :class:`ArchiveNotFound` if there is none."""
        return self._item(key).meta

    def has(self, key: ImageKey | str) -> bool:
        """Whether an item is stored under ``key``."""
        return self._lookup(as_key(key)) is not None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (ImageKey, str)) and self.has(key)

    def __len__(self) -> int:
        return len(self._scan())

    @property
    def nbytes(self) -> int:
        """Bytes of the blobs held (sidecars not counted)."""
        return sum(i.meta.nbytes for i in self._scan().values())

    def entries(self) -> list[StoredItem]:
        """Every item, oldest first (time stored, then put order)."""
        return sorted(self._scan().values(), key=lambda i: (i.meta.stored_mjd, i.sequence))

    def verify(self, key: ImageKey | str, received: bytes | None = None) -> str:
        """Read the stored copy back, decode and verify it; return its content checksum.

        Parameters
        ----------
        key : ImageKey or str
        received : bytes, optional
            The bytes that were stored, already decoded and verified by the caller (the distributor checks
            every image it receives): the copy read back is then compared with them byte for byte instead
            of being decoded again — identical bytes hold the identical, verified content (a 44 MB raft
            file: 0.03 s instead of 0.8).

        Raises
        ------
        ArchiveNotFound
            If nothing is stored under ``key``.
        CDSChecksumError, CDSFormatError
            If the stored copy is damaged (or does not match its metadata).
        """
        key = as_key(key)
        expected = self.meta(key).checksum
        if received is not None:
            check_copy(key, self.get(key), received, f"the {self._what} {self._root}")
            return expected
        image = decode_image(self.get(key), key)
        if image.checksum != expected:
            raise CDSFormatError(f"the copy of {key} in {self._root} has checksum {image.checksum[:16]}…, its "
                                 f"metadata says {expected[:16]}…; the item is damaged — re-store it from another copy")  # fmt: skip
        return image.checksum


def _entries(path: Path, dirs: bool) -> list[Path]:
    try:
        with os.scandir(path) as it:
            return sorted(Path(e.path) for e in it if e.is_dir(follow_symlinks=False) == dirs
                          and (dirs is False or not e.name.startswith(".")))  # fmt: skip
    except FileNotFoundError:
        return []


class OutageBuffer(_BlobStore):
    """The Base's network outage buffer: a copy of each image until the Archive confirms it (LDM-230).

    Nothing unconfirmed is ever evicted: a put that does not fit raises :class:`OutageBufferFull`.
    The Catch-Up Archiver sends :meth:`pending` items, oldest first, and :meth:`confirm` removes each
    once the Archive confirmed it.

    Parameters
    ----------
    root : path-like
        The buffer's directory, created if missing; reopening a directory sees everything it holds.
    capacity_bytes : int, optional
        Most blob bytes held. Recorded in ``root/outage-buffer.json``; None reopens with the recorded one.
    fsync : bool
        Flush every put to disk before it counts as stored (the buffer must survive a power cut).
    """

    _what = "network outage buffer"

    def __init__(self, root: str | os.PathLike[str], capacity_bytes: int | None = None, *, fsync: bool = True) -> None:
        path = prepare_root(root, self._what)
        config = path / "outage-buffer.json"
        if capacity_bytes is None:
            try:
                capacity_bytes = json.loads(config.read_text())["capacity_bytes"]
            except FileNotFoundError:
                raise ValueError(
                    f"{path} is not a network outage buffer yet; pass capacity_bytes to create one"
                ) from None
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{config} is unreadable ({exc}); pass capacity_bytes to rewrite it") from None
        if not isinstance(capacity_bytes, int) or isinstance(capacity_bytes, bool) or capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be a positive int (bytes of blobs held), not {capacity_bytes!r}")
        self._capacity = capacity_bytes
        write_atomic(config, json.dumps({"capacity_bytes": capacity_bytes}).encode(), fsync)
        self._confirmed_log = path / "confirmed.log"
        super().__init__(path, fsync=fsync)

    @property
    def capacity_bytes(self) -> int:
        """Most blob bytes the buffer holds."""
        return self._capacity

    def put(self, key: ImageKey | str, data: bytes, meta: ItemMeta) -> ItemMeta:
        """Keep a copy of one image until the Archive confirms it.

        Idempotent: the same key with the same content checksum returns the stored metadata.

        Returns
        -------
        ItemMeta
            The metadata as stored (``stored_mjd`` filled in).

        Raises
        ------
        OutageBufferFull
            If the blob does not fit without dropping unconfirmed images (retriable).
        ArchiveConflict
            If another image is stored under ``key``.
        ValueError, CDSFormatError
            If ``meta`` does not describe ``data`` or ``data`` is not a blob of ``key``.
        """
        return self._put(key, data, meta, self._capacity)

    def _check_room(self, key: ImageKey, nbytes: int, items: dict[ImageKey, StoredItem], capacity: int) -> None:
        held = sum(i.meta.nbytes for i in items.values())
        if held + nbytes > capacity:
            raise OutageBufferFull(
                f"network outage buffer {self._root} is full: it holds {held} of {capacity} bytes in {len(items)} "
                f"unconfirmed images and {key} needs {nbytes}; nothing unconfirmed is dropped — run the Catch-Up "
                "Archiver to send the pending images to the Archive and confirm them, or raise capacity_bytes"
            )

    def confirm(self, key: ImageKey | str) -> bool:
        """Remove an image the Archive confirmed it holds.

        Returns
        -------
        bool
            True if it was removed now, False if it had already been confirmed (idempotent).

        Raises
        ------
        ArchiveNotFound
            If ``key`` was never in the buffer.
        """
        key = as_key(key)
        with flocked(self._lock):
            if self._lookup(key) is not None:
                with open(self._confirmed_log, "a") as f:
                    f.write(f"{key}\n")
                    f.flush()
                    if self._fsync:
                        os.fsync(f.fileno())
                self._remove(key)
                return True
            try:
                confirmed = set(self._confirmed_log.read_text().split())
            except FileNotFoundError:
                confirmed = set()
        if str(key) in confirmed:
            return False
        raise ArchiveNotFound(f"{key} was never in the network outage buffer {self._root}; only a stored image "
                              "can be confirmed — check the key")  # fmt: skip

    def pending(self) -> list[StoredItem]:
        """The images not yet confirmed, oldest first: what the Catch-Up Archiver sends."""
        return self.entries()


class RawImageCache(_BlobStore):
    """The raw image cache at the Base or the Archive: every crosstalk-corrected image, kept (LDM-230).

    Parameters
    ----------
    root : path-like
        The cache's directory, created if missing.
    fsync : bool
        Flush every put to disk before it counts as stored.
    """

    _what = "raw image cache"

    def put(self, key: ImageKey | str, data: bytes, meta: ItemMeta) -> ItemMeta:
        """Store one image; idempotent for the same content, :class:`ArchiveConflict` for other content.

        Returns
        -------
        ItemMeta
            The metadata as stored (``stored_mjd`` filled in).
        """
        return self._put(key, data, meta)
