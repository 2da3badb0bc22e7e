"""The simulated camera DAQ: after each exposure's readout it writes every raft into the CDS buffer, raw
and crosstalk-corrected (the camera removes crosstalk to first order with its crosstalk matrix, using
each amplifier's serial-overscan level as the pedestal that does not couple).

Raft images carry, per detector, the primary header of the raw file; the telemetry records the
exposure (time, band, pointing) as the DAQ would attach it.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from astropy.io import fits

from kernels.crosstalk import remove_crosstalk
from lsstpipe.camera import Camera, Detector
from lsstpipe.cds import CDSBuffer, ImageKind
from lsstpipe.io.raw import read_raw
from lsstpipe.repo import Repository
from lsstpipe.sim.exposure import ExposureSpec

#: Primary keywords passed through to the CDS header of each detector.
_HEADER_KEYS = ("OBSID", "DAYOBS", "SEQNUM", "IMGTYPE", "EXPTIME", "DARKTIME", "MJD-OBS", "FILTER", "RA", "DEC",
                "ROTPA", "RAFTBAY", "CCDSLOT", "CCD_MANU", "LSST_NUM", "INSTRUME", "VISIT", "SNAP")  # fmt: skip


def daq_crosstalk_correct(segments: np.ndarray, detector: Detector, matrix: np.ndarray) -> np.ndarray:
    """What the DAQ delivers as the crosstalk-corrected image: int32 segments, first-order corrected."""
    sl_rows, sl_cols = detector.amps[0].raw_serial_overscan
    pedestal = np.median(segments[:, sl_rows, sl_cols].reshape(16, -1), axis=1)
    corrected = remove_crosstalk(segments.astype(np.float32), matrix, pedestal=pedestal)
    return np.rint(corrected).astype(np.int32)


def read_crosstalk_truth(repo: Repository, detector: Detector) -> np.ndarray:
    with fits.open(repo.instrument_truth_path(detector.name)) as hdul:
        return np.array(hdul["CROSSTALK"].data, dtype=np.float64)


def fill_cds(repo: Repository, camera: Camera, detectors, specs: list[ExposureSpec], log,
             part: tuple[int, int] = (0, 1)) -> int:  # fmt: skip
    """Write every raft image of every exposure, in time order, into ``repo.cds_root``; returns the count.

    With ``part = (rank, size)`` this rank writes the rafts ``k % size == rank`` (rafts are separate files,
    so ranks never write the same one)."""
    # The simulator fills a whole buffer in bulk: no fsync per file (a crash just means simulating again).
    buffer = CDSBuffer(repo.cds_root, compression="blosc-lz4", fsync=False)
    by_raft: dict[str, list[Detector]] = defaultdict(list)
    for d in detectors:
        by_raft[d.raft].append(d)
    rank, size = part
    by_raft = {r: dets for k, (r, dets) in enumerate(sorted(by_raft.items())) if k % size == rank}
    detectors = [d for dets in by_raft.values() for d in dets]
    matrices = {d.name: read_crosstalk_truth(repo, d) for d in detectors}
    n = 0
    for spec in sorted(specs, key=lambda s: (s.mjd, s.obsid)):
        readout_mjd = spec.mjd + (spec.exptime + 2.0) / 86400.0
        for raft, dets in by_raft.items():
            raw, corrected, headers = {}, {}, {}
            for d in dets:
                r = read_raw(repo.raw_path(spec.day_obs, spec.obsid, d.name))
                segs = r.stack()
                raw[d.name] = segs
                corrected[d.name] = daq_crosstalk_correct(segs, d, matrices[d.name])
                headers[d.name] = {k: r.header[k] for k in _HEADER_KEYS if k in r.header}
            telemetry = {
                "obsid": spec.obsid, "imgtype": spec.imgtype, "band": spec.band, "exptime": spec.exptime,
                "mjd_obs": spec.mjd, "ra": spec.ra, "dec": spec.dec, "rot_sky_pos": spec.rot_sky_pos,
                "airmass": spec.airmass, "visit": spec.visit, "snap": spec.snap,
            }  # fmt: skip
            for kind, ccds in ((ImageKind.CROSSTALK_CORRECTED, corrected), (ImageKind.RAW, raw)):
                if buffer.available(spec.obsid, raft, kind):
                    continue
                buffer.write(spec.obsid, raft, kind, ccds, headers, telemetry, mjd=readout_mjd)
                n += 1
    log(f"CDS buffer: {n} raft images written by this rank")
    return n
