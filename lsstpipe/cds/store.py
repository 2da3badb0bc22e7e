"""On-disk format of the CDS buffer: where raft images live, how they are written, read and listed.

Layout
------
``root/{day_obs}/{image_id}/{raft}_{kind}.h5`` with a sidecar ``{raft}_{kind}.h5.sha256`` holding the
content checksum as 64 hex digits and a newline (a checksum of the content, see
:mod:`lsstpipe.cds.image`, not of the file's bytes). ``day_obs`` is the third field of the image id
(``MC_O_20240101_000012`` is in ``20240101/``), so one night's images share a directory. Names that do
not fit the layout (temporary files, foreign files) are ignored when listing.

The HDF5 file has root attributes ``format`` (``lsstpipe-cds-raft``), ``format_version``, ``image_id``,
``raft``, ``kind``, ``written_mjd``, ``checksum``, ``detectors`` and ``telemetry`` (both JSON), and a
group ``ccds`` with one int32 dataset ``(16, raw_height, raw_width)`` per detector, its primary header as
the JSON attribute ``header``. The pixels are stored as they are or compressed (:data:`COMPRESSIONS`), one
chunk per amplifier segment, bytes shuffled first.

Atomicity
---------
A writer writes each file under a hidden temporary name (``.{name}.{pid}.{uuid}.tmp``) in the image's
directory, optionally flushes it to disk, and publishes it with ``os.replace`` (:func:`publish`): the
sidecar first, then the HDF5 file, whose appearance is the commit. A reader therefore sees nothing or a
complete image, never a partial one; a reader that opened the old file of a re-written image keeps
reading that old, complete file.

HDF5 file locking is off: published files are never opened for writing, and locking fails on some
parallel file systems.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from lsstpipe.cds.image import (
    CDSFormatError,
    ImageKind,
    PreparedImage,
    RaftImage,
    check_raft,
    compute_checksum,
    image_day_obs,
)

_log = logging.getLogger(__name__)

FORMAT_NAME = "lsstpipe-cds-raft"
FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".sha256"
_FILE_RE = re.compile(r"(R\d\d)_(" + "|".join(k.value for k in ImageKind) + r")\.h5")
_DAY_RE = re.compile(r"\d{8}")
#: Ties in write time list crosstalk-corrected before raw: the order the replicator sends them (LDM-230).
_KIND_ORDER = {ImageKind.CROSSTALK_CORRECTED: 0, ImageKind.RAW: 1}


class BufferEntry(NamedTuple):
    """One raft image present in the buffer, as listed by ``scan``."""

    image_id: str
    raft: str
    kind: ImageKind
    mjd: float
    """When the camera wrote it (MJD)."""


class StoredFile(NamedTuple):
    """A published raft image file: what it holds, where, and its bytes including the sidecar."""

    entry: BufferEntry
    path: Path
    nbytes: int


def now_mjd() -> float:
    """The current time as a modified Julian date (UTC, from the system clock)."""
    return time.time() / 86400.0 + 40587.0


def image_path(root: str | os.PathLike[str], image_id: str, raft: str, kind: ImageKind | str) -> Path:
    """Where the buffer at ``root`` keeps one raft image: ``root/{day_obs}/{image_id}/{raft}_{kind}.h5``.

    Raises
    ------
    ValueError
        If the image id, raft or kind is malformed.
    """
    day = image_day_obs(image_id)
    return Path(root) / day / image_id / f"{check_raft(raft)}_{ImageKind.parse(kind).value}.h5"


def sidecar_path(path: Path) -> Path:
    """The checksum sidecar of an image file."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def publish(tmp: Path, final: Path) -> None:
    """Make a fully written temporary file visible under its final name (atomic on POSIX)."""
    os.replace(tmp, final)


