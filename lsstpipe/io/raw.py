"""Raw LSSTCam files: one multi-extension FITS file per CCD and exposure, as the camera writes them.

File layout
-----------
* HDU 0: primary header, no data. Exposure keywords (OBSID, DAYOBS, SEQNUM, IMGTYPE, EXPTIME, MJD-OBS,
  FILTER, RA, DEC, ROTPA, …) come from the caller; the writer adds the detector keywords RAFTBAY,
  CCDSLOT, CCD_MANU, LSST_NUM, DETSIZE, INSTRUME and TELESCOP.
* HDUs 1…16: one image per amplifier, ``EXTNAME`` = ``Segment10`` … ``Segment17``, ``Segment07`` …
  ``Segment00`` (:data:`~lsstpipe.camera.geometry.SEGMENT_ORDER`), each a full raw segment (prescan, data,
  serial and parallel overscan) with DATASEC, DETSEC, DTV1/2, DTM1_1/DTM2_2/DTM1_2/DTM2_1, DETSIZE and
  CHANNEL, plus BIASSEC (the serial overscan; our addition, real raws lack it).
* Pixels are stored as signed 32-bit integers (BITPIX = 32) without BZERO/BSCALE, so every FITS reader
  sees exactly the values written. ``uint32`` input is accepted when every value is below 2**31 (the
  camera's 18-bit ADCs never come near) and stored as the same values in int32.
* Every HDU carries CHECKSUM/DATASUM with a fixed comment, so the same inputs give a byte-identical file
  and corruption is detected on read.

The reader also accepts real LSSTCam raws: tile-compressed segments (``CompImageHDU``), no BIASSEC, and
extra HDUs (WREB, REB_COND, …), which it ignores.

Both work on the file's bytes (:mod:`lsstpipe.io.raw_blocks`: plain segments, or one RICE_1 tile each), not
through astropy's per-HDU objects; files in forms that module does not read (gzip, row tiles, other
compressions, scaled pixels) are read with astropy, with the same checks.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from lsstpipe.camera.geometry import E2V, ITL, SEGMENT_ORDER, Detector
from lsstpipe.io.fitsblocks import FitsLayoutError
from lsstpipe.io.fitsfile import write_bytes_atomic
from lsstpipe.io.raw_blocks import RawBlocksError, raw_chunks, read_blocks

__all__ = ["REQUIRED_KEYWORDS", "RawExposure", "RawFormatError", "parse_section", "read_raw", "write_raw"]

#: Exposure keywords the caller must supply to :func:`write_raw`.
REQUIRED_KEYWORDS = (
    "OBSID", "DAYOBS", "SEQNUM", "IMGTYPE", "EXPTIME", "MJD-OBS", "FILTER", "RA", "DEC", "ROTPA",
)  # fmt: skip
#: Default TELESCOP value (override by passing TELESCOP in the header).
TELESCOPE = "Simonyi Survey Telescope"
#: Keywords that describe the FITS structure itself; the writer owns them.
_STRUCTURAL = frozenset(
    {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT", "EXTNAME",
     "BZERO", "BSCALE", "BLANK", "CHECKSUM", "DATASUM"}
)  # fmt: skip
#: Comment of the CHECKSUM/DATASUM cards. Astropy's default holds the current time, which would make
#: files written from the same inputs differ.
_COMMENTARY = frozenset({"COMMENT", "HISTORY", ""})
_CHECKSUM_COMMENT = "computed by lsstpipe.io.raw"
_FITS_BLOCK = 2880
_INT32_MAX = np.iinfo(np.int32).max
_INT32_MIN = np.iinfo(np.int32).min
_SECTION_RE = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")
_FAILED_HDU_RE = re.compile(r"HDU \('([^']*)'")


class RawFormatError(ValueError):
    """A raw file is missing, unreadable, corrupt or does not follow the LSSTCam raw layout.

    The message names the file and what is wrong with it.
    """


def parse_section(s: str) -> tuple[int, int, int, int, bool, bool]:
    """Parse an IRAF section string such as ``'[512:1,4004:2003]'``.

    Parameters
    ----------
    s : str
        ``[x_start:x_end,y_start:y_end]`` in 1-based inclusive pixels; a range whose start is larger than
        its end is read in reverse (a flip).

    Returns
    -------
    x0, x1, y0, y1 : int
        0-based half-open bounds, ``x0 < x1`` and ``y0 < y1`` whatever the direction.
    flip_x, flip_y : bool
        Whether the x and y ranges are reversed.

    Raises
    ------
    ValueError
        If ``s`` is not a section string of positive integers.
    """
    m = _SECTION_RE.match(s) if isinstance(s, str) else None
    if m is None:
        raise ValueError(f"cannot parse section {s!r}: expected '[x1:x2,y1:y2]' with 1-based pixel numbers")
    xa, xb, ya, yb = (int(g) for g in m.groups())
    if min(xa, xb, ya, yb) < 1:
        raise ValueError(f"section {s!r} has a pixel number below 1; sections are 1-based")
    return min(xa, xb) - 1, max(xa, xb), min(ya, yb) - 1, max(ya, yb), xa > xb, ya > yb


@dataclass(frozen=True)
class RawExposure:
    """The contents of one raw file: primary header and the 16 amplifier segments.

    Segment arrays are in native byte order and read-only; copy them to modify pixels.

    Attributes
    ----------
    path : pathlib.Path
        The file read.
    header : astropy.io.fits.Header
        The primary header.
    segments : dict of str to numpy.ndarray
        ``EXTNAME`` → 2-D raw segment (rows, cols), in file order.
    segment_headers : dict of str to astropy.io.fits.Header
        ``EXTNAME`` → the segment's header.
    """

    path: Path
    header: fits.Header = field(repr=False)
    segments: dict[str, np.ndarray] = field(repr=False)
    segment_headers: dict[str, fits.Header] = field(repr=False)

    def _keyword(self, key: str) -> object:
        if key not in self.header:
            raise RawFormatError(f"{self.path}: primary header has no {key} keyword")
        return self.header[key]

    @property
    def detector_name(self) -> str:
        """``RAFTBAY_CCDSLOT``, e.g. ``R22_S11``."""
        return f"{self._keyword('RAFTBAY')}_{self._keyword('CCDSLOT')}"

    @property
    def obsid(self) -> str:
        """The OBSID keyword, e.g. ``MC_O_20250101_000001``."""
        return str(self._keyword("OBSID"))

    def stack(self) -> np.ndarray:
        """The segments as one ``(16, rows, cols)`` array in :data:`SEGMENT_ORDER` (HDU order)."""
        return np.stack([self.segments[name] for name in SEGMENT_ORDER])


def _instrument(detector: Detector) -> str:
    return "LSSTCam" if detector.vendor in (ITL, E2V) else "LSSTCam-mini"


def _value(v: object) -> object:
    """The value of a header entry given as ``value`` or ``(value, comment)``."""
    return v[0] if isinstance(v, tuple) else v


def _primary_header(detector: Detector, header: Mapping) -> fits.Header:
    missing = [k for k in REQUIRED_KEYWORDS if k not in header]
    if missing:
        raise ValueError(
            f"raw header for {detector.name} lacks required keyword(s) {', '.join(missing)}; "
            f"every raw needs {', '.join(REQUIRED_KEYWORDS)}"
        )
    reserved = sorted(k for k in header if str(k).upper() in _STRUCTURAL)
    if reserved:
        raise ValueError(f"raw header may not set FITS structure keyword(s) {', '.join(reserved)}")
    ny, nx = detector.shape
    derived = {
        "RAFTBAY": (detector.raft, "raft bay"),
        "CCDSLOT": (detector.slot, "CCD slot in the raft"),
        "CCD_MANU": (detector.vendor.manufacturer, "CCD manufacturer"),
        "LSST_NUM": (detector.serial, "CCD serial number"),
        "DETSIZE": (f"[1:{nx},1:{ny}]", "assembled CCD size"),
    }
    conflicts = [f"{k}={_value(header[k])!r} (detector says {v!r})" for k, (v, _) in derived.items()
                 if k in header and _value(header[k]) != v]  # fmt: skip
    if conflicts:
        raise ValueError(f"raw header disagrees with detector {detector.name}: {'; '.join(conflicts)}")
    derived.setdefault("INSTRUME", (_instrument(detector), "instrument"))
    derived.setdefault("TELESCOP", (TELESCOPE, "telescope"))
    hdr = fits.Header()
    if isinstance(header, fits.Header):
        items = [(c.keyword, (c.value, c.comment)) for c in header.cards]
    else:
        items = list(header.items())
    for key, value in items:
        try:
            if str(key).upper() in _COMMENTARY:
                hdr.append((key, _value(value)))
            else:
                hdr[key] = value
        except Exception as exc:  # astropy raises several types for a bad card
            raise ValueError(f"raw header keyword {key!r} = {value!r} is not a valid FITS card: {exc}") from exc
    for key, value in derived.items():
        if key not in hdr:
            hdr[key] = value
    return hdr


def _checked_segments(segments: np.ndarray, detector: Detector) -> np.ndarray:
    segments = np.asarray(segments)
    expected = (len(SEGMENT_ORDER), *detector.raw_shape)
    if segments.shape != expected:
        raise ValueError(
            f"segments for {detector.name} have shape {segments.shape}; expected {expected} "
            "(16 segments in SEGMENT_ORDER, each rows × cols of the raw segment)"
        )
    if segments.dtype.kind not in "iu":
        raise ValueError(f"segments must be integers (int32 or uint32 ADU), got dtype {segments.dtype}")
    if segments.size and np.dtype(segments.dtype).itemsize >= 4 and segments.dtype != np.int32:
        lo, hi = int(segments.min()), int(segments.max())
        if lo < _INT32_MIN or hi > _INT32_MAX:
            raise ValueError(
                f"segment values span [{lo}, {hi}], outside the signed 32-bit range raw files store; "
                "clip or rescale the pixels before writing"
            )
    return segments


def write_raw(
    path: str | os.PathLike,
    detector: Detector,
    segments: np.ndarray,
    header: Mapping,
    *,
    biassec: bool = True,
    overwrite: bool = False,
    compress: bool = False,
) -> Path:
    """Write one CCD's raw exposure as an LSSTCam multi-extension FITS file.

    Parameters
    ----------
    path : str or os.PathLike
        Output file; its directory must exist. The file is written to a temporary name in the same
        directory and renamed into place, so ``path`` never holds a partial file.
    detector : Detector
        The CCD; it supplies the segment layout and the detector keywords.
    segments : numpy.ndarray
        Integer array ``(16, raw_rows, raw_cols)`` in HDU order (:data:`SEGMENT_ORDER`). Any integer dtype
        whose values fit in int32 (e.g. ``int32``, ``uint32``); stored exactly as BITPIX 32. Not modified.
    header : mapping or astropy.io.fits.Header
        Primary keywords: at least :data:`REQUIRED_KEYWORDS`. Values may be ``(value, comment)`` tuples.
        INSTRUME and TELESCOP default to ``LSSTCam`` (``LSSTCam-mini`` for the mini camera) and
        :data:`TELESCOPE`; RAFTBAY, CCDSLOT, CCD_MANU, LSST_NUM and DETSIZE come from ``detector``.
    biassec : bool, optional
        Add BIASSEC (the serial overscan) to each segment header. Real LSSTCam raws have none.
    overwrite : bool, optional
        Replace an existing file. Raw files are immutable data, so this is off by default.
    compress : bool, optional
        Store each segment tile-compressed with RICE_1 (lossless for integers, about 4× smaller), as
        Rubin archives LSSTCam raws; the pixels read back are identical.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    ValueError
        Missing or conflicting header keywords, or segments of the wrong shape, dtype or range.
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    FileNotFoundError
        The output directory does not exist.
    """
    path = Path(path)
    segments = _checked_segments(segments, detector)
    primary = _primary_header(detector, header)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write raw {path}: directory {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise FileExistsError(f"raw {path} already exists; remove it or pass overwrite=True")
    write_bytes_atomic(path, raw_chunks(primary, detector, segments, biassec=biassec, compress=compress,
                                        comment=_CHECKSUM_COMMENT))  # fmt: skip
    return path


def _open_quietly(path: Path, checksum: bool) -> tuple[fits.HDUList, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fits.open(path, memmap=False, checksum=checksum, lazy_load_hdus=False), caught
        except Exception as exc:
            raise RawFormatError(f"{path}: cannot be read as FITS: {exc}") from exc


def _check_structure(path: Path) -> bool:
    """Cheap checks before opening: FITS magic and whole FITS blocks. Returns whether it is gzipped."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(9)
    gzipped = magic[:2] == b"\x1f\x8b"
    if not gzipped and magic != b"SIMPLE  =":
        raise RawFormatError(f"{path}: not a FITS file (it does not start with 'SIMPLE  =')")
    if not gzipped and size % _FITS_BLOCK:
        raise RawFormatError(
            f"{path}: file is truncated: its size {size} is not a multiple of the {_FITS_BLOCK}-byte FITS block"
        )
    return gzipped


