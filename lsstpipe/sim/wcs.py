"""The sky ↔ pixel model of the simulated camera, with optical distortion, and its fitted TAN-SIP WCS.

The exact model maps an assembled pixel (0-based pixel centres, ``x`` along columns) to the sky by

1. pixel → focal-plane mm (:meth:`Detector.pixel_to_focal_plane`);
2. focal-plane radius r → field angle θ, inverting the radial distortion r(θ) (:class:`OpticalDistortion`);
3. focal-plane direction → sky direction by the rotator angle ``rot_sky_pos``;
4. a point at angular distance θ from the boresight in that direction → (ra, dec), exactly on the sphere.

Orientation convention
----------------------
``rot_sky_pos`` is the position angle on the sky (from north through east) of the focal-plane +y axis.
The parity is the standard one of a sky image: at ``rot_sky_pos`` = 0, +y points north and +x west, so
north-up images have east to the left (the CD matrix has a negative determinant). At 90°, +y points
east and +x north. The same convention is used both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from kernels.astrometry import angular_separation_mas, gnomonic, poly_design, poly_terms, tan_sip_header
from lsstpipe.camera import Camera, Detector
from lsstpipe.camera.geometry import FOCAL_LENGTH_MM

_MAS_PER_RAD = np.rad2deg(1.0) * 3600e3


@dataclass(frozen=True)
class OpticalDistortion:
    """Radial distortion of the focal plane: ``r(θ) = f (θ + k3 θ³ + k5 θ⁵)`` (θ in radians, r in mm).

    The defaults are illustrative LSST-like values, not the as-built optical model: with ``k3 = 3``,
    ``k5 = -150`` the image of a point at the field edge (θ = 1.75°) sits 0.24 % further from the
    centre than in a distortion-free (gnomonic, ``r = f tan θ``) camera, i.e. about 15″ (75 pixels);
    0.32 % at the corner of the science array (2.05°). The plate scale at the centre is exactly ``f``.

    Attributes
    ----------
    focal_length_mm : float
        Effective focal length ``f``.
    k3, k5 : float
        Coefficients of θ³ and θ⁵.
    max_field_deg : float
        Largest field angle the model is used for; r(θ) must increase monotonically up to it.
    """

    focal_length_mm: float = FOCAL_LENGTH_MM
    k3: float = 3.0
    k5: float = -150.0
    max_field_deg: float = 3.0

    def __post_init__(self) -> None:
        if not self.focal_length_mm > 0.0:
            raise ValueError(f"focal_length_mm must be positive, not {self.focal_length_mm}")
        theta = np.linspace(0.0, np.deg2rad(self.max_field_deg), 1001)
        if np.any(self._dr_dtheta(theta) <= 0.0):
            raise ValueError(
                f"distortion k3={self.k3}, k5={self.k5} makes r(θ) non-monotonic within "
                f"{self.max_field_deg} deg of the axis; use smaller coefficients"
            )

    def _dr_dtheta(self, theta: np.ndarray) -> np.ndarray:
        t2 = theta * theta
        return self.focal_length_mm * (1.0 + 3.0 * self.k3 * t2 + 5.0 * self.k5 * t2 * t2)

    def radius_mm(self, field_angle_rad: np.ndarray | float) -> np.ndarray:
        """Focal-plane radius (mm) of field angle θ (radians)."""
        t = np.asarray(field_angle_rad, dtype=float)
        t2 = t * t
        return self.focal_length_mm * t * (1.0 + self.k3 * t2 + self.k5 * t2 * t2)

    def field_angle_rad(self, radius_mm: np.ndarray | float) -> np.ndarray:
        """Field angle θ (radians) of focal-plane radius r (mm): the inverse of :meth:`radius_mm`, by Newton."""
        r = np.asarray(radius_mm, dtype=float)
        theta = r / self.focal_length_mm
        for _ in range(50):
            step = (self.radius_mm(theta) - r) / self._dr_dtheta(theta)
            theta = theta - step
            if np.all(np.abs(step) <= 1e-16 + 1e-15 * np.abs(theta)):
                break
        return theta

    def fraction(self, field_angle_rad: np.ndarray | float) -> np.ndarray:
        """Radial distortion relative to a gnomonic camera, ``r(θ) / (f tan θ) − 1``."""
        t = np.maximum(np.asarray(field_angle_rad, dtype=float), 1e-12)
        return self.radius_mm(t) / (self.focal_length_mm * np.tan(t)) - 1.0


#: The default LSST-like distortion.
LSST_DISTORTION = OpticalDistortion()


def _unit(ra_deg, dec_deg) -> np.ndarray:
    ra, dec = np.deg2rad(ra_deg), np.deg2rad(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def _local_frame(ra_deg: float, dec_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors (towards the point, east, north) at (ra, dec); well defined at the poles too."""
    ra, dec = np.deg2rad(ra_deg), np.deg2rad(dec_deg)
    p = np.array([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])
    east = np.array([-np.sin(ra), np.cos(ra), 0.0])
    north = np.array([-np.sin(dec) * np.cos(ra), -np.sin(dec) * np.sin(ra), np.cos(dec)])
    return p, east, north