def fsync_path(path: Path) -> None:
    """Flush a file's or directory's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Pixel compressions of a raft image file (all lossless, each amplifier segment a chunk, bytes shuffled first so
#: that the constant high bytes of the counts sit together). ``blosc-lz4`` (Blosc's LZ4, via hdf5plugin) stores a
#: raft in about a quarter of its size at several GB/s each way on one core; ``lzf`` (~0.45 GB/s each way, the
#: same size) and ``gzip`` (smaller, slower) are read back for images written with them.
COMPRESSIONS = (None, "gzip", "lzf", "blosc-lz4")


@functools.cache
def _blosc() -> dict:
    """HDF5 dataset options of ``blosc-lz4``; importing hdf5plugin registers its filters with HDF5 for this
    process, for reading as for writing."""
    import hdf5plugin

    return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))


def check_compression(compression: str | None) -> None:
    """``ValueError`` naming :data:`COMPRESSIONS` unless ``compression`` is one of them."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; use one of {COMPRESSIONS}")


def _dataset_options(compression: str | None, shape: tuple[int, ...]) -> dict:
    if compression is None:
        return {}
    chunks = (1, *shape[1:])
    if compression == "blosc-lz4":
        return {**_blosc(), "chunks": chunks}  # Blosc shuffles inside the filter
    return {"compression": compression, "shuffle": True, "chunks": chunks}


def write_file(path: Path, image: PreparedImage, mjd: float, compression: str | None) -> None:
    """Write ``image`` as an HDF5 raft image file at ``path`` (a temporary name: publish it afterwards)."""
    check_compression(compression)
    with h5py.File(path, "w", locking=False) as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["image_id"] = image.image_id
        f.attrs["raft"] = image.raft
        f.attrs["kind"] = image.kind.value
        f.attrs["written_mjd"] = mjd
        f.attrs["checksum"] = image.checksum
        f.attrs["detectors"] = json.dumps(sorted(image.ccds))
        f.attrs["telemetry"] = image.telemetry_json
        group = f.create_group("ccds")
        for name, pixels in image.ccds.items():
            extra = _dataset_options(compression, pixels.shape)
            # No modification times in the file: the same image always gives the same bytes.
            dataset = group.create_dataset(name, data=pixels, track_times=False, **extra)
            dataset.attrs["header"] = image.headers_json[name]


def read_file(path: Path, image_id: str, raft: str, kind: ImageKind) -> RaftImage:
    """Read one raft image file, unverified, with read-only arrays.

    Raises
    ------
    FileNotFoundError
        If the file is not there (any more).
    CDSFormatError
        If it is not a readable CDS raft image of that identity.
    """
    _blosc()  # its filter registered: images may be blosc-compressed
    try:
        with h5py.File(path, "r", locking=False) as f:
            attrs = f.attrs
            if attrs.get("format") != FORMAT_NAME:
                raise ValueError(f"no '{FORMAT_NAME}' format marker")
            if int(attrs["format_version"]) != FORMAT_VERSION:
                raise ValueError(f"format version {attrs['format_version']}, this reader reads {FORMAT_VERSION}")
            found = (str(attrs["image_id"]), str(attrs["raft"]), str(attrs["kind"]))
            if found != (image_id, raft, kind.value):
                raise ValueError(f"it holds image {found}, not {(image_id, raft, kind.value)}")
            names = json.loads(attrs["detectors"])
            if sorted(f["ccds"]) != sorted(names):
                raise ValueError(f"detectors {sorted(f['ccds'])} do not match the list {names}")
            ccds: dict[str, np.ndarray] = {}
            headers: dict[str, dict[str, Any]] = {}
            for name in sorted(names):
                dataset = f["ccds"][name]
                pixels = np.asarray(dataset[()])
                if pixels.dtype != np.int32 or pixels.ndim != 3:
                    raise ValueError(f"detector {name} holds {pixels.dtype} {pixels.shape}, not int32 segments")
                pixels.setflags(write=False)
                ccds[name] = pixels
                headers[name] = json.loads(dataset.attrs["header"])
            telemetry = json.loads(attrs["telemetry"])
            mjd = float(attrs["written_mjd"])
            checksum = str(attrs["checksum"])
    except FileNotFoundError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CDSFormatError(
            f"{path} is not a readable CDS raft image ({exc}); the file is damaged or was not written by "
            f"CDSBuffer — remove it and ask the camera to re-write image {image_id} raft {raft}, or take the "
            "image from the raw image cache",
            path=path,
        ) from exc
    return RaftImage(image_id, raft, kind, ccds, headers, telemetry, mjd, checksum)


