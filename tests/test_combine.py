"""Frame-combination kernels against their slow references (tests/naive_combine.py): random, edge-case and
NaN/inf inputs, streaming by row blocks, and the noise model of the combined value."""

import naive_combine
import numpy as np
import pytest

from kernels.combine import combine_stack, combine_streaming


def _ro(a):
    a.flags.writeable = False
    return a


def _stack(seed, n=7, ny=9, nx=11, outliers=True):
    rng = np.random.default_rng(seed)
    s = rng.normal(100.0, 5.0, (n, ny, nx))
    if outliers:
        hit = rng.random(s.shape) < 0.08
        s[hit] += rng.exponential(500.0, hit.sum())  # cosmic rays
    return s


def _check(res, ref):
    value, var, n = ref
    np.testing.assert_array_equal(res.n_used, n)
    np.testing.assert_allclose(res.image, value, rtol=2e-6, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(res.variance, var, rtol=2e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("stdfunc", ["std", "mad_std", "mad_then_std", "model"])
@pytest.mark.parametrize("nframes", [1, 2, 5, 10, 33])  # 33: past the rank sort, insertion sort
def test_clipped_mean_matches_reference(seed, stdfunc, nframes):
    s = _ro(_stack(seed, n=nframes))
    before = s.copy()
    model = (16.0, 0.1) if stdfunc == "model" else None
    res = combine_stack(s, nsigma=2.5, maxiter=5, stdfunc=stdfunc, noise_model=model)
    _check(res, naive_combine.clipped_mean(s, 2.5, 5, stdfunc, model))
    np.testing.assert_array_equal(s, before)


@pytest.mark.parametrize("seed", [0, 1])
def test_median_matches_numpy(seed):
    s = _ro(_stack(seed, n=6).astype(np.float32))
    _check(combine_stack(s, "median"), naive_combine.median(s))


@pytest.mark.parametrize("method", ["clipped_mean", "median"])
def test_nan_and_inf_are_ignored(method):
    s = _stack(5, n=8)
    rng = np.random.default_rng(9)
    s[rng.random(s.shape) < 0.2] = np.nan
    s[0, 0, 0] = np.inf
    s[1, 0, 1] = -np.inf
    s[:, 2, 3] = np.nan  # no finite value at all
    s[1:, 4, 4] = np.nan  # a single one
    _ro(s)
    res = combine_stack(s, method, stdfunc="mad_std") if method == "clipped_mean" else combine_stack(s, method)
    ref = naive_combine.clipped_mean(s, 3.0, 5, "mad_std") if method == "clipped_mean" else naive_combine.median(s)
    _check(res, ref)
    assert res.n_used[2, 3] == 0 and np.isnan(res.image[2, 3]) and np.isnan(res.variance[2, 3])
    assert res.n_used[4, 4] == 1 and res.image[4, 4] == np.float32(s[0, 4, 4]) and np.isnan(res.variance[4, 4])


def test_edge_cases_constant_and_integer_input():
    s = _ro(np.full((4, 3, 5), 7, np.int32))
    res = combine_stack(s)
    assert np.all(res.image == 7) and np.all(res.variance == 0) and np.all(res.n_used == 4)
    big = _ro(np.stack([np.full((2, 2), 1e15), np.full((2, 2), -1e15), np.zeros((2, 2))]))
    _check(combine_stack(big, stdfunc="mad_std"), naive_combine.clipped_mean(big, 3.0, 5, "mad_std"))


@pytest.mark.parametrize("block_rows", [1, 3, 64])
def test_streaming_by_row_blocks_equals_whole_stack(block_rows):
    s = _ro(_stack(3, n=6, ny=13, nx=7).astype(">f4"))  # big-endian too
    calls = []

    def read(i, r0, r1):
        calls.append((i, r0, r1))
        return s[i, r0:r1]

    res = combine_streaming(read, 6, (13, 7), block_rows=block_rows, stdfunc="mad_std")
    whole = combine_stack(s, stdfunc="mad_std")
    for a, b in zip((res.image, res.variance, res.n_used), (whole.image, whole.variance, whole.n_used)):
        np.testing.assert_array_equal(a, b)
    assert max(r1 - r0 for _, r0, r1 in calls) == min(block_rows, 13)
    par = combine_streaming(read, 6, (13, 7), block_rows=block_rows, stdfunc="mad_std", parallel=True)
    np.testing.assert_array_equal(par.image, res.image)


@pytest.mark.parametrize("n", [5, 10])
def test_noise_model_of_the_clipped_mean(n):
    """Gaussian frames with cosmic rays, clipped with the frames' noise model at 4σ: the combined value is
    unbiased within 5σ/√N, its scatter and its quoted variance are σ²/n within 10 %."""
    rng = np.random.default_rng(11)
    sigma = 4.0
    s = rng.normal(50.0, sigma, (n, 200, 200))
    hit = rng.random(s.shape) < 0.002  # rare enough that no pixel has a majority of hits
    s[hit] += 500.0 + rng.exponential(2000.0, hit.sum())
    res = combine_stack(_ro(s), nsigma=4.0, stdfunc="model", noise_model=(sigma**2, 0.0))
    npix = res.image.size
    assert abs(res.image.mean() - 50.0) < 5 * sigma / np.sqrt(n * npix)
    assert res.image.std() == pytest.approx(sigma / np.sqrt(n), rel=0.03)  # within 0.7 % here (fixed seed)
    assert np.mean(res.variance) == pytest.approx(sigma**2 / n, rel=0.03)
    assert res.n_used.max() <= n and res.n_used.mean() > 0.98 * n


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "mode"}, "unknown combination method"),
    ({"stdfunc": "iqr"}, "unknown stdfunc"),
    ({"nsigma": 0.0}, "nsigma must be"),
    ({"nsigma": float("nan")}, "nsigma must be"),
    ({"maxiter": 0}, "maxiter"),
    ({"stdfunc": "model"}, "noise_model"),
    ({"noise_model": (1.0, 0.0)}, "noise_model"),
    ({"stdfunc": "model", "noise_model": (-1.0, 0.0)}, "noise_model"),
])  # fmt: skip
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        combine_stack(np.zeros((2, 2, 2)), **kwargs)


def test_bad_shapes_and_blocks():
    with pytest.raises(ValueError, match="n_frames"):
        combine_stack(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="real numbers"):
        combine_stack(np.zeros((2, 2, 2), complex))
    with pytest.raises(ValueError, match="expected"):
        combine_streaming(lambda i, r0, r1: np.zeros((1, 3)), 2, (4, 4), block_rows=2)
    with pytest.raises(ValueError, match="at least one frame"):
        combine_streaming(lambda i, r0, r1: np.zeros((1, 3)), 0, (4, 4))


def test_benchmark_runs_and_reports_ratios(tmp_path):
    """benchmarks/combine.py end to end on a tiny stack: complete, positive numbers (no timing asserted)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "combine.py"), "--frames", "4", "--size", "32",
                    "--repeat", "1", "--json", str(out)], check=True, cwd=root, capture_output=True, timeout=300)  # fmt: skip
    res = json.loads(out.read_text())["results"]
    assert res["numpy.median"]["speed_vs_numpy_median"] == 1.0
    for r in res.values():
        assert r["mpix_per_s"] > 0 and r["seconds"] > 0 and r["speed_vs_numpy_median"] > 0