def _to_radec(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ra = np.rad2deg(np.arctan2(v[1], v[0])) % 360.0
    dec = np.rad2deg(np.arctan2(v[2], np.hypot(v[0], v[1])))
    return ra, dec


@dataclass(frozen=True)
class FocalPlaneSkyModel:
    """The exact focal plane ↔ sky mapping of one pointing.

    Attributes
    ----------
    ra, dec : float
        Boresight (deg).
    rot_sky_pos : float
        Position angle of the focal-plane +y axis, deg from north through east (module docstring).
    distortion : OpticalDistortion
        Radial distortion, which also carries the focal length.
    """

    ra: float
    dec: float
    rot_sky_pos: float
    distortion: OpticalDistortion = LSST_DISTORTION

    def __post_init__(self) -> None:
        if not -90.0 <= self.dec <= 90.0:
            raise ValueError(f"boresight dec must be within [-90, 90] deg, not {self.dec}")
        if not (np.isfinite(self.ra) and np.isfinite(self.rot_sky_pos)):
            raise ValueError(f"boresight ra {self.ra} and rot_sky_pos {self.rot_sky_pos} must be finite")

    @classmethod
    def from_camera(
        cls,
        camera: Camera,
        ra: float,
        dec: float,
        rot_sky_pos: float,
        distortion: OpticalDistortion | None = None,
    ) -> FocalPlaneSkyModel:
        """The model of ``camera`` pointed at (ra, dec); LSST-like distortion at its focal length by default."""
        if distortion is None:
            distortion = OpticalDistortion(focal_length_mm=camera.focal_length_mm)
        return cls(float(ra), float(dec), float(rot_sky_pos), distortion)

    def _rotation(self) -> tuple[float, float]:
        phi = np.deg2rad(self.rot_sky_pos)
        return float(np.cos(phi)), float(np.sin(phi))

    def focal_plane_to_sky(self, fx, fy) -> tuple[np.ndarray, np.ndarray]:
        """Focal-plane mm to (ra, dec) in degrees; ra in [0, 360)."""
        fx, fy = np.broadcast_arrays(np.asarray(fx, dtype=float), np.asarray(fy, dtype=float))
        r = np.hypot(fx, fy)
        theta = self.distortion.field_angle_rad(r)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(r > 0.0, np.sin(theta) / r, 1.0 / self.distortion.focal_length_mm)
        c, s = self._rotation()
        east = (-fx * c + fy * s) * scale
        north = (fx * s + fy * c) * scale
        p, e, n = _local_frame(self.ra, self.dec)
        v = np.multiply.outer(p, np.cos(theta)) + np.multiply.outer(e, east) + np.multiply.outer(n, north)
        return _to_radec(v)

    def sky_to_focal_plane(self, ra, dec) -> tuple[np.ndarray, np.ndarray]:
        """(ra, dec) in degrees to focal-plane mm."""
        ra, dec = np.broadcast_arrays(np.asarray(ra, dtype=float), np.asarray(dec, dtype=float))
        v = _unit(ra, dec)
        p, e, n = _local_frame(self.ra, self.dec)
        ve, vn = np.tensordot(e, v, 1), np.tensordot(n, v, 1)
        sin_theta = np.hypot(ve, vn)
        theta = np.arctan2(sin_theta, np.tensordot(p, v, 1))
        r = self.distortion.radius_mm(theta)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(sin_theta > 0.0, r / sin_theta, self.distortion.focal_length_mm)
        c, s = self._rotation()
        # The rotation with parity flip is its own inverse.
        return (-ve * c + vn * s) * scale, (ve * s + vn * c) * scale

    def for_detector(self, detector: Detector) -> DetectorSkyModel:
        """The model of one detector at this pointing."""
        return DetectorSkyModel(self, detector)


@dataclass(frozen=True)
class DetectorSkyModel:
    """The exact pixel ↔ sky mapping of one detector at one pointing, and its TAN-SIP approximation.

    Pixels are 0-based centres of the assembled image, ``x`` along columns.
    """

    pointing: FocalPlaneSkyModel
    detector: Detector = field(repr=False)

    @classmethod
    def build(
        cls, camera: Camera, detector: Detector | str | int, ra: float, dec: float, rot_sky_pos: float,
        distortion: OpticalDistortion | None = None,
    ) -> DetectorSkyModel:  # fmt: skip
        """The model of ``camera``'s ``detector`` (object, name such as ``R22_S11``, or id) at a pointing."""
        det = camera[detector.id if isinstance(detector, Detector) else detector]
        if isinstance(detector, Detector) and det != detector:
            raise ValueError(f"detector {detector.name} is not a detector of camera {camera.name}")
        return cls(FocalPlaneSkyModel.from_camera(camera, ra, dec, rot_sky_pos, distortion), det)

    def pixel_to_sky(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Assembled pixel (x, y) to (ra, dec) in degrees."""
        return self.pointing.focal_plane_to_sky(*self.detector.pixel_to_focal_plane(x, y))

    def sky_to_pixel(self, ra, dec) -> tuple[np.ndarray, np.ndarray]:
        """(ra, dec) in degrees to assembled pixel (x, y)."""
        return self.detector.focal_plane_to_pixel(*self.pointing.sky_to_focal_plane(ra, dec))

    @property
    def center_pixel(self) -> tuple[float, float]:
        """0-based (x, y) of the detector centre, the WCS reference pixel."""
        ny, nx = self.detector.shape
        return (nx - 1) / 2.0, (ny - 1) / 2.0

    def wcs_header(self, order: int = 4, inverse_order: int | None = None, grid: int = 33) -> fits.Header:
        """FITS cards of a TAN-SIP WCS fitted by least squares to the exact model.

        Parameters
        ----------
        order : int
            Order of the forward SIP polynomials A, B (2 to 9).
        inverse_order : int, optional
            Order of the inverse polynomials AP, BP; ``order + 1`` by default.
        grid : int
            The fit uses ``grid × grid`` points spanning the detector, edges included.

        Returns
        -------
        astropy.io.fits.Header
            ``CTYPE = RA---TAN-SIP / DEC--TAN-SIP``, ``CRPIX`` at the detector centre, ``CRVAL`` its exact
            sky position, the ``CD`` matrix, and the SIP ``A``, ``B``, ``AP``, ``BP`` coefficients.
            With the defaults it matches the exact model to well under 1 mas for a full LSSTCam CCD.
        """
        inverse_order = order + 1 if inverse_order is None else inverse_order
        if not (2 <= order <= 9 and 1 <= inverse_order <= 9):
            raise ValueError(f"SIP orders must be within 2..9 (forward) and 1..9 (inverse); got {order}, "
                             f"{inverse_order}")  # fmt: skip
        if grid < max(order, inverse_order) + 2:
            raise ValueError(f"grid {grid} is too coarse for order {max(order, inverse_order)}; use more points")
        ny, nx = self.detector.shape
        x0, y0 = self.center_pixel
        gx, gy = np.meshgrid(np.linspace(-0.5, nx - 0.5, grid), np.linspace(-0.5, ny - 0.5, grid))
        u, v = gx.ravel() - x0, gy.ravel() - y0
        crval = [float(c) for c in self.pixel_to_sky(x0, y0)]
        xi, eta = gnomonic(*self.pixel_to_sky(gx.ravel(), gy.ravel()), *crval)
        # Forward: (xi, eta) = CD · (u + A(u, v), v + B(u, v)), fitted as full polynomials without a constant.
        s = max(nx, ny) / 2.0
        terms = poly_terms(1, order)
        design = poly_design(u / s, v / s, terms)
        cx = np.linalg.lstsq(design, xi, rcond=None)[0] / _scales(s, terms)
        cy = np.linalg.lstsq(design, eta, rcond=None)[0] / _scales(s, terms)
        return tan_sip_header(cx, cy, terms, (x0, y0), crval, inverse_order, (u, v), s)

    def fit_tan_sip(self, order: int = 4, inverse_order: int | None = None, grid: int = 33) -> WCS:
        """The TAN-SIP :class:`astropy.wcs.WCS` of :meth:`wcs_header`; use pixel origin 0 for our pixels."""
        return WCS(self.wcs_header(order, inverse_order, grid))

    def max_wcs_error_mas(self, wcs: WCS, n: int = 41) -> tuple[float, float]:
        """Largest angular error (mas) of ``wcs`` against the exact model on an ``n × n`` detector grid.

        Returns the forward error (pixel → sky) and the inverse error (sky → pixel, converted to mas at
        the local pixel scale) of the non-iterative SIP inverse polynomials.
        """
        ny, nx = self.detector.shape
        gx, gy = np.meshgrid(np.linspace(-0.5, nx - 0.5, n), np.linspace(-0.5, ny - 0.5, n))
        ra, dec = self.pixel_to_sky(gx.ravel(), gy.ravel())
        wra, wdec = wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
        forward = angular_separation_mas(ra, dec, wra, wdec)
        px, py = sip_world2pix(wcs, ra, dec)
        scale_mas = self.detector.vendor_pixel_mm / self.pointing.distortion.focal_length_mm * _MAS_PER_RAD
        inverse = np.hypot(px - gx.ravel(), py - gy.ravel()) * scale_mas
        return float(forward.max()), float(inverse.max())


def sip_world2pix(wcs: WCS, ra, dec) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel (x, y) of (ra, dec) by the TAN projection and the SIP inverse polynomials AP, BP alone.

    Unlike :meth:`astropy.wcs.WCS.all_world2pix` this does not iterate on the forward polynomials, so it
    measures the accuracy of AP and BP themselves.
    """
    fx, fy = wcs.wcs_world2pix(ra, dec, 0)
    c1, c2 = wcs.wcs.crpix - 1.0
    u, v = np.asarray(fx) - c1, np.asarray(fy) - c2
    if wcs.sip is None or wcs.sip.ap is None:
        return u + c1, v + c2
    du, dv = np.zeros_like(u), np.zeros_like(v)
    for (p, q), a in np.ndenumerate(wcs.sip.ap):
        du = du + a * u**p * v**q if a else du
    for (p, q), b in np.ndenumerate(wcs.sip.bp):
        dv = dv + b * u**p * v**q if b else dv
    return u + du + c1, v + dv + c2


def _scales(s: float, terms: list[tuple[int, int]]) -> np.ndarray:
    return np.array([s ** (p + q) for p, q in terms])