def _check_extent(path: Path, hdul: fits.HDUList) -> None:
    """Every HDU's data lies inside the file (astropy only warns about a short file)."""
    size = path.stat().st_size
    end = max(hdul.fileinfo(i)["datLoc"] + hdul.fileinfo(i)["datSpan"] for i in range(len(hdul)))
    if end > size:
        hdul.close()
        raise RawFormatError(f"{path}: file is truncated: its headers describe {end} bytes but it has {size}")


def _checked_file(path: Path) -> bool:
    """The structural checks before a raw is read (it exists, is a file, FITS or gzip); returns whether it is
    gzipped."""
    if not path.exists():
        raise RawFormatError(f"{path}: no such raw file")
    if not path.is_file():
        raise RawFormatError(f"{path}: not a regular file")
    return _check_structure(path)


def _open_checked(path: Path, gzipped: bool) -> fits.HDUList:
    """Open ``path`` (past :func:`_checked_file`), verifying CHECKSUM/DATASUM where present.

    Astropy reports truncation and checksum failures as warnings; here they are errors.
    """
    hdul, caught = _open_quietly(path, checksum=True)
    if not gzipped:
        _check_extent(path, hdul)
    failed, problems = [], []
    for w in caught:
        text = str(w.message).strip()
        if "verification failed" in text:
            m = _FAILED_HDU_RE.search(text)
            failed.append(m.group(1) if m else text)
        elif "truncated" in text or "Error validating header" in text:
            problems.append(text)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if failed or problems:
        hdul.close()
    if failed:
        raise RawFormatError(
            f"{path}: file is corrupt: CHECKSUM/DATASUM mismatch in {', '.join(dict.fromkeys(failed))}; "
            "the bytes changed after writing, fetch a good copy"
        )
    if problems:
        raise RawFormatError(f"{path}: file is truncated or corrupt: {'; '.join(problems)}")
    return hdul


