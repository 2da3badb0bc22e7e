"""Crosstalk pooling over MPI gives the same bits for any number of ranks.

Run with ``mpiexec -n K python -m pytest --with-mpi -m mpi tests/test_xtalk_mpi.py`` (K = 1, 2, 4); every
rank compares the pooled matrices with a serial pooling of all the estimates, so identical results at
K = 1, 2 and 4 follow. Without ``--with-mpi`` pytest-mpi skips these tests.
"""

import numpy as np
import pytest

from lsstpipe.calib.crosstalk import CrosstalkEstimate, pool_crosstalk
from lsstpipe.sim.instrument import crosstalk_template


def _estimates():
    """13 CCD estimates (9 ITL, 4 E2V) with weights over four decades, so summation order shows in the bits."""
    rng = np.random.default_rng(21)
    out = []
    for k in range(13):
        vendor = "ITL" if k < 9 else "E2V"
        w = rng.uniform(1e6, 1e10, (16, 16)) * 10.0 ** rng.integers(0, 4, (16, 16))
        w[rng.random((16, 16)) < 0.05] = 0.0  # some unmeasured pairs
        np.fill_diagonal(w, 0.0)
        c = np.where(w > 0, crosstalk_template(vendor) * (1 + 0.1 * rng.standard_normal((16, 16))), 0.0)
        out.append((vendor, CrosstalkEstimate(coeffs=c, weights=w, n_sources=int(rng.integers(1, 40)))))
    return out


@pytest.mark.mpi(min_size=1)
def test_pooled_matrices_are_bit_identical_for_any_number_of_ranks():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    everything = _estimates()
    mine = [e for k, e in enumerate(everything) if k % comm.size == comm.rank][::-1]  # any local order
    pooled = pool_crosstalk(comm, mine)
    serial = pool_crosstalk(None, everything)
    assert sorted(pooled) == sorted(serial) == ["E2V", "ITL"]
    for vendor in serial:
        assert pooled[vendor].tobytes() == serial[vendor].tobytes(), vendor
    # Every rank holds the same result.
    digests = comm.allgather(b"".join(pooled[v].tobytes() for v in sorted(pooled)))
    assert all(d == digests[0] for d in digests)


@pytest.mark.mpi(min_size=1)
def test_ranks_without_estimates_still_take_part():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    everything = _estimates()[:2]
    pooled = pool_crosstalk(comm, everything if comm.rank == comm.size - 1 else [])
    assert pooled["ITL"].tobytes() == pool_crosstalk(None, everything)["ITL"].tobytes()


@pytest.mark.mpi(min_size=1)
def test_bad_input_on_one_rank_raises_on_every_rank():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    est = _estimates()[0][1]
    local = [("ITL", est)] if comm.rank != comm.size - 1 else [("ITL", "not an estimate")]
    with pytest.raises(ValueError, match=f"rank {comm.size - 1}"):
        pool_crosstalk(comm, local)
    comm.Barrier()  # no rank is left waiting in a collective
