"""The in-memory exposure every stage passes on: image, variance and mask planes, and metadata."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

__all__ = ["NJY_AB_ZP", "Exposure", "MaskBit"]


#: AB magnitude of a 1 nJy source: ``m = NJY_AB_ZP - 2.5 log10(flux / nJy)``.
NJY_AB_ZP = 31.4


class MaskBit(enum.IntFlag):
    """Bits of the int32 mask plane."""

    SAT = 1
    """The raw count reached the amplifier's saturation (or full well)."""
    NO_DATA = 2
    """No valid value (NaN input, non-positive flat, outside the data)."""
    BAD = 4
    """A known defect (bad column, hot pixel) from the defect list."""
    EDGE = 8
    """Within a few pixels of the CCD edge."""
    CR = 16
    """A cosmic ray, found from the two snaps and repaired."""
    INTRP = 32
    """The value was replaced (interpolated or taken from the other snap)."""
    DETECTED = 64
    """Part of a detected source's footprint."""
    DETECTED_NEGATIVE = 128
    """Part of a negative detection's footprint (difference images)."""
    SUSPECT = 256
    """Usable with caution (e.g. near saturation)."""


@dataclass(frozen=True)
class Exposure:
    """A calibrated CCD image with its variance and mask planes.

    Attributes
    ----------
    image : numpy.ndarray
        float32 ``(ny, nx)``, electrons (flat-fielded).
    variance : numpy.ndarray
        float32, electrons², same shape.
    mask : numpy.ndarray
        int32 bit mask (:class:`MaskBit`), same shape.
    metadata : dict
        Exposure facts (``exptime``, ``dark_time``, ``band``, ``detector``, ...) and stage results.
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = self.image.shape
        if self.image.ndim != 2:
            raise ValueError(f"image must be 2-D, got shape {shape}")
        for name, arr, dtype in (("image", self.image, np.float32), ("variance", self.variance, np.float32),
                                 ("mask", self.mask, np.int32)):  # fmt: skip
            if arr.shape != shape:
                raise ValueError(f"{name} has shape {arr.shape}; the image is {shape}")
            if arr.dtype != dtype:
                raise ValueError(f"{name} must be {np.dtype(dtype)}, got {arr.dtype}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape
