"""The simulated instrument signature of each detector: what the calibration products must recover.

Every quantity is a stable function of (simulation seed, camera, detector), so all exposures of a
repository share one instrument, and the truth written next to the raws is exactly what was applied:

* **bias**: per-amplifier level (from the camera model), a fixed column pattern (a serial-readout
  transient in the first columns plus a small fixed pattern) and a fixed row pattern (a parallel
  transient in the first rows); per exposure a slow drift of the level shared by data and serial overscan.
* **dark current**: a uniform rate, hot pixels and a hot column.
* **flat field**: vignetting as a function of focal-plane radius × a smooth per-band QE map × per-pixel
  response non-uniformity; dead (low-response) column segments are the bad columns.
* **crosstalk**: a 16×16 matrix (source × victim, HDU order) around a vendor template.
* **fringes**: a fixed interference pattern per detector, scaled per exposure with the sky in z and y.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from lsstpipe.camera import Camera, Detector

BANDS = ("u", "g", "r", "i", "z", "y")
FRINGE_BANDS = ("z", "y")


def stable_seed(*key: object) -> int:
    """A 63-bit seed from a key, independent of Python's hash randomisation."""
    text = "/".join(map(str, key)).encode()
    return (zlib.crc32(text) << 31) ^ zlib.adler32(text)


def crosstalk_template(vendor: str) -> np.ndarray:
    """Vendor-typical crosstalk coefficients (source × victim) in HDU order.

    Neighbouring amplifiers on the same serial register couple at a few 1e-4 (negative for e2v, positive
    for ITL, as measured on LSSTCam sensors), next neighbours at ~5e-5, amplifiers of the other half at
    ~1e-5.
    """
    c = np.zeros((16, 16))
    sign = -1.0 if vendor == "E2V" else 1.0
    for i in range(16):
        for j in range(16):
            if i == j:
                continue
            same_half = (i < 8) == (j < 8)
            d = abs(i - j) if same_half else 99
            if d == 1:
                c[i, j] = sign * 4.0e-4
            elif d == 2:
                c[i, j] = sign * 6.0e-5
            elif same_half:
                c[i, j] = sign * 1.5e-5 / (d - 1)
            else:
                c[i, j] = 8.0e-6
    return c


@dataclass
class DetectorSignature:
    """Instrument signature of one detector (assembled-image arrays are float32, shape ``detector.shape``)."""

    detector: Detector
    prnu: np.ndarray = field(repr=False)
    vignetting: np.ndarray = field(repr=False)
    qe_seed: int
    dark_rate: np.ndarray = field(repr=False)
    fringe_seed: int
    col_pattern: np.ndarray = field(repr=False)
    row_pattern: np.ndarray = field(repr=False)
    crosstalk: np.ndarray = field(repr=False)
    bad_columns: list = field(default_factory=list)
    hot_pixels: np.ndarray | None = field(default=None, repr=False)
    _flats: dict = field(default_factory=dict, repr=False)
    _fringe: np.ndarray | None = field(default=None, repr=False)

    def qe_map(self, band: str) -> np.ndarray:
        """Smooth relative QE in ``band`` (about 1 %, stronger in the blue)."""
        if band not in BANDS:
            raise ValueError(f"unknown band {band!r}; bands are {', '.join(BANDS)}")
        amp = dict(zip(BANDS, (0.02, 0.012, 0.008, 0.008, 0.01, 0.012)))[band]
        rng = np.random.default_rng(stable_seed(self.qe_seed, band))
        return 1.0 + _smooth_field(rng, self.detector.shape, amp, 3.0)

    def flat(self, band: str) -> np.ndarray:
        """Total relative response in ``band`` (vignetting × QE map × PRNU × bad columns); the last two are cached."""
        if band not in self._flats:
            if len(self._flats) >= 2:
                self._flats.pop(next(iter(self._flats)))
            f = self.prnu * self.vignetting
            f *= self.qe_map(band)
            self._flats[band] = f
        return self._flats[band]

    @property
    def fringe(self) -> np.ndarray:
        """Unit-rms fringe pattern (applied in the fringe bands, scaled with the sky)."""
        if self._fringe is None:
            rng = np.random.default_rng(self.fringe_seed)
            self._fringe = _fringe_pattern(rng, self.detector.shape, (40.0, 300.0))
        return self._fringe

    @property
    def bias_levels(self) -> np.ndarray:
        return np.array([a.bias_level for a in self.detector.amps])

    @property
    def gains(self) -> np.ndarray:
        return np.array([a.gain for a in self.detector.amps])

    @property
    def read_noise_adu(self) -> np.ndarray:
        return np.array([a.read_noise / a.gain for a in self.detector.amps])


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], amplitude: float, scale: float) -> np.ndarray:
    """A smooth random field: a few low-order separable cosines, ``amplitude`` rms-ish, float32."""
    ny, nx = shape
    y = np.arange(ny, dtype=np.float32)[:, None] / max(ny, 1)
    x = np.arange(nx, dtype=np.float32)[None, :] / max(nx, 1)
    out = np.zeros(shape, np.float32)
    for _ in range(4):
        kx, ky = rng.uniform(0.2, scale, 2)
        px, py = rng.uniform(0, 2 * np.pi, 2)
        a = rng.normal(0, amplitude / 2)
        out += np.float32(a) * (np.cos(2 * np.pi * kx * x + px) * np.cos(2 * np.pi * ky * y + py)).astype(np.float32)
    return out


