"""LSSTCam geometry: rafts, detectors, amplifiers and the raw segment layout.

Conventions
-----------
* Raft ``Rrc`` sits in row ``r`` (focal-plane y) and column ``c`` (focal-plane x) of the 5×5 raft grid,
  centred at ``((c - 2) * raft_pitch, (r - 2) * raft_pitch)`` mm. The four corners R00, R04, R40, R44
  hold the wavefront sensors; the other 21 rafts hold 9 science CCDs each.
* CCD ``Sij`` sits in row ``i``, column ``j`` of its raft, centred at
  ``raft_centre + ((j - 1) * ccd_pitch, (i - 1) * ccd_pitch)`` mm.
* Detector ids follow Rubin's numbering: science rafts in order R01, R02, …, R43, nine slots each
  (R01_S00 = 0, R22_S11 = 94, R43_S22 = 188). Corner raft ``k`` (R00, R04, R40, R44) uses Rubin's ids
  ``189 + 4k`` … ``192 + 4k`` (SG0, SG1, SW0, SW1); our wavefront sensor ``Rxx_SW`` is the SW0/SW1 pair
  read as one 16-segment detector (segments ``0x`` are SW0, extra-focal; ``1x`` are SW1, intra-focal)
  and carries the SW0 id.
* A raw segment is a ``(raw_height, raw_width)`` array: ``prescan`` columns, ``data_width`` data columns,
  ``serial_overscan`` columns; ``data_height`` data rows then ``parallel_overscan`` rows.
* Assembly (as the real camera): trim each segment by DATASEC, place it by DETSEC (a reversed range is a
  flip), then flip the whole CCD in y. ``AmpInfo.bbox`` is the amplifier's place in the final image.
"""

from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass, field
from functools import cache

import numpy as np

#: LSSTCam plate scale in arcsec per 10 µm pixel.
PIXEL_SCALE_ARCSEC = 0.2
#: LSSTCam pixel pitch in mm.
PIXEL_SIZE_MM = 0.010
#: Effective focal length in mm (0.2"/10 µm).
FOCAL_LENGTH_MM = PIXEL_SIZE_MM / np.deg2rad(PIXEL_SCALE_ARCSEC / 3600.0)

#: Segment EXTNAMEs in HDU order (HDU 1 … 16), as LSSTCam writes them.
SEGMENT_ORDER = tuple(f"Segment1{i}" for i in range(8)) + tuple(f"Segment0{i}" for i in range(7, -1, -1))

#: Science rafts in Rubin's detector-numbering order.
SCIENCE_RAFTS = (
    "R01", "R02", "R03",
    "R10", "R11", "R12", "R13", "R14",
    "R20", "R21", "R22", "R23", "R24",
    "R30", "R31", "R32", "R33", "R34",
    "R41", "R42", "R43",
)  # fmt: skip
CORNER_RAFTS = ("R00", "R04", "R40", "R44")
CCD_SLOTS = ("S00", "S01", "S02", "S10", "S11", "S12", "S20", "S21", "S22")
#: Science rafts built with ITL sensors; the other 13 are e2v.
ITL_RAFTS = frozenset({"R01", "R02", "R03", "R10", "R20", "R41", "R42", "R43"})


class DetectorType(enum.Enum):
    """Role of a detector on the focal plane."""

    SCIENCE = "SCIENCE"
    """A science CCD, processed by the alert production."""
    WAVEFRONT = "WAVEFRONT"
    """A corner wavefront sensor (the SW0/SW1 pair), processed by a wavefront job."""


@dataclass(frozen=True)
class VendorGeometry:
    """Pixel layout of one sensor vendor's CCD and its raw segments."""

    name: str
    data_width: int
    data_height: int
    prescan: int
    serial_overscan: int
    parallel_overscan: int
    #: Segment ``1x`` flips (x, y) relative to DETSEC and segment ``0x`` flips.
    flips_top: tuple[bool, bool]
    flips_bottom: tuple[bool, bool]
    typical_gain: float
    typical_read_noise: float
    typical_bias: float
    full_well_e: float
    #: Nominal manufacturer string for the CCD_MANU keyword.
    manufacturer: str = ""

    @property
    def raw_width(self) -> int:
        return self.prescan + self.data_width + self.serial_overscan

    @property
    def raw_height(self) -> int:
        return self.data_height + self.parallel_overscan

    @property
    def ccd_shape(self) -> tuple[int, int]:
        """Assembled (ny, nx)."""
        return 2 * self.data_height, 8 * self.data_width