def _segment_array(path: Path, hdu: fits.hdu.base.ExtensionHDU) -> np.ndarray:
    name = hdu.name
    try:
        data = hdu.data
    except Exception as exc:
        raise RawFormatError(f"{path}: pixels of {name} cannot be read ({exc}); the file may be truncated") from exc
    if data is None or data.ndim != 2:
        shape = None if data is None else data.shape
        raise RawFormatError(f"{path}: {name} must hold a 2-D image, found data of shape {shape}")
    expected = (hdu.header.get("NAXIS2"), hdu.header.get("NAXIS1"))
    if data.shape != expected:
        raise RawFormatError(f"{path}: {name} has {data.shape} pixels but its header says {expected}")
    if data.dtype.kind not in "iuf":
        raise RawFormatError(f"{path}: {name} has non-numeric pixels of dtype {data.dtype}")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise RawFormatError(f"{path}: {name} contains NaN or infinite pixels; raw pixels must be finite ADU")
    data = data.astype(data.dtype.newbyteorder("="), copy=not data.dtype.isnative)
    data.flags.writeable = False
    return data


def check_section(path: Path, name: str, hdr: fits.Header, key: str) -> tuple:
    """The parsed section ``key`` (DATASEC, DETSEC) of segment ``name``, or a RawFormatError naming the file."""
    if key not in hdr:
        raise RawFormatError(f"{path}: {name} has no {key} keyword; every raw segment needs DATASEC and DETSEC")
    try:
        return parse_section(hdr[key])
    except ValueError as exc:
        raise RawFormatError(f"{path}: {name} {key}: {exc}") from exc