def checksum_problem(image: RaftImage, path: Path) -> str | None:
    """Why ``image``, read from ``path``, fails verification (content, file, sidecar); None if it passes."""
    actual = compute_checksum(image.image_id, image.raft, image.kind, image.ccds, image.headers, image.telemetry)
    if actual != image.checksum:
        return f"content checksum {actual[:16]}… does not match the stored {image.checksum[:16]}…"
    try:
        sidecar = sidecar_path(path).read_text().strip()
    except FileNotFoundError:
        return None
    if sidecar != image.checksum:
        return f"sidecar checksum {sidecar[:16]}… does not match the file's {image.checksum[:16]}…"
    return None


class Lister:
    """Lists the published files under a buffer root, caching each file's write time by its stat."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._mjd_cache: dict[Path, tuple[tuple[int, int, int], float]] = {}

    def files(self) -> list[StoredFile]:
        """Every published raft image file, oldest first (write time, image id, raft, then
        crosstalk-corrected before raw).

        Unreadable files are skipped with a warning naming them.
        """
        found: list[StoredFile] = []
        cache: dict[Path, tuple[tuple[int, int, int], float]] = {}
        for day in _subdirs(self._root):
            if not _DAY_RE.fullmatch(day.name):
                continue
            for image_dir in _subdirs(day):
                try:
                    if image_day_obs(image_dir.name) != day.name:
                        continue
                except ValueError:
                    continue
                for path in _files(image_dir):
                    m = _FILE_RE.fullmatch(path.name)
                    if m is None:
                        continue
                    stored = self._stored(path, image_dir.name, m.group(1), ImageKind(m.group(2)), cache)
                    if stored is not None:
                        found.append(stored)
        self._mjd_cache = cache
        found.sort(key=lambda s: (s.entry.mjd, s.entry.image_id, s.entry.raft, _KIND_ORDER[s.entry.kind]))
        return found

    def _stored(self, path: Path, image_id: str, raft: str, kind: ImageKind, cache: dict) -> StoredFile | None:
        try:
            st = path.stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._mjd_cache.get(path)
            mjd = cached[1] if cached is not None and cached[0] == key else _read_mjd(path)
        except FileNotFoundError:
            return None  # evicted or replaced while we looked
        except (OSError, KeyError, ValueError, TypeError) as exc:
            _log.warning("skipping unreadable CDS buffer file %s (%s); remove it or have it re-written", path, exc)
            return None
        cache[path] = (key, mjd)
        try:
            sidecar_bytes = sidecar_path(path).stat().st_size
        except FileNotFoundError:
            sidecar_bytes = 0
        return StoredFile(BufferEntry(image_id, raft, kind, mjd), path, st.st_size + sidecar_bytes)


def _read_mjd(path: Path) -> float:
    with h5py.File(path, "r", locking=False) as f:
        return float(f.attrs["written_mjd"])


def _subdirs(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as it:
            return sorted(Path(e.path) for e in it if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def _files(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as it:
            return [Path(e.path) for e in it if e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def remove_image(files: list[StoredFile]) -> None:
    """Delete one image: its HDF5 files first (readers stop seeing it), then sidecars and its directory."""
    for f in files:
        f.path.unlink(missing_ok=True)
    for f in files:
        sidecar_path(f.path).unlink(missing_ok=True)
    image_dir = files[0].path.parent
    shutil.rmtree(image_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # other images of the night remain
        image_dir.parent.rmdir()
