"""What the Camera Data System delivers: a raft image, its checksum, and the CDS error taxonomy.

A :class:`RaftImage` is one raft of one exposure in one :class:`ImageKind` (raw or crosstalk-corrected):
16 raw segments per detector in HDU order, a primary header per detector, the telemetry recorded with
the exposure, and a SHA-256 content checksum.

Checksum
--------
The checksum is computed over a canonical byte serialisation of the *content*, not over the bytes of the
stored file, so the same value can be re-verified after the image has been sent over the network or
re-encoded (LDM-230: "When the CDS delivers the image, its integrity is verified using a hash or
checksum"). The serialisation is, each piece framed with its length where needed:

1. the tag ``lsstpipe-cds-raft-v1``;
2. the identity ``[image_id, raft, kind]`` as JSON;
3. for each detector in sorted name order: ``[name, shape]`` as JSON, then the pixels as little-endian
   int32 in C order;
4. the headers ``{detector: {keyword: value}}`` as canonical JSON (sorted keys, no whitespace, no NaN);
5. the telemetry as canonical JSON.

Covering the identity and telemetry as well as the pixels and headers means a mislabelled file or
damaged telemetry is caught too.

Errors
------
Every CDS failure is a :class:`CDSError` whose ``retriable`` attribute says whether calling again may
succeed: :class:`CDSTimeout` (retriable: the image may still arrive), :class:`CDSChecksumError`,
:class:`CDSNotFound` and :class:`CDSFormatError` (not retriable as such; each message says what to do
instead). Bad arguments from the caller are ``ValueError``/``TypeError``, not CDS errors.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lsstpipe.camera import Camera

#: Number of raw segments (amplifiers) per detector.
N_SEGMENTS = 16

_CHECKSUM_TAG = b"lsstpipe-cds-raft-v1"
_IMAGE_ID_RE = re.compile(r"[A-Z]{2}_[A-Z]_(\d{8})_(\d{6})")
_RAFT_RE = re.compile(r"R\d\d")
_DETECTOR_RE = re.compile(r"(R\d\d)_S[0-9A-Z]{1,2}")
_INT32 = np.iinfo(np.int32)


class CDSError(Exception):
    """Base class of CDS failures.

    Attributes
    ----------
    retriable : bool
        True when calling the same operation again later may succeed.
    path : str or None
        The buffer file concerned, when there is one.
    """

    retriable: bool = False

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)


class CDSTimeout(CDSError):
    """The image did not appear in the buffer within the timeout; it may still arrive (retriable)."""

    retriable = True


class CDSChecksumError(CDSError):
    """The image read back does not match its checksum, even after one re-read (not retriable).

    The copy in the buffer is damaged; do not archive it. Ask the camera to re-write the image, or take
    it from another copy (raw image cache, network outage buffer).
    """


class CDSNotFound(CDSError):
    """The image is not in the buffer: not written yet, evicted, or a detector the raft lacks.

    Not retriable as such: block on :meth:`CDSClient.retrieve` to wait for an image still expected; an
    evicted image has to come from the raw image cache or the network outage buffer.
    """


class CDSFormatError(CDSError):
    """A buffer file exists but cannot be read as a CDS raft image (not retriable)."""


class ImageKind(enum.Enum):
    """Which version of a raft image the CDS holds."""

    RAW = "raw"
    """The image as read out, before any correction."""
    CROSSTALK_CORRECTED = "crosstalk_corrected"
    """The image after the camera's crosstalk correction; the one alert production processes."""

    @classmethod
    def parse(cls, kind: ImageKind | str) -> ImageKind:
        """The kind named by ``kind`` (an ``ImageKind`` or its value such as ``'raw'``).

        Raises
        ------
        ValueError
            If ``kind`` names no kind.
        """
        if isinstance(kind, cls):
            return kind
        try:
            return cls(kind)
        except ValueError:
            choices = ", ".join(repr(k.value) for k in cls)
            raise ValueError(f"unknown image kind {kind!r}; use ImageKind or one of {choices}") from None


def image_day_obs(image_id: str) -> str:
    """The observing day ``YYYYMMDD`` of an image id such as ``MC_O_20240101_000012``.

    An image id (the exposure's OBSID) is ``{controller}_{code}_{day_obs}_{seq}``: two capital letters,
    one capital letter, eight digits, six digits. The day is the third field.

    Raises
    ------
    ValueError
        If ``image_id`` does not have that form.
    """
    m = _IMAGE_ID_RE.fullmatch(image_id) if isinstance(image_id, str) else None
    if m is None:
        raise ValueError(
            f"image id {image_id!r} is not an exposure OBSID; expected the form MC_O_20240101_000012 "
            "(controller, code, day_obs YYYYMMDD, 6-digit sequence number)"
        )
    return m.group(1)