def _read_blocks(path: Path) -> tuple[fits.Header, list[tuple[str, fits.Header, np.ndarray]]] | None:
    """The file (past :func:`_checked_file`, not gzipped) read by :mod:`lsstpipe.io.raw_blocks`, or None where
    astropy must read it."""
    buf = path.read_bytes()
    try:
        found = read_blocks(buf)
    except (FitsLayoutError, RawBlocksError) as exc:
        raise RawFormatError(f"{path}: {exc}") from exc
    if found is None:
        return None
    primary, segments, failed = found
    if failed:
        raise RawFormatError(f"{path}: file is corrupt: CHECKSUM/DATASUM mismatch in {', '.join(failed)}; "
                             "the bytes changed after writing, fetch a good copy")  # fmt: skip
    return primary, segments


def _read_astropy(path: Path, gzipped: bool) -> tuple[fits.Header, list[tuple[str, fits.Header, np.ndarray]]]:
    """The file read by astropy (gzip, other tile compressions, scaled pixels): the primary header and the
    segments ``(EXTNAME, header, pixels)``."""
    with _open_checked(path, gzipped) as hdul:
        found = [(hdu.name.strip(), hdu.header.copy(), _segment_array(path, hdu)) for hdu in hdul[1:]
                 if hdu.name.strip().upper().startswith("SEGMENT")]  # fmt: skip
        return hdul[0].header.copy(), found


