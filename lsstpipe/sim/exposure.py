"""Render one detector's exposure into raw segments, the way the camera would read it out.

Electrons: sources (before the flat) + sky with gradient (+ fringes in z, y), times the flat field, plus
dark current, Poisson-sampled; then cosmic rays, then full-well saturation with bleed trails. Readout:
per amplifier, electrons → ADU through the gain, crosstalk between the 16 simultaneously read
amplifiers, bias level, bias structure and read noise, an 18-bit ADC.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kernels.crosstalk import apply_crosstalk
from kernels.render import add_tracks, bleed_saturation, compose_exposure, digitize_segments
from lsstpipe.camera import Camera, Detector, DetectorType
from lsstpipe.isr.assembly import disassemble_ccd
from lsstpipe.sim.instrument import FRINGE_BANDS, DetectorSignature, stable_seed
from lsstpipe.sim.scene import DONUT_RADIUS_PIX, Sources, mm_scale, render_sources

#: Cosmic-ray rate at Cerro Pachón altitude, per cm² per second (muons and secondaries).
COSMIC_RATE_CM2_S = 0.6
SKY_GRID_STEP = 64


@dataclass(frozen=True)
class ExposureSpec:
    """One exposure of the camera (a snap of a visit, or a calibration frame)."""

    obsid: str
    day_obs: int
    seq_num: int
    imgtype: str  # OBJECT, BIAS, DARK, FLAT, SPOT
    band: str
    mjd: float
    exptime: float
    dark_time: float
    ra: float = float("nan")
    dec: float = float("nan")
    rot_sky_pos: float = float("nan")
    airmass: float = float("nan")
    seeing: float = float("nan")
    sky_mag: float = float("nan")
    visit: int = -1
    snap: int = 0
    flat_level_e: float = 0.0
    sky_gradient: tuple[float, float] = (0.0, 0.0)
    fringe_amp: float = 0.0
    spot_pattern: int = -1  # SPOT: which amplifiers the projector lights (lsstpipe.sim.spots)


@dataclass
class RenderedExposure:
    segments: np.ndarray
    sources: Sources | None
    cosmics: dict = field(default_factory=dict)
    n_saturated: int = 0
    sky_e_per_pixel: float = 0.0


def sky_grid(camera: Camera, detector: Detector, spec: ExposureSpec, sky_rate: float) -> np.ndarray:
    """Sky electrons per second per pixel on a coarse grid: the level with a linear gradient across the
    focal plane (moonlight, twilight), ``sky_gradient`` being the fractional change per LSSTCam 100 mm."""
    ny, nx = detector.shape
    gy, gx = ny // SKY_GRID_STEP + 2, nx // SKY_GRID_STEP + 2
    xs = np.arange(gx) * SKY_GRID_STEP
    ys = np.arange(gy) * SKY_GRID_STEP
    fx, _ = detector.pixel_to_focal_plane(xs, np.zeros(gx))
    _, fy = detector.pixel_to_focal_plane(np.zeros(gy), ys)
    s = mm_scale(camera) / 100.0
    gxf, gyf = spec.sky_gradient
    return sky_rate * (1.0 + gxf * s * fx[None, :] + gyf * s * fy[:, None])


def cosmic_rays(detector: Detector, dark_time: float, rng: np.random.Generator) -> dict:
    """Straight tracks: a Poisson number for the detector area and time, lengths up to ~40 pixels
    (inclined muons through the 100 µm-thick silicon), 80 e-/µm ± spread, some low-energy worms."""
    ny, nx = detector.shape
    area_cm2 = ny * nx * (detector.vendor_pixel_mm / 10.0) ** 2
    n = int(rng.poisson(COSMIC_RATE_CM2_S * area_cm2 * dark_time))
    x0 = rng.uniform(0, nx, n)
    y0 = rng.uniform(0, ny, n)
    length = rng.exponential(8.0, n).clip(0.5, 60.0)
    angle = rng.uniform(0, 2 * np.pi, n)
    charge = length * rng.uniform(400.0, 1200.0, n) + rng.uniform(300.0, 1500.0, n)
    return {
        "x0": x0,
        "y0": y0,
        "x1": x0 + length * np.cos(angle),
        "y1": y0 + length * np.sin(angle),
        "charge_e": charge,
    }


def render_exposure(camera: Camera, sig: DetectorSignature, spec: ExposureSpec, sources: Sources | None,
                    sky_rate: float, seed: int, noise: bool = True, cosmics: bool = True) -> RenderedExposure:  # fmt: skip
    """Raw int32 segments (16, rows, cols) of ``sig.detector`` for ``spec``.

    ``sky_rate`` is the sky in electrons per second per pixel (0 for dark and bias frames); a FLAT
    exposure is uniform illumination of ``spec.flat_level_e`` electrons before the flat field.
    ``noise=False`` gives the expectation values (no photon noise, read noise, cosmic rays): the noiseless
    image used to check photometry. A SPOT exposure's ``sources`` are the spot projector's, in detected
    electrons (no flat field) and in focus on every detector (no wavefront-sensor donuts).
    """
    det = sig.detector
    ny, nx = det.shape
    key = stable_seed("exposure", seed, camera.name, det.name, spec.obsid)
    rng = np.random.default_rng(key)
    signal = np.zeros((ny, nx), np.float32)
    if sources is not None:
        on_sky = spec.imgtype == "OBJECT"
        donut = DONUT_RADIUS_PIX if det.type is DetectorType.WAVEFRONT and on_sky else 0.0
        render_sources(signal, sources, donut_radius=donut)
    if spec.imgtype == "FLAT":
        signal += np.float32(spec.flat_level_e)
    band = spec.band if spec.band in ("u", "g", "r", "i", "z", "y") else "r"
    lit = spec.imgtype in ("OBJECT", "FLAT")
    flat = sig.flat(band) if lit else np.ones((ny, nx), np.float32)
    grid = sky_grid(camera, det, spec, sky_rate if spec.imgtype == "OBJECT" else 0.0)
    fringe = sig.fringe if (spec.imgtype == "OBJECT" and band in FRINGE_BANDS and spec.fringe_amp) else None
    electrons = compose_exposure(
        signal, flat, sig.dark_rate, grid, SKY_GRID_STEP, spec.exptime, spec.dark_time, fringe=fringe,
        fringe_amp=spec.fringe_amp, seed=int(rng.integers(2**62)), noise=noise,
    )  # fmt: skip
    del signal
    tracks = {}
    if cosmics and noise and spec.dark_time > 0:
        tracks = cosmic_rays(det, spec.dark_time, rng)
        add_tracks(electrons, tracks["x0"], tracks["y0"], tracks["x1"], tracks["y1"], tracks["charge_e"])
    full_well = det.vendor.full_well_e
    mask = bleed_saturation(electrons, full_well)
    segs = disassemble_ccd(electrons, det)
    del electrons
    segs = segs.astype(np.float32, copy=False)
    segs /= sig.gains.astype(np.float32)[:, None, None]
    segs = apply_crosstalk(segs, sig.crosstalk)
    rh = det.vendor.raw_height
    drift = rng.normal(0.0, 2.0, 16)[:, None] + 0.3 * np.sin(
        2 * np.pi * np.arange(rh)[None, :] / rng.uniform(300, 3000) + rng.uniform(0, 2 * np.pi)
    )
    row_offsets = sig.row_pattern + (drift if noise else 0.0)
    read_noise = sig.read_noise_adu if noise else np.zeros(16)
    raw = digitize_segments(segs, sig.bias_levels, row_offsets, sig.col_pattern, read_noise,
                            seed=int(rng.integers(2**62)))  # fmt: skip
    return RenderedExposure(segments=raw, sources=sources, cosmics=tracks, n_saturated=int(mask.sum()),
                            sky_e_per_pixel=float(sky_rate * spec.exptime))  # fmt: skip


def raw_header(camera: Camera, spec: ExposureSpec) -> dict:
    """Primary-header keywords of an exposure (the writer adds the detector's own)."""
    return {
        "OBSID": spec.obsid, "DAYOBS": str(spec.day_obs), "SEQNUM": spec.seq_num, "IMGTYPE": spec.imgtype,
        "EXPTIME": float(spec.exptime), "DARKTIME": float(spec.dark_time), "MJD-OBS": float(spec.mjd),
        "MJD-BEG": float(spec.mjd), "MJD-END": float(spec.mjd + spec.exptime / 86400.0),
        "FILTER": spec.band if spec.band else "NONE", "RA": _f(spec.ra), "DEC": _f(spec.dec),
        "ROTPA": _f(spec.rot_sky_pos), "AMSTART": _f(spec.airmass), "SEEING": _f(spec.seeing),
        "TIMESYS": "TAI", "TELESCOP": "Simonyi Survey Telescope",
        "INSTRUME": "LSSTCam" if camera.name == "lsstcam" else "LSSTCam-mini",
        "VISIT": int(spec.visit), "SNAP": int(spec.snap), "ORIGIN": "lsstpipe simulator",
    }  # fmt: skip


def _f(v: float) -> float:
    if not np.isfinite(v):
        raise ValueError(f"exposure header value {v} is not finite; give calibration frames a pointing too")
    return float(v)