def check_raft(raft: str) -> str:
    """``raft`` if it is a raft name such as ``R22``; ``ValueError`` otherwise."""
    if not (isinstance(raft, str) and _RAFT_RE.fullmatch(raft)):
        raise ValueError(f"raft {raft!r} is not a raft name; expected R followed by two digits, e.g. 'R22'")
    return raft


def raft_of_detector(detector: str) -> str:
    """The raft of a detector name such as ``R22_S11`` (``R22``); ``ValueError`` for a malformed name."""
    m = _DETECTOR_RE.fullmatch(detector) if isinstance(detector, str) else None
    if m is None:
        raise ValueError(
            f"detector name {detector!r} is not of the form R22_S11 (raft, underscore, slot such as S11 or SW)"
        )
    return m.group(1)


def canonical_json(value: Any, what: str) -> str:
    """``value`` as canonical JSON (sorted keys, no whitespace, no NaN); numpy scalars become Python ones.

    Raises
    ------
    ValueError
        If ``value`` cannot be written as strict JSON; ``what`` names it in the message.
    """
    try:
        return json.dumps(
            value,
            sort_keys=True,
            separators=(",", ":"),
            allow_nan=False,
            ensure_ascii=True,
            default=_json_default,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{what} cannot be stored as JSON ({exc}); use str, int, float (finite), bool, None and lists "
            "or dicts with string keys of those — write a missing or NaN value as None"
        ) from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"value {obj!r} of type {type(obj).__name__} is not JSON-serialisable")


