"""File formats: raw LSSTCam exposures (:mod:`lsstpipe.io.raw`)."""

from lsstpipe.io.raw import REQUIRED_KEYWORDS, RawExposure, RawFormatError, parse_section, read_raw, write_raw

__all__ = ["REQUIRED_KEYWORDS", "RawExposure", "RawFormatError", "parse_section", "read_raw", "write_raw"]