def read_raw(path: str | os.PathLike) -> RawExposure:
    """Read a raw file written by :func:`write_raw` or by LSSTCam.

    Parameters
    ----------
    path : str or os.PathLike
        The raw FITS file. Tile-compressed segments are decompressed; HDUs whose EXTNAME is not a segment
        name (WREB, REB_COND, …) are ignored. CHECKSUM/DATASUM, where present, are verified.

    Returns
    -------
    RawExposure
        Primary header, segments (native byte order, read-only) and segment headers.

    Raises
    ------
    RawFormatError
        The file is missing, not FITS, truncated, fails its checksums, lacks segments, has segments of
        inconsistent shapes, missing or unparsable DATASEC/DETSEC, a DATASEC outside the segment, or
        non-finite pixels. The message names the file.
    """
    path = Path(path)
    gzipped = _checked_file(path)
    found = None if gzipped else _read_blocks(path)
    if found is None:
        primary, found = _read_astropy(path, gzipped)
    else:
        primary, found = found
    segments: dict[str, np.ndarray] = {}
    segment_headers: dict[str, fits.Header] = {}
    for name, hdr, data in found:
        name = "Segment" + name[7:]
        if name not in SEGMENT_ORDER:
            raise RawFormatError(f"{path}: unexpected segment HDU {name}; segments are {', '.join(SEGMENT_ORDER)}")
        if name in segments:
            raise RawFormatError(f"{path}: segment {name} appears twice")
        segments[name] = data
        segment_headers[name] = hdr
    missing = [s for s in SEGMENT_ORDER if s not in segments]
    if missing:
        raise RawFormatError(
            f"{path}: missing segment(s) {', '.join(missing)}; a raw holds all 16 "
            "(the file may be truncated or not an LSSTCam raw)"
        )
    shapes = {name: a.shape for name, a in segments.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise RawFormatError(f"{path}: segments have different shapes ({listing}); all must match")
    for name, hdr in segment_headers.items():
        _, x1, _, y1, _, _ = check_section(path, name, hdr, "DATASEC")
        check_section(path, name, hdr, "DETSEC")
        rows, cols = shapes[name]
        if x1 > cols or y1 > rows:
            raise RawFormatError(f"{path}: {name} DATASEC {hdr['DATASEC']} lies outside the {rows}×{cols} segment")
    return RawExposure(path=path, header=primary, segments=segments, segment_headers=segment_headers)