ITL = VendorGeometry(
    "ITL", 509, 2000, 3, 64, 48, flips_top=(True, True), flips_bottom=(True, False),
    typical_gain=1.70, typical_read_noise=6.5, typical_bias=15000.0, full_well_e=130000.0,
    manufacturer="ITL",
)  # fmt: skip
E2V = VendorGeometry(
    "E2V", 512, 2002, 10, 54, 46, flips_top=(True, True), flips_bottom=(False, False),
    typical_gain=1.45, typical_read_noise=5.4, typical_bias=23000.0, full_well_e=150000.0,
    manufacturer="E2V",
)  # fmt: skip
#: Scaled vendors for the ``mini`` camera: same structure, small CCDs (512×500 / 512×504 pixels).
ITL_MINI = VendorGeometry(
    "ITL", 64, 250, 3, 16, 8, flips_top=ITL.flips_top, flips_bottom=ITL.flips_bottom,
    typical_gain=ITL.typical_gain, typical_read_noise=ITL.typical_read_noise,
    typical_bias=ITL.typical_bias, full_well_e=ITL.full_well_e, manufacturer="ITL",
)  # fmt: skip
E2V_MINI = VendorGeometry(
    "E2V", 64, 252, 10, 14, 6, flips_top=E2V.flips_top, flips_bottom=E2V.flips_bottom,
    typical_gain=E2V.typical_gain, typical_read_noise=E2V.typical_read_noise,
    typical_bias=E2V.typical_bias, full_well_e=E2V.full_well_e, manufacturer="E2V",
)  # fmt: skip


@dataclass(frozen=True)
class AmpInfo:
    """One amplifier (segment) of a CCD, with its electronics and its place in raw and assembled images.

    Slices are 0-based numpy slices ``(rows, cols)``. ``bbox`` is ``(y0, y1, x0, x1)`` in the assembled
    image; ``raw_data`` is the data region inside the raw segment.
    """

    name: str
    segment: str
    hdu: int
    ix: int
    iy: int
    flip_x: bool
    flip_y: bool
    bbox: tuple[int, int, int, int]
    detsec: str
    datasec: str
    dtv: tuple[float, float]
    dtm: tuple[float, float]
    raw_data: tuple[slice, slice]
    raw_serial_overscan: tuple[slice, slice]
    raw_parallel_overscan: tuple[slice, slice]
    raw_prescan: tuple[slice, slice]
    gain: float
    read_noise: float
    saturation: float
    bias_level: float

    @property
    def data_slices(self) -> tuple[slice, slice]:
        """Slices of this amplifier in the assembled image."""
        y0, y1, x0, x1 = self.bbox
        return slice(y0, y1), slice(x0, x1)


