"""What moves between the archive's roles: image keys, Archiver modes, item metadata and image blobs.

An *image blob* is the bytes of one CDS raft-image HDF5 file (:func:`encode_image`, the format of
:mod:`lsstpipe.cds.store`), decoded and verified without touching disk by :func:`decode_image`. Every
item the stores of :mod:`lsstpipe.archive.storage` and :mod:`lsstpipe.archive.tape` keep has an
:class:`ImageKey` and an :class:`ItemMeta` (content checksum, size, Archiver mode, time stored);
:func:`blob_meta` reads the latter from a blob's header without touching its pixels.
"""

from __future__ import annotations

import enum
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

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
from lsstpipe.cds.store import FORMAT_NAME, check_compression, read_file, write_file

__all__ = [
    "ArchiverMode", "ImageKey", "ItemMeta", "as_key", "blob_checksum", "blob_meta", "check_copy", "check_data",
    "decode_image", "encode_image",
]  # fmt: skip


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
