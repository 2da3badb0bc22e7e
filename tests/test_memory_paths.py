"""The memory-saving paths of the chain give what the plain paths give (in-place, blocked, out= variants)."""

import numpy as np
import scipy.fft

from kernels import diffim
from lsstpipe.pipelines.exposure import Exposure, MaskBit
from lsstpipe.pipelines.isr import combine_snaps


def test_rfft2_padded_equals_scipy():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(301, 277)).astype(np.float32)
    for fshape in ((320, 288), (301, 277), (640, 300)):
        want = scipy.fft.rfft2(img, s=fshape)
        got = diffim.rfft2_padded(img, fshape)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-3 * np.abs(want).max() * 1e-3)


def test_multiply_spectrum_equals_the_whole_plane_product():
    rng = np.random.default_rng(2)
    fshape = (96, 80)
    hat = scipy.fft.rfft2(rng.normal(size=fshape)).astype(np.complex64)
    kernel = rng.normal(size=(11, 11))
    want = hat * diffim.kernel_spectrum(kernel, fshape)
    out = hat.copy()
    diffim.multiply_spectrum(out, kernel, fshape, out, rows=17)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_decorrelation_filter_from_the_kernel_or_its_spectrum():
    rng = np.random.default_rng(3)
    fshape = (64, 72)
    kernel = np.exp(-0.5 * (np.add.outer(np.arange(-7, 8) ** 2, np.arange(-7, 8) ** 2)) / 4.0)
    kernel /= kernel.sum()
    power = (rng.uniform(0.5, 1, fshape[1] // 2 + 1), rng.uniform(0.5, 1, fshape[0]))
    for warped in (True, False):
        a = diffim.decorrelation_filter(kernel, fshape, 2.0, 3.0, 0.9, power, warped)
        b = diffim.decorrelation_filter(diffim.kernel_spectrum(kernel, fshape), fshape, 2.0, 3.0, 0.9, power, warped)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-4)
        np.testing.assert_allclose(a[1:], b[1:], rtol=1e-4)


def test_zero_missing_is_the_in_place_fill_missing():
    rng = np.random.default_rng(4)
    img = rng.normal(size=(50, 60)).astype(np.float32)
    var = np.ones_like(img)
    mask = np.zeros(img.shape, np.int32)
    img[3, 4] = np.nan
    mask[10:12, 20:25] = int(MaskBit.NO_DATA)
    want, n_want = diffim.fill_missing(img, mask | np.where(~np.isfinite(img), int(MaskBit.NO_DATA), 0))
    n = diffim.zero_missing(img, var, mask)
    assert n == n_want == 11
    np.testing.assert_array_equal(img, want)
    assert (mask[3, 4] & int(MaskBit.NO_DATA)) and var[3, 4] == 0


def test_combine_snaps_in_place_equals_the_copy():
    shape = (80, 90)

    def snap(seed):
        r = np.random.default_rng(seed)
        img = (100 + r.normal(0, 10, shape)).astype(np.float32)
        img[r.integers(0, 80), r.integers(0, 90)] += 5000  # a cosmic ray
        return Exposure(img, np.full(shape, 100, np.float32), np.zeros(shape, np.int32),
                        {"exptime": 15.0, "dark_time": 17.0})  # fmt: skip

    a0, a1 = snap(1), snap(2)
    want = combine_snaps(a0, a1)
    got = combine_snaps(Exposure(a0.image.copy(), a0.variance.copy(), a0.mask.copy(), dict(a0.metadata)), a1,
                        overwrite=True)  # fmt: skip
    np.testing.assert_array_equal(got.image, want.image)
    np.testing.assert_array_equal(got.variance, want.variance)
    np.testing.assert_array_equal(got.mask, want.mask)


def test_return_large_frees_validates_and_applies():
    import pytest

    from lsstpipe.runtime.memory import return_large_frees

    with pytest.raises(ValueError, match="positive"):
        return_large_frees(0)
    if _glibc():
        assert return_large_frees(8 << 20)


def _glibc():
    import platform

    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _rss_mb():
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _minor_faults():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_planes_reused_recycles_within_the_block_and_gives_all_back():
    """Inside planes_reused a freed plane is the memory of the next one (its pages are not faulted in again);
    at the end the heap's free memory goes back to the system, and large allocations are mappings again."""
    import pytest

    from lsstpipe.runtime.memory import planes_reused, return_large_frees

    if not _glibc():
        pytest.skip("glibc's allocator only")
    return_large_frees()
    shape = (2048, 4096)  # 32 MB planes
    with planes_reused() as ok:
        assert ok
        before = _rss_mb()  # after the entry's trim, which gives back what the process had free (a test session)
        a = np.ones(shape, np.float32)
        del a
        f0 = _minor_faults()
        b = np.ones(shape, np.float32)  # the same memory, already resident
        refaults = _minor_faults() - f0
        held = np.ones(shape, np.float32)  # a second plane, still referenced when the block ends
        del b
        inside = _rss_mb()
    assert refaults < 100, refaults  # vs ~8192 4-kB (or 16 2-MB) pages for a fresh 32 MB plane
    after = _rss_mb()
    assert inside - before >= 60 and after - before < 48, (before, inside, after)  # b's plane returned, held kept
    np.testing.assert_array_equal(held[::512, ::512], 1)
    del held
    f0 = _minor_faults()
    c = np.ones(shape, np.float32)  # outside the block: a new mapping, faulted in
    assert _minor_faults() - f0 >= 16
    del c


def test_planes_reused_restores_the_allocator_when_the_block_raises():
    import pytest

    from lsstpipe.runtime.memory import planes_reused, return_large_frees

    if not _glibc():
        pytest.skip("glibc's allocator only")
    return_large_frees()
    with pytest.raises(RuntimeError, match="stage failed"), planes_reused():
        x = np.ones((2048, 4096), np.float32)
        raise RuntimeError("stage failed")
    del x
    before = _rss_mb()
    y = np.ones((2048, 4096), np.float32)
    del y  # a mapping again: unmapped when freed
    assert _rss_mb() - before < 8


_KEEP_SCRIPT = """
import json, resource, sys
import numpy as np
from lsstpipe.runtime.memory import keep_freed_memory, planes_reused, return_large_frees

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

return_large_frees()  # as a worker that keeps nothing starts; keep_freed_memory overrides it
ok = keep_freed_memory()
base = rss_mb()
shape = (2048, 4096)  # 32 MB planes
a = np.ones(shape, np.float32)
del a
rest = rss_mb()  # the freed plane stays resident
with planes_reused() as inside:  # a worker's chain block: nothing changes, nothing given back
    b = np.ones(shape, np.float32)
    c = np.ones(shape, np.float32)  # beyond the kept memory: the heap grows
    del b, c
after = rss_mb()
f0 = faults()
d = np.ones(shape, np.float32)
json.dump({"ok": ok, "inside": inside, "base": base, "rest": rest, "after": after, "refaults": faults() - f0},
          sys.stdout)
"""


def test_keep_freed_memory_serves_the_next_ccd_from_the_last_ones_pages():
    """After keep_freed_memory, a freed plane stays resident and is the memory of the next allocation (no page
    faulted in again), planes_reused keeps that too, and the heap only grows to the largest working set.
    In a process of its own: the setting lasts for the rest of the process."""
    import json
    import subprocess
    import sys

    import pytest

    if not _glibc():
        pytest.skip("glibc's allocator only")
    proc = subprocess.run([sys.executable, "-c", _KEEP_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["ok"] and r["inside"], r
    assert r["rest"] - r["base"] > 30, r  # the freed plane stays resident
    assert 24 < r["after"] - r["rest"] < 40, r  # the block's first plane was it; its second grew the heap, kept too
    assert r["refaults"] < 100, r  # vs ~8192 4-kB (or 16 2-MB) pages for a fresh 32 MB plane
