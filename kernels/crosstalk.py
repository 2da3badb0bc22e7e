"""Inter-amplifier crosstalk, in raw segment (readout-order) coordinates.

All 16 amplifiers of a CCD are read simultaneously, so pixel ``[y, x]`` of every raw segment is digitised
at the same instant; crosstalk couples those pixels: ``victim_j += C[i, j] * source_i``. ``C`` is the
16×16 matrix of coefficients from source amplifier ``i`` (row) into victim amplifier ``j`` (column), in
HDU order, with a zero diagonal. The camera DAQ and our ISR both remove it to first order with the same
matrix.
"""

from __future__ import annotations

import numpy as np

from kernels.config import njit


@njit
def _couple(out, segs, pedestal, src, dst, coeff, sign):
    namp, h, w = segs.shape
    for a in range(namp):
        for y in range(h):
            for x in range(w):
                out[a, y, x] = segs[a, y, x]
    for k in range(src.shape[0]):
        i, j, c = src[k], dst[k], sign * coeff[k]
        p = pedestal[i]
        for y in range(h):
            for x in range(w):
                out[j, y, x] += c * (segs[i, y, x] - p)


def _pairs(matrix: np.ndarray, namp: int, threshold: float):
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (namp, namp):
        raise ValueError(f"crosstalk matrix must be {namp}×{namp} (source × victim), got {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("crosstalk matrix has NaN or infinite coefficients; re-measure or fix the matrix file")
    src, dst = np.nonzero((np.abs(matrix) > threshold) & ~np.eye(namp, dtype=bool))
    return src.astype(np.int64), dst.astype(np.int64), matrix[src, dst]


def apply_crosstalk(segs: np.ndarray, matrix: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Signal with crosstalk added: ``out[j] = segs[j] + sum_i C[i, j] * segs[i]``.

    Parameters
    ----------
    segs : numpy.ndarray
        float32/float64 (namp, h, w) bias-free signal in readout order.
    matrix : numpy.ndarray
        (namp, namp) coefficients, source × victim.
    threshold : float
        Coefficients with ``|C| <= threshold`` are skipped.

    Returns
    -------
    numpy.ndarray
        A new array of the same shape and dtype; ``segs`` is not modified.
    """
    if segs.ndim != 3 or segs.dtype.kind != "f":
        raise ValueError(f"segments must be a 3-D float array (namp, rows, cols), got {segs.dtype} {segs.shape}")
    src, dst, coeff = _pairs(matrix, segs.shape[0], threshold)
    out = np.empty_like(segs)
    _couple(out, segs, np.zeros(segs.shape[0]), src, dst, coeff, 1.0)
    return out


def remove_crosstalk(segs: np.ndarray, matrix: np.ndarray, pedestal=None, threshold: float = 0.0) -> np.ndarray:
    """First-order crosstalk correction: ``out[j] = segs[j] - sum_i C[i, j] * (segs[i] - pedestal[i])``.

    ``pedestal`` is each amplifier's bias level (the part of the signal that does not couple); zero by
    default. Returns float32 (or the float dtype given); inputs are not modified.
    """
    if segs.ndim != 3:
        raise ValueError(f"segments must be 3-D (namp, rows, cols), got shape {segs.shape}")
    work = segs if segs.dtype.kind == "f" else segs.astype(np.float32)
    ped = np.zeros(segs.shape[0]) if pedestal is None else np.asarray(pedestal, dtype=np.float64)
    if ped.shape != (segs.shape[0],):
        raise ValueError(f"pedestal must have one value per amplifier ({segs.shape[0]}), got {ped.shape}")
    src, dst, coeff = _pairs(matrix, segs.shape[0], threshold)
    out = np.empty(segs.shape, work.dtype)
    _couple(out, work, ped, src, dst, coeff, -1.0)
    return out
