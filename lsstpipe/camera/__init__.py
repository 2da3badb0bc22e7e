"""The camera model: LSSTCam as built, and the scaled ``mini`` camera for tests and demos."""

from lsstpipe.camera.geometry import (
    CAMERAS,
    CCD_SLOTS,
    CORNER_RAFTS,
    E2V,
    ITL,
    PIXEL_SCALE_ARCSEC,
    PIXEL_SIZE_MM,
    SCIENCE_RAFTS,
    SEGMENT_ORDER,
    AmpInfo,
    Camera,
    Detector,
    DetectorType,
    VendorGeometry,
    get_camera,
)

__all__ = [
    "CAMERAS", "CCD_SLOTS", "CORNER_RAFTS", "E2V", "ITL", "PIXEL_SCALE_ARCSEC", "PIXEL_SIZE_MM",
    "SCIENCE_RAFTS", "SEGMENT_ORDER", "AmpInfo", "Camera", "Detector", "DetectorType",
    "VendorGeometry", "get_camera",
]  # fmt: skip
