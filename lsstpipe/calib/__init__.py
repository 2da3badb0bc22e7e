"""Calibration Products Production: master calibrations of every CCD (:mod:`lsstpipe.calib.masters`), the MPI
runtime that makes and certifies them (:mod:`lsstpipe.calib.cpp`) and the ISR-side lookup of certified
masters (:mod:`lsstpipe.calib.lookup`)."""

from lsstpipe.calib.masters import (
    CalibFrame,
    FrameStore,
    Master,
    MasterConfig,
    TooFewFrames,
    defect_boxes,
    make_bias,
    make_dark,
    make_defects,
    make_flat,
    make_fringe,
    read_master,
    write_master,
)

__all__ = ["CalibFrame", "FrameStore", "Master", "MasterConfig", "TooFewFrames", "defect_boxes", "make_bias",
           "make_dark", "make_defects", "make_flat", "make_fringe", "read_master", "write_master"]  # fmt: skip
