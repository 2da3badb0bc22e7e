"""CCD assembly from raw segments, its exact inverse, and the overscan regions of each segment.

Assembly follows the real camera: trim each segment by DATASEC, place it by DETSEC (a reversed range is a
flip), then flip the whole CCD in y (``final = placed[::-1, :]``). :func:`assemble_ccd` reads only the
headers, so it works on real LSSTCam raws; :func:`disassemble_ccd` uses the camera model and is the
simulator's exact inverse.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

from lsstpipe.camera.geometry import E2V, E2V_MINI, ITL, ITL_MINI, SEGMENT_ORDER, Detector, VendorGeometry
from lsstpipe.io.raw import RawExposure, RawFormatError, check_section, parse_section, read_raw

__all__ = ["AmpRegions", "assemble_ccd", "disassemble_ccd", "overscan_regions", "parse_section"]

#: Vendor geometries a raw can be matched against, full size first.
KNOWN_VENDORS = (ITL, E2V, ITL_MINI, E2V_MINI)


def _as_raw(raw: RawExposure | str | os.PathLike) -> RawExposure:
    if isinstance(raw, (str, os.PathLike)):
        return read_raw(raw)
    if not isinstance(raw, RawExposure):
        raise TypeError(f"expected a RawExposure or a path to a raw file, got {type(raw).__name__}")
    missing = [s for s in SEGMENT_ORDER if s not in raw.segments or s not in raw.segment_headers]
    if missing:
        raise RawFormatError(f"{raw.path}: missing segment(s) {', '.join(missing)}; a raw holds all 16")
    return raw


def _section(raw: RawExposure, name: str, key: str) -> tuple[int, int, int, int, bool, bool]:
    return check_section(raw.path, name, raw.segment_headers[name], key)


def _ccd_size(raw: RawExposure, detsecs: dict[str, tuple]) -> tuple[int, int]:
    """Assembled (ny, nx) from DETSIZE (primary, else first segment), else the union of the DETSECs."""
    for hdr, where in (
        (raw.header, "primary header"),
        (raw.segment_headers[SEGMENT_ORDER[0]], SEGMENT_ORDER[0]),
    ):
        if "DETSIZE" in hdr:
            try:
                x0, x1, y0, y1, fx, fy = parse_section(hdr["DETSIZE"])
            except ValueError as exc:
                raise RawFormatError(f"{raw.path}: DETSIZE in {where}: {exc}") from exc
            if x0 or y0 or fx or fy:
                raise RawFormatError(f"{raw.path}: DETSIZE {hdr['DETSIZE']} in {where} must start at [1:…,1:…]")
            return y1, x1
    return max(d[3] for d in detsecs.values()), max(d[1] for d in detsecs.values())


def _check_coverage(raw: RawExposure, detsecs: dict[str, tuple], ny: int, nx: int) -> None:
    """Every DETSEC inside the CCD, no two overlapping, together covering it: each pixel exactly once."""
    items = list(detsecs.items())
    for name, (_x0, x1, _y0, y1, _, _) in items:
        if x1 > nx or y1 > ny:
            raise RawFormatError(
                f"{raw.path}: {name} DETSEC {raw.segment_headers[name]['DETSEC']} lies outside the "
                f"{nx}×{ny} CCD (DETSIZE)"
            )
    for i, (a, (ax0, ax1, ay0, ay1, _, _)) in enumerate(items):
        for b, (bx0, bx1, by0, by1, _, _) in items[i + 1 :]:
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                raise RawFormatError(f"{raw.path}: DETSECs of {a} and {b} overlap; each CCD pixel needs one amplifier")
    covered = sum((x1 - x0) * (y1 - y0) for x0, x1, y0, y1, _, _ in detsecs.values())
    if covered != nx * ny:
        raise RawFormatError(f"{raw.path}: DETSECs cover {covered} of the CCD's {nx}×{ny} pixels; they leave gaps")


def assemble_ccd(raw: RawExposure | str | os.PathLike, dtype: DTypeLike = None) -> np.ndarray:
    """Assemble a raw exposure into one CCD image, as the camera does, from the headers alone.

    Each segment is trimmed to its DATASEC, placed at its DETSEC (reversed ranges flip it), and the whole
    CCD is then flipped in y. The CCD size is DETSIZE (primary header, else the first segment's), else the
    union of the DETSECs. Overscan and prescan are dropped: subtract them first if needed.

    Parameters
    ----------
    raw : RawExposure or str or os.PathLike
        A raw read by :func:`~lsstpipe.io.raw.read_raw`, or the path of one.
    dtype : numpy dtype, optional
        Output dtype; by default the segments' dtype, so pixels are exact.

    Returns
    -------
    numpy.ndarray
        ``(ny, nx)`` assembled image; amplifier ``amp`` of the camera model lands at ``amp.bbox``.

    Raises
    ------
    RawFormatError
        DATASEC/DETSEC missing or unparsable, DATASEC and DETSEC of different sizes, or DETSECs that do
        not cover the CCD exactly once.
    """
    raw = _as_raw(raw)
    datasecs = {name: _section(raw, name, "DATASEC") for name in SEGMENT_ORDER}
    detsecs = {name: _section(raw, name, "DETSEC") for name in SEGMENT_ORDER}
    for name in SEGMENT_ORDER:
        dx0, dx1, dy0, dy1, _, _ = datasecs[name]
        x0, x1, y0, y1, _, _ = detsecs[name]
        if (dx1 - dx0, dy1 - dy0) != (x1 - x0, y1 - y0):
            hdr = raw.segment_headers[name]
            raise RawFormatError(
                f"{raw.path}: {name} DATASEC {hdr['DATASEC']} is {dx1 - dx0}×{dy1 - dy0} but DETSEC "
                f"{hdr['DETSEC']} is {x1 - x0}×{y1 - y0}; they must be the same size"
            )
    ny, nx = _ccd_size(raw, detsecs)
    _check_coverage(raw, detsecs, ny, nx)
    if dtype is None:
        dtype = np.result_type(*(raw.segments[name] for name in SEGMENT_ORDER))
    out = np.empty((ny, nx), dtype=dtype)
    for name in SEGMENT_ORDER:
        dx0, dx1, dy0, dy1, _, _ = datasecs[name]
        x0, x1, y0, y1, flip_x, flip_y = detsecs[name]
        block = raw.segments[name][dy0:dy1, dx0:dx1]
        # DETSEC's own flips, then the whole-CCD y flip: rows flip unless DETSEC already flipped them.
        block = block[:: 1 if flip_y else -1, :: -1 if flip_x else 1]
        out[ny - y1 : ny - y0, x0:x1] = block
    return out


def disassemble_ccd(image: np.ndarray, detector: Detector, out: np.ndarray | None = None) -> np.ndarray:
    """Split an assembled CCD image into raw segments: the exact inverse of :func:`assemble_ccd`.

    Parameters
    ----------
    image : numpy.ndarray
        ``detector.shape`` image in the assembled frame. Not modified.
    detector : Detector
        The CCD; each amplifier's ``bbox``, ``flip_x``, ``flip_y`` and ``raw_data`` place its pixels.
    out : numpy.ndarray, optional
        ``(16, raw_rows, raw_cols)`` array to fill; only the data regions are written, so prescan and
        overscan keep their values (e.g. a bias already simulated there). By default a new zero array of
        ``image.dtype``.

    Returns
    -------
    numpy.ndarray
        ``(16, raw_rows, raw_cols)`` segments in HDU order (:data:`SEGMENT_ORDER`); ``out`` if given.

    Raises
    ------
    ValueError
        ``image`` or ``out`` has the wrong shape, or ``out`` cannot hold ``image``'s dtype without loss
        of kind (e.g. float pixels into an integer ``out``: round them first).
    """
    image = np.asarray(image)
    if image.shape != detector.shape:
        raise ValueError(f"image has shape {image.shape}; detector {detector.name} assembles to {detector.shape}")
    shape = (len(SEGMENT_ORDER), *detector.raw_shape)
    if out is None:
        out = np.zeros(shape, dtype=image.dtype)
    elif out.shape != shape:
        raise ValueError(f"out has shape {out.shape}; detector {detector.name} needs {shape}")
    elif not np.can_cast(image.dtype, out.dtype, casting="same_kind"):
        raise ValueError(f"cannot store {image.dtype} pixels in out of dtype {out.dtype}; convert the image first")
    for amp in detector.amps:
        y0, y1, x0, x1 = amp.bbox
        block = image[y0:y1, x0:x1][:: 1 if amp.flip_y else -1, :: -1 if amp.flip_x else 1]
        out[amp.hdu - 1][amp.raw_data] = block
    return out


@dataclass(frozen=True)
class AmpRegions:
    """Regions of one raw segment as 0-based ``(rows, cols)`` slices."""

    data: tuple[slice, slice]
    """Imaging pixels (DATASEC)."""
    serial_overscan: tuple[slice, slice]
    """Columns read after the data, over the data rows (BIASSEC in files that carry it)."""
    parallel_overscan: tuple[slice, slice]
    """Rows read after the data, over the data columns."""
    prescan: tuple[slice, slice]
    """Columns read before the data, over the data rows."""


def _vendor_regions(v: VendorGeometry) -> AmpRegions:
    w, h, p = v.data_width, v.data_height, v.prescan
    return AmpRegions(
        data=(slice(0, h), slice(p, p + w)),
        serial_overscan=(slice(0, h), slice(p + w, v.raw_width)),
        parallel_overscan=(slice(h, v.raw_height), slice(p, p + w)),
        prescan=(slice(0, h), slice(0, p)),
    )


def _raw_vendor(raw: RawExposure) -> VendorGeometry:
    """The vendor geometry matching CCD_MANU (when present) and the segment shape."""
    shape = raw.segments[SEGMENT_ORDER[0]].shape
    manu = str(raw.header.get("CCD_MANU", "")).strip().upper()
    matches = [v for v in KNOWN_VENDORS if v.raw_height == shape[0] and v.raw_width == shape[1]]
    if manu:
        matches = [v for v in matches if v.name == manu]
    if len(matches) != 1:
        known = ", ".join(f"{v.name} {v.raw_height}×{v.raw_width}" for v in KNOWN_VENDORS)
        why = "is ambiguous; set CCD_MANU to ITL or E2V" if matches else f"matches none of {known}"
        raise RawFormatError(f"{raw.path}: segment shape {shape[0]}×{shape[1]} with CCD_MANU={manu!r} {why}")
    vendor = matches[0]
    data = _vendor_regions(vendor).data
    for name in SEGMENT_ORDER:
        x0, x1, y0, y1, _, _ = _section(raw, name, "DATASEC")
        if (slice(y0, y1), slice(x0, x1)) != data:
            raise RawFormatError(
                f"{raw.path}: {name} DATASEC {raw.segment_headers[name]['DATASEC']} does not match the "
                f"{vendor.name} layout ({vendor.prescan} prescan, "
                f"{vendor.data_width}×{vendor.data_height} data)"
            )
    return vendor


def overscan_regions(raw_or_detector: RawExposure | Detector | str | os.PathLike) -> dict[str, AmpRegions]:
    """Data, serial overscan, parallel overscan and prescan regions of every segment.

    The regions come from the vendor geometry, not from BIASSEC (real LSSTCam raws have none). For a
    raw, the vendor is identified by the CCD_MANU keyword (ITL or E2V) and the segment shape (full-size
    or mini camera); without CCD_MANU the shape alone must decide, which it cannot for full-size CCDs
    (both vendors read 2048×576 segments). Each segment's DATASEC is checked against the result.

    Parameters
    ----------
    raw_or_detector : RawExposure or Detector or str or os.PathLike
        A raw (or the path of one), or a detector of the camera model.

    Returns
    -------
    dict of str to AmpRegions
        Segment name → its regions, in :data:`SEGMENT_ORDER`.

    Raises
    ------
    RawFormatError
        The vendor cannot be identified, or a DATASEC disagrees with its layout.
    """
    if isinstance(raw_or_detector, Detector):
        return {
            amp.segment: AmpRegions(amp.raw_data, amp.raw_serial_overscan, amp.raw_parallel_overscan, amp.raw_prescan)
            for amp in sorted(raw_or_detector.amps, key=lambda a: a.hdu)
        }
    regions = _vendor_regions(_raw_vendor(_as_raw(raw_or_detector)))
    return dict.fromkeys(SEGMENT_ORDER, regions)