@dataclass(frozen=True)
class Detector:
    """One CCD (or wavefront sensor pair) of the camera."""

    id: int
    raft: str
    slot: str
    type: DetectorType
    vendor: VendorGeometry
    serial: str
    center_mm: tuple[float, float]
    amps: tuple[AmpInfo, ...] = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.raft}_{self.slot}"

    @property
    def shape(self) -> tuple[int, int]:
        """Assembled image shape (ny, nx)."""
        return self.vendor.ccd_shape

    @property
    def raw_shape(self) -> tuple[int, int]:
        """Shape of one raw segment (rows, cols)."""
        return self.vendor.raw_height, self.vendor.raw_width

    def amp(self, name: str) -> AmpInfo:
        """The amplifier named ``C10`` … or its segment name ``Segment10`` …."""
        for a in self.amps:
            if a.name == name or a.segment == name:
                return a
        raise KeyError(f"detector {self.name} has no amplifier {name!r}; amplifiers are C00…C17")

    def pixel_to_focal_plane(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Assembled pixel (x, y), 0-based pixel centres, to focal-plane mm."""
        ny, nx = self.shape
        px = self.vendor_pixel_mm
        return (
            self.center_mm[0] + (np.asarray(x) - (nx - 1) / 2.0) * px,
            self.center_mm[1] + (np.asarray(y) - (ny - 1) / 2.0) * px,
        )

    def focal_plane_to_pixel(self, fx: np.ndarray, fy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Focal-plane mm to assembled pixel (x, y)."""
        ny, nx = self.shape
        px = self.vendor_pixel_mm
        return (
            (np.asarray(fx) - self.center_mm[0]) / px + (nx - 1) / 2.0,
            (np.asarray(fy) - self.center_mm[1]) / px + (ny - 1) / 2.0,
        )

    @property
    def vendor_pixel_mm(self) -> float:
        return PIXEL_SIZE_MM


@dataclass(frozen=True)
class Camera:
    """A camera: its detectors and focal-plane layout."""

    name: str
    detectors: tuple[Detector, ...] = field(repr=False)
    raft_pitch_mm: float
    ccd_pitch_mm: float
    pixel_scale_arcsec: float = PIXEL_SCALE_ARCSEC
    focal_length_mm: float = FOCAL_LENGTH_MM

    def __post_init__(self) -> None:
        ids = [d.id for d in self.detectors]
        names = [d.name for d in self.detectors]
        if len(set(ids)) != len(ids) or len(set(names)) != len(names):
            raise ValueError(f"camera {self.name}: detector ids and names must be unique")

    def __iter__(self):
        return iter(self.detectors)

    def __len__(self) -> int:
        return len(self.detectors)

    @property
    def science(self) -> tuple[Detector, ...]:
        return tuple(d for d in self.detectors if d.type is DetectorType.SCIENCE)

    @property
    def wavefront(self) -> tuple[Detector, ...]:
        return tuple(d for d in self.detectors if d.type is DetectorType.WAVEFRONT)

    @property
    def rafts(self) -> tuple[str, ...]:
        """Raft names in detector order, each once."""
        return tuple(dict.fromkeys(d.raft for d in self.detectors))

    @property
    def science_rafts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d.raft for d in self.science))

    def raft_detectors(self, raft: str) -> tuple[Detector, ...]:
        dets = tuple(d for d in self.detectors if d.raft == raft)
        if not dets:
            raise KeyError(f"camera {self.name} has no raft {raft!r}; rafts are {', '.join(self.rafts)}")
        return dets

    def __getitem__(self, key: int | str) -> Detector:
        for d in self.detectors:
            if d.id == key or d.name == key:
                return d
        raise KeyError(
            f"camera {self.name} has no detector {key!r}; use a name like "
            f"{self.detectors[0].name} or an id between {min(d.id for d in self.detectors)} and "
            f"{max(d.id for d in self.detectors)}"
        )

    def select(self, names: list[str] | None) -> tuple[Detector, ...]:
        """The detectors named (all when ``names`` is None or empty), in camera order."""
        if not names:
            return self.detectors
        wanted = {self[n if not str(n).isdigit() else int(n)].id for n in names}
        return tuple(d for d in self.detectors if d.id in wanted)

    @property
    def field_radius_deg(self) -> float:
        """Radius of the circle enclosing every detector, in degrees."""
        r = 0.0
        for d in self.detectors:
            ny, nx = d.shape
            half = np.hypot(nx, ny) / 2.0 * PIXEL_SIZE_MM
            r = max(r, float(np.hypot(*d.center_mm)) + half)
        return r / self.focal_length_mm * 180.0 / np.pi


def iraf_section(x0: int, x1: int, y0: int, y1: int, flip_x: bool = False, flip_y: bool = False) -> str:
    """IRAF section string (1-based, inclusive) for 0-based half-open ranges, reversed where flipped."""
    xs = f"{x1}:{x0 + 1}" if flip_x else f"{x0 + 1}:{x1}"
    ys = f"{y1}:{y0 + 1}" if flip_y else f"{y0 + 1}:{y1}"
    return f"[{xs},{ys}]"


def _stable_rng(*key: object) -> np.random.Generator:
    """A generator seeded from a string key, independent of Python's hash randomisation."""
    return np.random.default_rng(zlib.crc32("/".join(map(str, key)).encode()))