def _fringe_pattern(rng: np.random.Generator, shape: tuple[int, int], pixel_period: tuple[float, float]) -> np.ndarray:
    """Interference fringes: a sum of plane waves with periods of tens to hundreds of pixels, unit rms."""
    ny, nx = shape
    y = np.arange(ny, dtype=np.float64)[:, None]
    x = np.arange(nx, dtype=np.float64)[None, :]
    out = np.zeros(shape, np.float32)
    for _ in range(5):
        period = rng.uniform(*pixel_period)
        theta = rng.uniform(0, np.pi)
        kx, ky = 2 * np.pi * np.cos(theta) / period, 2 * np.pi * np.sin(theta) / period
        phase = rng.uniform(0, 2 * np.pi)
        a = rng.uniform(0.5, 1.0)
        # cos(kx x + ky y + p) = cos(kx x + p) cos(ky y) - sin(kx x + p) sin(ky y), as outer products.
        out += (a * np.cos(ky * y)).astype(np.float32) * np.cos(kx * x + phase).astype(np.float32)
        out -= (a * np.sin(ky * y)).astype(np.float32) * np.sin(kx * x + phase).astype(np.float32)
    out /= np.float32(out.std() or 1.0)
    return out


def make_signature(camera: Camera, detector: Detector, seed: int) -> DetectorSignature:
    """Build the instrument signature of ``detector`` for simulation seed ``seed``."""
    rng = np.random.default_rng(stable_seed("instrument", seed, camera.name, detector.name))
    ny, nx = detector.shape
    v = detector.vendor
    # Per-pixel response non-uniformity, ~0.7 % rms.
    prnu = (1.0 + 0.007 * rng.standard_normal((ny, nx), dtype=np.float32)).astype(np.float32)
    # Bad columns: dead segments with 2-20 % response.
    bad_columns = []
    for _ in range(int(rng.integers(1, 4))):
        x = int(rng.integers(0, nx))
        y0 = int(rng.integers(0, ny // 2))
        y1 = int(rng.integers(ny // 2, ny + 1))
        prnu[y0:y1, x] *= np.float32(rng.uniform(0.02, 0.2))
        bad_columns.append({"x": x, "y0": y0, "y1": y1, "kind": "dead"})
    # Vignetting from the focal-plane radius of each pixel (coarse in y then x to save time).
    xs = np.arange(nx, dtype=np.float64)
    ys = np.arange(ny, dtype=np.float64)
    fx, _ = detector.pixel_to_focal_plane(xs, np.zeros(nx))
    _, fy = detector.pixel_to_focal_plane(np.zeros(ny), ys)
    r_mm = np.hypot(fx[None, :], fy[:, None]) / (camera.raft_pitch_mm / 127.0)  # in LSSTCam mm
    vignetting = (1.0 - 0.25 * np.clip((r_mm - 250.0) / 110.0, 0.0, None) ** 2).astype(np.float32)
    # Dark current: 0.002 e-/s/pixel, hot pixels at 0.5-30 e-/s, one warm column.
    dark_rate = np.full((ny, nx), 0.002, np.float32)
    nhot = max(1, int(ny * nx * 5e-5))
    hy, hx = rng.integers(0, ny, nhot), rng.integers(0, nx, nhot)
    dark_rate[hy, hx] = rng.uniform(0.5, 30.0, nhot).astype(np.float32)
    wx = int(rng.integers(0, nx))
    dark_rate[:, wx] += np.float32(0.3)
    bad_columns.append({"x": wx, "y0": 0, "y1": ny, "kind": "warm"})
    # Bias structure: serial transient in the first columns, fixed pattern, parallel transient.
    rh, rw = v.raw_height, v.raw_width
    cols = np.arange(rw)
    col_pattern = np.empty((16, rw))
    row_pattern = np.empty((16, rh))
    for a in range(16):
        col_pattern[a] = rng.uniform(3, 12) * np.exp(-cols / rng.uniform(3, 10)) + rng.normal(0, 0.6, rw)
        row_pattern[a] = rng.uniform(1, 5) * np.exp(-np.arange(rh) / rng.uniform(5, 30))
    xt = crosstalk_template(v.name) * (1.0 + 0.1 * rng.standard_normal((16, 16)))
    np.fill_diagonal(xt, 0.0)
    return DetectorSignature(
        detector=detector, prnu=prnu, vignetting=vignetting, qe_seed=int(rng.integers(2**62)),
        dark_rate=dark_rate, fringe_seed=int(rng.integers(2**62)), col_pattern=col_pattern, row_pattern=row_pattern, crosstalk=xt,
        bad_columns=bad_columns, hot_pixels=np.stack([hx, hy], axis=1),
    )  # fmt: skip
