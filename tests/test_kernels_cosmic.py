"""Snap cosmic-ray kernels against the scipy.ndimage reference (tests/naive_isr.py)."""

import numpy as np
import pytest

import naive_isr
from kernels.cosmic import combine_snaps, find_snap_cosmic_rays


def _snaps(seed=0, shape=(120, 140), t0=15.0, t1=15.0, n_rays=12):
    """Two snaps of sky + stars with independent noise, and straight rays in one snap each."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    scene = np.full(shape, 100.0)  # electrons per second
    for _ in range(15):
        cx, cy, f = rng.uniform(5, shape[1] - 5), rng.uniform(5, shape[0] - 5), rng.uniform(500, 2e5)
        scene += f / (2 * np.pi * 1.5**2) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 1.5**2))
    rn2 = 30.0
    ims, variances, truth = [], [], []
    for t in (t0, t1):
        lam = scene * t
        im = rng.poisson(lam) + rng.normal(0, np.sqrt(rn2), shape)
        hit = np.zeros(shape, bool)
        for _ in range(n_rays):
            x0, y0 = rng.uniform(0, shape[1]), rng.uniform(0, shape[0])
            ang, length = rng.uniform(0, 2 * np.pi), rng.exponential(6) + 0.5
            for s in np.linspace(0, 1, int(length * 3) + 1):
                px, py = int(x0 + s * length * np.cos(ang)), int(y0 + s * length * np.sin(ang))
                if 0 <= px < shape[1] and 0 <= py < shape[0]:
                    im[py, px] += rng.uniform(400, 1200)
                    hit[py, px] = True
        ims.append(im.astype(np.float32))
        variances.append((np.maximum(im, 0) + rn2).astype(np.float32))
        truth.append(hit)
    return ims, variances, truth


@pytest.mark.parametrize("t1", [15.0, 10.0])
@pytest.mark.parametrize("dilate", [0, 1, 2])
def test_find_matches_reference(t1, dilate):
    (a, b), (va, vb), _ = _snaps(t1=t1)
    for arr in (a, b, va, vb):
        arr.flags.writeable = False
    got = find_snap_cosmic_rays(a, va, b, vb, 15.0, t1, dilate=dilate)
    ref = naive_isr.snap_cosmic_rays(a, va, b, vb, 15.0, t1, dilate=dilate)
    for g, r in zip(got, ref):
        assert g.dtype == bool
        np.testing.assert_array_equal(g, r)


def test_finds_the_rays_not_the_stars():
    (a, b), (va, vb), (hit0, hit1) = _snaps(seed=3)
    cr0, cr1 = find_snap_cosmic_rays(a, va, b, vb, 15.0, 15.0, dilate=0)
    assert (cr0 & hit0).sum() >= 0.95 * hit0.sum()
    assert (cr1 & hit1).sum() >= 0.95 * hit1.sum()
    assert (cr0 & ~hit0).sum() <= 0.1 * hit0.sum()  # growth into the halo of a track only
    # No rays: essentially nothing is flagged (a 5σ seed on 17k pixels of each sign).
    (a, b), (va, vb), _ = _snaps(seed=4, n_rays=0)
    cr0, cr1 = find_snap_cosmic_rays(a, va, b, vb, 15.0, 15.0)
    assert cr0.sum() + cr1.sum() <= 9


def test_nan_inf_and_masked_pixels_are_ignored():
    (a, b), (va, vb), _ = _snaps(seed=5)
    a[10:12, :] = np.nan
    b[20, :] = np.inf
    va[30, 5] = -1.0
    m0 = np.zeros(a.shape, np.int32)
    m1 = np.zeros(a.shape, np.int32)
    a[40, 40] += 1e5
    m0[40, 40] = 2
    got = find_snap_cosmic_rays(a, va, b, vb, mask0=m0, mask1=m1, bad_bits=2, dilate=0)
    ref = naive_isr.snap_cosmic_rays(a, va, b, vb, 1.0, 1.0, mask0=m0, mask1=m1, bad_bits=2, dilate=0)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)
    assert not got[0][10:12].any() and not got[0][40, 40]


def test_edge_cases_and_validation():
    one = np.ones((1, 1), np.float32)
    cr0, cr1 = find_snap_cosmic_rays(one * 1e4, one, one, one)
    assert cr0.all() and not cr1.any()
    with pytest.raises(ValueError, match="shape"):
        find_snap_cosmic_rays(one, one, np.ones((2, 2)), one)
    with pytest.raises(ValueError, match="exposure times"):
        find_snap_cosmic_rays(one, one, one, one, 0.0, 1.0)
    with pytest.raises(ValueError, match="grow_nsigma"):
        find_snap_cosmic_rays(one, one, one, one, nsigma=2.0, grow_nsigma=3.0)
    with pytest.raises(ValueError, match="integer"):
        find_snap_cosmic_rays(one, one, one, one, mask0=one, mask1=one)


@pytest.mark.parametrize("t1", [15.0, 12.0])
def test_combine_matches_reference(t1):
    (a, b), (va, vb), (hit0, hit1) = _snaps(seed=6, t1=t1)
    a[3, :] = np.nan  # snap 0 has no data in a row: the combination takes snap 1 scaled
    rng = np.random.default_rng(0)
    m0 = rng.integers(0, 2, a.shape).astype(np.int32) * 4
    m1 = rng.integers(0, 2, a.shape).astype(np.int32) * 8
    cr0, cr1 = find_snap_cosmic_rays(a, va, b, vb, 15.0, t1)
    both = np.zeros(a.shape, bool)
    both[50, 50] = True
    cr0 |= both
    cr1 |= both
    for arr in (a, b, va, vb, m0, m1, cr0, cr1):
        arr.flags.writeable = False
    img, var, msk = combine_snaps(a, va, m0, b, vb, m1, cr0, cr1, 15.0, t1, cr_bit=16, intrp_bit=32)
    ref = naive_isr.combine_snaps(a, va, m0, b, vb, m1, cr0, cr1, 15.0, t1, 16, 32)
    np.testing.assert_allclose(img, ref[0], rtol=1e-6)
    np.testing.assert_allclose(var, ref[1], rtol=1e-6)
    np.testing.assert_array_equal(msk, ref[2])
    assert np.isfinite(img[3][~cr1[3]]).all()  # where snap 1 has a ray too, nothing is left
    # A ray pixel of snap 0 alone is the other snap scaled: the ray's charge is gone.
    fix = hit0 & cr0 & ~cr1 & np.isfinite(b)
    np.testing.assert_allclose(img[fix], (1 + 15.0 / t1) * b[fix], rtol=1e-5)
    assert msk[50, 50] & 16 and not msk[50, 50] & 32
