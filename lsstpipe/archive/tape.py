"""The tape archive: append-only HDF5 volumes written in time order, and a library reading across them.

LDM-230: "Writing to the tape archive system is obviously done in timewise order." Several ranks archive
at once, so each writer has its own volume file, ``root/volume-{volume}.h5`` (e.g. one per distributor
rank, ``volume-003.h5``); a :class:`TapeLibrary` reads all volumes of a root.

Volume format
-------------
Root attributes ``format`` (``lsstpipe-tape-volume``), ``format_version`` and ``volume``; a group
``blobs`` with one 1-D uint8 dataset per image blob, named by its sequence number (``000000042``) in
arrival order; and ``index``, a resizable compound dataset with one row per blob: ``sequence``,
``image_id``, ``raft``, ``kind``, ``checksum`` (content), ``sha256`` (of the blob's bytes), ``nbytes``,
``mode`` and ``written_mjd``. A blob counts as archived once its index row is written.

Durability and concurrency
--------------------------
Each append opens the volume, writes the blob, then its index row, and closes it (flushing and, by
default, ``fsync``-ing): a writer that dies between appends leaves a complete, readable volume. A volume
has one writer at a time (an ``flock`` on ``.volume-{volume}.h5.writer`` held for the writer's life);
appends hold an exclusive and reads a shared ``flock`` on ``.volume-{volume}.h5.lock``, so readers in
other processes never see a half-written append. HDF5 file locking is off, as in the CDS buffer.
HDF5 is not journaled: a writer killed *during* an append may leave the volume damaged, which
:class:`TapeLibrary` reports as :class:`~lsstpipe.cds.image.CDSFormatError`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import h5py
import numpy as np

from lsstpipe.archive.blobs import (
    ArchiverMode,
    ImageKey,
    ItemMeta,
    as_key,
    blob_checksum,
    check_copy,
    check_data,
    decode_image,
)
from lsstpipe.archive.storage import ArchiveConflict, ArchiveError, ArchiveNotFound, flocked, prepare_root
from lsstpipe.cds.image import CDSChecksumError, CDSFormatError
from lsstpipe.cds.store import fsync_path, now_mjd

FORMAT_NAME = "lsstpipe-tape-volume"
FORMAT_VERSION = 1
_VOLUME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_INDEX_DTYPE = np.dtype(
    [
        ("sequence", "<i8"),
        ("image_id", "S32"),
        ("raft", "S8"),
        ("kind", "S24"),
        ("checksum", "S64"),
        ("sha256", "S64"),
        ("nbytes", "<i8"),
        ("mode", "S16"),
        ("written_mjd", "<f8"),
    ]
)


@dataclass(frozen=True)
class TapeRecord:
    """One blob on tape: where it is and what the index says about it."""

    volume: str
    sequence: int
    """Position in the volume, from 1, in arrival order."""
    key: ImageKey
    checksum: str
    """Content checksum of the image."""
    sha256: str
    """SHA-256 of the blob's bytes as written."""
    nbytes: int
    mode: ArchiverMode
    written_mjd: float
    """When it was written to tape (MJD)."""

    @property
    def meta(self) -> ItemMeta:
        """The record as the :class:`~lsstpipe.archive.blobs.ItemMeta` of the item."""
        return ItemMeta(self.checksum, self.nbytes, self.mode, self.written_mjd)


def volume_path(root: str | os.PathLike[str], volume: str) -> Path:
    """The file of one volume: ``root/volume-{volume}.h5``; ``ValueError`` for a malformed name."""
    if not (isinstance(volume, str) and _VOLUME_RE.fullmatch(volume)):
        raise ValueError(
            f"tape volume name {volume!r} must be 1–64 letters, digits, '-' or '_' (e.g. '003' for rank 3)"
        )
    return Path(root) / f"volume-{volume}.h5"