def _framed(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data


def compute_checksum(
    image_id: str,
    raft: str,
    kind: ImageKind | str,
    ccds: Mapping[str, np.ndarray],
    headers: Mapping[str, Mapping[str, Any]],
    telemetry: Mapping[str, Any],
) -> str:
    """SHA-256 hex digest of a raft image's content (see the module docstring for the serialisation).

    Parameters
    ----------
    image_id, raft, kind
        The image's identity.
    ccds : mapping of str to numpy.ndarray
        Detector name to integer segment array; values must fit in int32.
    headers : mapping of str to mapping
        Detector name to its primary header keywords (JSON-able values).
    telemetry : mapping
        JSON-able telemetry.

    Returns
    -------
    str
        64 lowercase hex digits.
    """
    h = hashlib.sha256()
    h.update(_framed(_CHECKSUM_TAG))
    h.update(_framed(json.dumps([image_id, raft, ImageKind.parse(kind).value]).encode()))
    for name in sorted(ccds):
        pixels = np.ascontiguousarray(ccds[name], dtype="<i4")
        h.update(_framed(json.dumps([name, list(pixels.shape)]).encode()))
        h.update(pixels)
    h.update(_framed(canonical_json({name: dict(headers[name]) for name in headers}, "headers").encode()))
    h.update(_framed(canonical_json(dict(telemetry), "telemetry").encode()))
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class RaftImage:
    """One raft of one exposure in one kind, as the CDS delivers it.

    Arrays returned by :class:`CDSClient` are read-only; copy them before correcting in place.
    Equality is identity (the fields hold numpy arrays); compare contents field by field.

    Attributes
    ----------
    image_id : str
        The exposure's OBSID, e.g. ``MC_O_20240101_000012``.
    raft : str
        Raft name, e.g. ``R22``.
    kind : ImageKind
        Raw or crosstalk-corrected.
    ccds : dict of str to numpy.ndarray
        Detector name (``R22_S11``) to an int32 array ``(16, raw_height, raw_width)`` of segments in HDU
        order, in sorted detector order.
    headers : dict of str to dict
        Detector name to its primary FITS keywords as plain JSON values.
    telemetry : dict
        JSON-able telemetry recorded with the exposure.
    written_mjd : float
        When the camera wrote the image into the buffer (MJD).
    checksum : str
        SHA-256 content checksum stored with the image (:func:`compute_checksum`).
    """

    image_id: str
    raft: str
    kind: ImageKind
    ccds: dict[str, np.ndarray]
    headers: dict[str, dict[str, Any]]
    telemetry: dict[str, Any]
    written_mjd: float
    checksum: str

    @property
    def detectors(self) -> tuple[str, ...]:
        """Detector names in sorted order."""
        return tuple(sorted(self.ccds))

    @property
    def day_obs(self) -> str:
        """Observing day ``YYYYMMDD`` from the image id."""
        return image_day_obs(self.image_id)

    @property
    def nbytes(self) -> int:
        """Bytes of pixel data."""
        return sum(a.nbytes for a in self.ccds.values())

    def compute_checksum(self) -> str:
        """The checksum of the content as it is now (compare with :attr:`checksum`)."""
        return compute_checksum(self.image_id, self.raft, self.kind, self.ccds, self.headers, self.telemetry)

    def verify(self) -> None:
        """Check the content against :attr:`checksum`.

        Raises
        ------
        CDSChecksumError
            If the content does not match; the image must not be archived or processed.
        """
        actual = self.compute_checksum()
        if actual != self.checksum:
            raise CDSChecksumError(
                f"image {self.image_id} raft {self.raft} ({self.kind.value}) does not match its checksum "
                f"(stored {self.checksum[:16]}…, computed {actual[:16]}…); the copy is damaged — do not "
                "archive it; fetch the image again from the CDS or another copy"
            )


@dataclass(frozen=True)
class PreparedImage:
    """A validated raft image ready to store: int32 pixels, canonical JSON and checksum."""

    image_id: str
    raft: str
    kind: ImageKind
    ccds: dict[str, np.ndarray]
    headers_json: dict[str, str]
    telemetry_json: str
    checksum: str


def prepare_image(
    image_id: str,
    raft: str,
    kind: ImageKind | str,
    ccds: Mapping[str, np.ndarray],
    headers: Mapping[str, Mapping[str, Any]] | None = None,
    telemetry: Mapping[str, Any] | None = None,
    camera: Camera | None = None,
) -> PreparedImage:
    """Validate a raft image for the buffer; the inputs are never modified.

    Pixels of another integer type are converted to int32 (a copy) when every value fits.

    Raises
    ------
    ValueError, TypeError
        With a message naming the offending argument and what is expected.
    """
    image_day_obs(image_id)
    check_raft(raft)
    kind = ImageKind.parse(kind)
    if not isinstance(ccds, Mapping) or not ccds:
        raise ValueError(f"raft {raft}: ccds must be a non-empty dict of detector name to segment array")
    expected = None
    camera_name = "" if camera is None else camera.name
    if camera is not None:
        try:
            expected = {d.name: d for d in camera.raft_detectors(raft)}
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
    pixels: dict[str, np.ndarray] = {}
    shape: tuple[int, ...] | None = None
    for name in sorted(ccds):
        if not isinstance(name, str) or _DETECTOR_RE.fullmatch(name) is None or raft_of_detector(name) != raft:
            raise ValueError(f"detector {name!r} does not belong to raft {raft}; names must look like {raft}_S11")
        if expected is not None and name not in expected:
            raise ValueError(
                f"detector {name} is not in raft {raft} of camera {camera_name}; "
                f"its detectors are {', '.join(expected)}"
            )
        pixels[name] = _as_int32_segments(name, ccds[name])
        got = pixels[name].shape
        if expected is not None and got != (N_SEGMENTS, *expected[name].raw_shape):
            raise ValueError(
                f"detector {name}: segments have shape {got}, camera {camera_name} expects "
                f"{(N_SEGMENTS, *expected[name].raw_shape)}"
            )
        if shape is not None and got != shape:
            raise ValueError(
                f"raft {raft}: detector {name} has shape {got} but the others have {shape}; "
                "all detectors of a raft share one segment shape"
            )
        shape = got
    if headers is None:
        headers = {name: {} for name in pixels}
    if not isinstance(headers, Mapping) or set(headers) != set(pixels):
        got_names = sorted(headers) if isinstance(headers, Mapping) else type(headers).__name__
        raise ValueError(
            f"raft {raft}: headers must have one entry per detector {sorted(pixels)}, got {got_names}; "
            "pass headers=None for empty headers"
        )
    headers_json = {}
    for name in pixels:
        if not isinstance(headers[name], Mapping):
            raise TypeError(f"header of {name} must be a dict of FITS keyword to value, not {type(headers[name])}")
        headers_json[name] = canonical_json(dict(headers[name]), f"header of {name}")
    if telemetry is not None and not isinstance(telemetry, Mapping):
        raise TypeError(f"telemetry must be a dict (or None), not {type(telemetry).__name__}")
    telemetry_json = canonical_json(dict(telemetry or {}), "telemetry")
    normal_headers = {name: json.loads(text) for name, text in headers_json.items()}
    checksum = compute_checksum(image_id, raft, kind, pixels, normal_headers, json.loads(telemetry_json))
    return PreparedImage(image_id, raft, kind, pixels, headers_json, telemetry_json, checksum)


def _as_int32_segments(name: str, array: Any) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"segments of {name} must be a numpy array, not {type(array).__name__}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"segments of {name} have dtype {array.dtype}; the camera writes integers (int32)")
    if array.ndim != 3 or array.shape[0] != N_SEGMENTS or 0 in array.shape:
        raise ValueError(
            f"segments of {name} have shape {array.shape}; expected ({N_SEGMENTS}, raw_height, raw_width), "
            "the segments in HDU order"
        )
    if array.dtype == np.int32:
        return array
    if not np.can_cast(array.dtype, np.int32) and (array.min() < _INT32.min or array.max() > _INT32.max):
        raise ValueError(f"segments of {name} ({array.dtype}) hold values outside the int32 range")
    return array.astype(np.int32)


def finite_mjd(mjd: float) -> float:
    """``mjd`` as a float, or ``ValueError`` if it is not a finite number."""
    value = float(mjd)
    if not math.isfinite(value):
        raise ValueError(f"mjd {mjd!r} must be a finite modified Julian date")
    return value
