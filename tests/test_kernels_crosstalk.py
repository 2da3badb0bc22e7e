"""Crosstalk kernels against the einsum reference; correction undoes the simulation to second order."""

import numpy as np
import pytest

import naive
from kernels.crosstalk import apply_crosstalk, remove_crosstalk
from lsstpipe.sim.instrument import crosstalk_template


@pytest.fixture
def segs():
    rng = np.random.default_rng(2)
    s = rng.uniform(0, 5e4, (16, 30, 20)).astype(np.float64)
    s[3, 10:12, 5:8] = 1.5e5  # a saturated star on amp 3
    s.flags.writeable = False
    return s


@pytest.mark.parametrize("vendor", ["ITL", "E2V"])
def test_apply_matches_reference(segs, vendor):
    m = crosstalk_template(vendor)
    m.flags.writeable = False
    out = apply_crosstalk(segs, m)
    np.testing.assert_allclose(out, naive.apply_crosstalk(segs, m), rtol=1e-12)


def test_remove_inverts_apply_to_second_order(segs):
    m = crosstalk_template("E2V")
    pedestal = np.full(16, 2.0e4)
    with_bias = apply_crosstalk(segs, m) + pedestal[:, None, None]
    corrected = remove_crosstalk(with_bias, m, pedestal=pedestal) - pedestal[:, None, None]
    resid = np.abs(corrected - segs).max()
    assert resid < 1.5e5 * (np.abs(m).sum(axis=0).max()) ** 2 * 4
    assert resid < 0.5


def test_integer_input_and_diagonal_ignored(segs):
    m = crosstalk_template("ITL") + np.eye(16) * 0.5
    ints = segs.astype(np.int32)
    out = remove_crosstalk(ints, m)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ints - (naive.apply_crosstalk(ints, m) - ints), rtol=1e-5, atol=0.05)


def test_bad_matrix_rejected(segs):
    with pytest.raises(ValueError, match="16×16"):
        apply_crosstalk(segs, np.zeros((8, 8)))
    bad = crosstalk_template("ITL")
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        apply_crosstalk(segs, bad)
    with pytest.raises(ValueError, match="3-D float"):
        apply_crosstalk(segs[0], crosstalk_template("ITL"))