def _lock_path(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{what}")


def _read_index(path: Path, volume: str) -> list[TapeRecord]:
    """The index of a volume file, in sequence order."""
    try:
        with flocked(_lock_path(path, "lock"), exclusive=False), h5py.File(path, "r", locking=False) as f:
            if f.attrs.get("format") != FORMAT_NAME or int(f.attrs["format_version"]) != FORMAT_VERSION:
                raise ValueError(f"not a {FORMAT_NAME} version {FORMAT_VERSION} file")
            if str(f.attrs["volume"]) != volume:
                raise ValueError(f"it holds volume {f.attrs['volume']!r}, not {volume!r}")
            rows = f["index"][()]
    except FileNotFoundError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CDSFormatError(
            f"tape volume {path} is unreadable ({exc}); it is damaged or not a tape volume — restore it from "
            "the other site's tape archive, or move it out of the archive directory",
            path=path,
        ) from exc
    return [_record(volume, row) for row in rows]


def _record(volume: str, row: Any) -> TapeRecord:
    text = {name: row[name].decode() for name in ("image_id", "raft", "kind", "checksum", "sha256", "mode")}
    return TapeRecord(
        volume=volume,
        sequence=int(row["sequence"]),
        key=ImageKey(text["image_id"], text["raft"], text["kind"]),
        checksum=text["checksum"],
        sha256=text["sha256"],
        nbytes=int(row["nbytes"]),
        mode=ArchiverMode(text["mode"]),
        written_mjd=float(row["written_mjd"]),
    )


def _blob_name(sequence: int) -> str:
    return f"{sequence:09d}"


def _read_blob(path: Path, record: TapeRecord) -> bytes:
    with flocked(_lock_path(path, "lock"), exclusive=False), h5py.File(path, "r", locking=False) as f:
        return np.asarray(f["blobs"][_blob_name(record.sequence)][()]).tobytes()


def _verify(record: TapeRecord, data: bytes, received: bytes | None = None) -> str:
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.sha256 or len(data) != record.nbytes:
        raise CDSChecksumError(
            f"the copy of {record.key} on tape volume {record.volume} (sequence {record.sequence}) is damaged: "
            f"{len(data)} bytes with SHA-256 {digest[:16]}…, the index says {record.nbytes} bytes with "
            f"{record.sha256[:16]}… — restore it from the other site's tape or the raw image cache"
        )
    if received is not None:
        check_copy(record.key, data, received, f"tape volume {record.volume}")
        return record.checksum
    image = decode_image(data, record.key)
    if image.checksum != record.checksum:
        raise CDSFormatError(
            f"the copy of {record.key} on tape volume {record.volume} holds content {image.checksum[:16]}…, "
            f"the index says {record.checksum[:16]}…; the volume's index is damaged"
        )
    return image.checksum


class TapeArchive:
    """One append-only tape volume, written by one writer (see the module docstring).

    Parameters
    ----------
    root : path-like
        The tape archive's directory, created if missing.
    volume : str
        This writer's volume name (letters, digits, ``-``, ``_``), e.g. ``'003'`` for rank 3; an existing
        volume is reopened and appended to.
    fsync : bool
        Flush every append to disk before it counts as archived.

    Raises
    ------
    ArchiveError
        If another writer holds the volume.
    CDSFormatError
        If the volume file exists but is not a readable tape volume.
    """

    def __init__(self, root: str | os.PathLike[str], volume: str, *, fsync: bool = True) -> None:
        self._path = volume_path(prepare_root(root, "tape archive"), volume)
        self._volume = volume
        self._fsync = fsync
        self._writer: IO[bytes] | None = open(_lock_path(self._path, "writer"), "a+b")
        try:
            fcntl.flock(self._writer.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._writer.close()
            self._writer = None
            raise ArchiveError(
                f"tape volume {self._path} is being written by another writer; give each writer (rank) its "
                "own volume name"
            ) from None
        try:
            if not self._path.exists():
                self._create()
            self._records = {r.key: r for r in _read_index(self._path, volume)}
        except BaseException:
            self.close()
            raise
        self._next = max((r.sequence for r in self._records.values()), default=0) + 1
        self._last_mjd = max((r.written_mjd for r in self._records.values()), default=0.0)

    def _create(self) -> None:
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.new")
        with h5py.File(tmp, "w", locking=False) as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["volume"] = self._volume
            f.create_group("blobs", track_order=True)
            f.create_dataset("index", shape=(0,), maxshape=(None,), dtype=_INDEX_DTYPE, chunks=(256,))
        if self._fsync:
            fsync_path(tmp)
        os.replace(tmp, self._path)
        if self._fsync:
            fsync_path(self._path.parent)

    @property
    def path(self) -> Path:
        """The volume's file."""
        return self._path

    @property
    def volume(self) -> str:
        """The volume's name."""
        return self._volume

    def close(self) -> None:
        """Release the volume for another writer (appends are already on disk)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TapeArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, key: ImageKey | str, data: bytes, meta: ItemMeta) -> TapeRecord:
        """Write one blob at the end of the volume, with its index row; never overwrites.

        Parameters
        ----------
        key : ImageKey or str
            The image the blob holds.
        data : bytes
            The blob (:func:`~lsstpipe.archive.blobs.encode_image`).
        meta : ItemMeta
            Its metadata (:func:`~lsstpipe.archive.blobs.blob_meta`); ``stored_mjd`` is not used —
            the record holds the time written.

        Returns
        -------
        TapeRecord
            The new record, or the existing one if ``key`` is already on this volume with the same content
            checksum (idempotent).

        Raises
        ------
        ArchiveConflict
            If ``key`` is on this volume with another content checksum.
        ArchiveError
            If the volume was closed.
        ValueError, TypeError, CDSFormatError
            If ``meta`` does not describe ``data`` or ``data`` is not a blob of ``key``.
        """
        if self._writer is None:
            raise ArchiveError(f"tape volume {self._path} was closed; open a new TapeArchive to append")
        key, data = as_key(key), check_data(data)
        if not isinstance(meta, ItemMeta):
            raise TypeError(f"meta must be an ItemMeta (see blob_meta), not {type(meta).__name__}")
        if meta.nbytes != len(data) or blob_checksum(key, data) != meta.checksum:
            raise ValueError(f"meta {meta} does not describe the {len(data)}-byte blob of {key}; use blob_meta")
        sha256 = hashlib.sha256(data).hexdigest()
        with flocked(_lock_path(self._path, "lock")):  # also serialises threads sharing this writer
            old = self._records.get(key)
            if old is not None:
                if old.checksum != meta.checksum:
                    raise ArchiveConflict(
                        f"tape volume {self._volume} already holds {key} with content checksum "
                        f"{old.checksum[:16]}…, not {meta.checksum[:16]}…; tape is never overwritten — find out "
                        "which copy is right"
                    )
                return old
            # Time order within the volume is arrival order even if the clock steps back.
            written = max(now_mjd(), self._last_mjd)
            record = TapeRecord(self._volume, self._next, key, meta.checksum, sha256, len(data), meta.mode, written)
            self._write(record, data)
            self._records[key] = record
            self._next, self._last_mjd = self._next + 1, written
        return record

    def _write(self, record: TapeRecord, data: bytes) -> None:
        """Write the blob, then its index row (the commit); flush and close (call under the lock)."""
        key = record.key
        row = np.array(
            [(record.sequence, key.image_id, key.raft, key.kind, record.checksum, record.sha256, record.nbytes,
              record.mode.value, record.written_mjd)],
            dtype=_INDEX_DTYPE,
        )  # fmt: skip
        with h5py.File(self._path, "a", locking=False) as f:
            blobs = f["blobs"]
            name = _blob_name(record.sequence)
            if name in blobs:  # left by an append that died before its index row: never archived
                del blobs[name]
            blobs.create_dataset(name, data=np.frombuffer(data, dtype=np.uint8), track_times=False)
            f.flush()
            index = f["index"]
            index.resize((index.shape[0] + 1,))
            index[-1] = row[0]
            f.flush()
        if self._fsync:
            fsync_path(self._path)

    def _record_of(self, key: ImageKey | str) -> TapeRecord:
        key = as_key(key)
        record = self._records.get(key)
        if record is None:
            raise ArchiveNotFound(f"{key} is not on tape volume {self._volume} ({self._path}); look it up across "
                                  "all volumes with TapeLibrary.find")  # fmt: skip
        return record

    def read(self, key: ImageKey | str) -> bytes:
        """The blob of ``key`` as written; :class:`ArchiveNotFound` if it is not on this volume."""
        return _read_blob(self._path, self._record_of(key))

    def verify(self, key: ImageKey | str, received: bytes | None = None) -> str:
        """Read ``key`` back, check its bytes' SHA-256 against the index, decode and verify its content.

        ``received``: the bytes appended, already decoded and verified by the caller; the copy read back is
        compared with them byte for byte instead of being decoded again (as
        :meth:`lsstpipe.archive.storage.RawImageCache.verify`).

        Returns
        -------
        str
            The content checksum.

        Raises
        ------
        ArchiveNotFound
            If ``key`` is not on this volume.
        CDSChecksumError, CDSFormatError
            If the copy on tape is damaged.
        """
        record = self._record_of(key)
        return _verify(record, _read_blob(self._path, record), received)

    def index(self) -> list[TapeRecord]:
        """The volume's records in arrival order."""
        return sorted(self._records.values(), key=lambda r: r.sequence)


class TapeLibrary:
    """Reads every volume of a tape archive root (any number of writers may be appending meanwhile).

    Parameters
    ----------
    root : path-like
        The tape archive's directory.

    Raises
    ------
    FileNotFoundError, NotADirectoryError
        If ``root`` is not an existing directory.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root)
        if not self._root.is_dir():
            what = "is not a directory" if self._root.exists() else "does not exist"
            error = NotADirectoryError if self._root.exists() else FileNotFoundError
            raise error(f"tape archive root {self._root} {what}; pass the directory the TapeArchive writers use")

    @property
    def root(self) -> Path:
        """The tape archive's directory."""
        return self._root

    def volumes(self) -> list[str]:
        """Names of the volumes present, sorted."""
        names = (p.name[len("volume-") : -len(".h5")] for p in self._root.glob("volume-*.h5"))
        return sorted(n for n in names if _VOLUME_RE.fullmatch(n))

    def index(self) -> list[TapeRecord]:
        """Every record of every volume, in time order (then volume, then sequence)."""
        records = [r for v in self.volumes() for r in _read_index(volume_path(self._root, v), v)]
        return sorted(records, key=lambda r: (r.written_mjd, r.volume, r.sequence))

    def find(self, key: ImageKey | str) -> TapeRecord:
        """The earliest record of ``key`` on any volume; :class:`ArchiveNotFound` if it is on none."""
        key = as_key(key)
        for record in self.index():
            if record.key == key:
                return record
        raise ArchiveNotFound(f"{key} is on none of the tape volumes {self.volumes()} in {self._root}; it was "
                              "never archived here — run the Catch-Up Archiver for it")  # fmt: skip

    def read(self, key: ImageKey | str) -> bytes:
        """The blob of the earliest record of ``key``."""
        record = self.find(key)
        return _read_blob(volume_path(self._root, record.volume), record)

    def verify(self, key: ImageKey | str) -> str:
        """Verify the earliest copy of ``key`` as :meth:`TapeArchive.verify` does; return its checksum."""
        record = self.find(key)
        return _verify(record, _read_blob(volume_path(self._root, record.volume), record))