def build_amps(vendor: VendorGeometry, detector_key: str) -> tuple[AmpInfo, ...]:
    """Amplifiers of one CCD in HDU order, with per-amp electronics drawn around the vendor's typical values.

    The electronics are a stable function of ``detector_key`` so the same detector always has the same
    gains, read noise, saturation and bias level.
    """
    rng = _stable_rng("amps", detector_key)
    w, h = vendor.data_width, vendor.data_height
    ny = 2 * h
    amps = []
    for hdu, seg in enumerate(SEGMENT_ORDER, start=1):
        iy, ix = int(seg[-2]), int(seg[-1])
        flip_x, flip_y = vendor.flips_top if iy == 1 else vendor.flips_bottom
        # Place in the DETSEC frame: row-block 1x is y in [h, 2h), 0x is [0, h).
        dx0, dx1 = ix * w, (ix + 1) * w
        dy0, dy1 = (h, 2 * h) if iy == 1 else (0, h)
        detsec = iraf_section(dx0, dx1, dy0, dy1, flip_x, flip_y)
        px0 = vendor.prescan
        datasec = iraf_section(px0, px0 + w, 0, h, False, False)
        # det = DTM * raw_pixel + DTV in 1-based coordinates.
        dtv1 = (dx1 + px0 + 1) if flip_x else (dx0 - px0)
        dtv2 = (dy1 + 1) if flip_y else dy0
        # The whole CCD is flipped in y after DETSEC placement.
        bbox = (ny - dy1, ny - dy0, dx0, dx1)
        gain = vendor.typical_gain * (1.0 + 0.02 * rng.standard_normal())
        read_noise = vendor.typical_read_noise * (1.0 + 0.05 * rng.standard_normal())
        bias = vendor.typical_bias * (1.0 + 0.05 * rng.standard_normal())
        # Flagged saturation sits at most a few per cent below the full well, never above it, so every pixel
        # that reached full well (and bled) is flagged.
        saturation = min(bias + vendor.full_well_e / gain * (1.0 - abs(0.02 * rng.standard_normal())), 2**31 - 1)
        amps.append(
            AmpInfo(
                name=f"C{iy}{ix}", segment=seg, hdu=hdu, ix=ix, iy=iy, flip_x=flip_x, flip_y=flip_y,
                bbox=bbox, detsec=detsec, datasec=datasec,
                dtv=(float(dtv1), float(dtv2)),
                dtm=(-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0),
                raw_data=(slice(0, h), slice(px0, px0 + w)),
                raw_serial_overscan=(slice(0, h), slice(px0 + w, vendor.raw_width)),
                raw_parallel_overscan=(slice(h, vendor.raw_height), slice(px0, px0 + w)),
                raw_prescan=(slice(0, h), slice(0, px0)),
                gain=round(float(gain), 5), read_noise=round(float(read_noise), 3),
                saturation=float(np.floor(saturation)), bias_level=round(float(bias), 1),
            )
        )  # fmt: skip
    return tuple(amps)


def _build(name: str, rafts: tuple[str, ...], corners: tuple[str, ...], itl: VendorGeometry,
           e2v: VendorGeometry, scale: float) -> Camera:  # fmt: skip
    raft_pitch = 127.0 * scale
    ccd_pitch = 42.25 * scale
    detectors = []
    for raft in rafts:
        r, c = int(raft[1]), int(raft[2])
        rx, ry = (c - 2) * raft_pitch, (r - 2) * raft_pitch
        vendor = itl if raft in ITL_RAFTS else e2v
        base = SCIENCE_RAFTS.index(raft) * 9
        for k, slot in enumerate(CCD_SLOTS):
            i, j = int(slot[1]), int(slot[2])
            prefix = "ITL-3800C" if vendor.name == "ITL" else "E2V-CCD250"
            detectors.append(
                Detector(
                    id=base + k, raft=raft, slot=slot, type=DetectorType.SCIENCE, vendor=vendor,
                    serial=f"{prefix}-{(base + k) * 7 % 500 + 1:03d}",
                    center_mm=(rx + (j - 1) * ccd_pitch, ry + (i - 1) * ccd_pitch),
                    amps=build_amps(vendor, f"{name}/{raft}_{slot}"),
                )
            )  # fmt: skip
    for raft in corners:
        k = CORNER_RAFTS.index(raft)
        r, c = int(raft[1]), int(raft[2])
        rx, ry = (c - 2) * raft_pitch, (r - 2) * raft_pitch
        detectors.append(
            Detector(
                id=191 + 4 * k, raft=raft, slot="SW", type=DetectorType.WAVEFRONT, vendor=itl,
                serial=f"ITL-3800C-W{k:02d}", center_mm=(rx, ry),
                amps=build_amps(itl, f"{name}/{raft}_SW"),
            )
        )  # fmt: skip
    return Camera(name=name, detectors=tuple(detectors), raft_pitch_mm=raft_pitch, ccd_pitch_mm=ccd_pitch)


CAMERAS = ("lsstcam", "mini")


@cache
def get_camera(name: str) -> Camera:
    """The camera called ``name``: ``lsstcam`` (LSSTCam as built) or ``mini``.

    ``mini`` has LSSTCam's structure — rafts of 3×3 CCDs, 16 amplifiers with prescan and overscan, both
    vendors and a corner wavefront sensor — with 512-pixel CCDs on a focal plane scaled by 1/8: science
    rafts R10 (ITL) and R11 (e2v) and the wavefront sensor R00_SW.
    """
    if name == "lsstcam":
        return _build("lsstcam", SCIENCE_RAFTS, CORNER_RAFTS, ITL, E2V, 1.0)
    if name == "mini":
        return _build("mini", ("R10", "R11"), ("R00",), ITL_MINI, E2V_MINI, 0.125)
    raise ValueError(f"unknown camera {name!r}; choose one of {', '.join(CAMERAS)}")
