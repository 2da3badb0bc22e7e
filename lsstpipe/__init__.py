"""lsstpipe: automated operation of an LSST-class survey data-management system on MPI."""

__version__ = "0.1.0"
