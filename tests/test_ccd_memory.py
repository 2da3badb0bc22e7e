"""Peak memory of the per-CCD chain, in units of one image plane (issue 7: a worker's 2 GiB).

The chain's peak is measured with :mod:`tracemalloc` (numpy reports its data buffers to it), as the growth
over what the process held just before :func:`process_ccd` — the inputs included — divided by the bytes of
one float32 plane of the CCD. That counts every array the stages allocate (the ones numba allocates inside
compiled code, and scipy's per-row FFT scratch, are not seen: none is image-sized), independently of the
allocator, of the machine and of the other tests' memory. The chain runs once untraced first (JIT
compilation).

Full size, for scale (``benchmarks/ccd_chain.py``, RSS): one float32 plane is 66 MB, the results (calexp,
difference, template) 7 planes, raws + calibrations + templates ~9 planes. The mini CCD stands in for a
mid-size one (the cameras are LSSTCam and mini); its fixed-size buffers are counted against it.
"""

import gc
import tracemalloc

import numpy as np
import pytest

from lsstpipe.pipelines.ap import CcdProcessingError, process_ccd
from lsstpipe.pipelines.inputs import load_ccd_inputs
from lsstpipe.repo import Repository
from lsstpipe.sim.simulate import SimulationRequest, run_simulation

DET = "R11_S12"
#: Peak growth allowed, in float32 image planes, when the caller keeps its inputs: the chain's own
#: temporaries and results (7 result planes + the differencing's working set). Measured 12.3 on the mini
#: CCD (of which ~2.3 are fixed-size star-finder buffers, nothing at full size); the zero-filled science
#: copies the differencing made before issue 7's work were 2 planes more, alive at this peak.
HELD_PLANES = 13.5
#: ... and when it hands them over (raws, calibrations and template patches are freed on the way): the
#: peak is then the ISR of the second snap. Measured 4.7.
RELEASED_PLANES = 6.0


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem") / "repo"
    run_simulation(SimulationRequest(repo=str(root), detectors=(DET,), n_visits=1, bands="r", cds=False, seed=11,
                                     progress=False))  # fmt: skip
    repo = Repository(root)
    visit = int(repo.exposures("OBJECT")[0]["visit"])

    def load():
        return load_ccd_inputs(repo, visit, DET, calibs="truth")

    warm = process_ccd(load())  # JIT compilation, untraced
    return load, warm


def _peak_planes(load, release: bool):
    """(result, inputs, peak growth over the pre-chain state in image planes)."""
    gc.collect()
    tracemalloc.start()  # before loading: the inputs' arrays are traced, so freeing them counts
    try:
        inputs = load()
        plane = 4 * int(np.prod(inputs.detector.shape))
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = process_ccd(inputs, release_inputs=release)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, inputs, (peak - base) / plane


def test_peak_memory_is_a_bounded_multiple_of_the_image(mini):
    load, warm = mini
    held, held_inputs, held_planes = _peak_planes(load, release=False)
    released, released_inputs, released_planes = _peak_planes(load, release=True)
    assert held_planes <= HELD_PLANES, f"the chain grows by {held_planes:.1f} planes with the inputs held"
    assert released_planes <= RELEASED_PLANES, f"the chain grows by {released_planes:.1f} planes, inputs released"
    # handing the pixels over frees raws (~2.3 planes), calibrations (3) and template patches (~2.5)
    assert released_planes <= held_planes - 5.0, (held_planes, released_planes)
    assert held_inputs.raw_snaps and held_inputs.calibs is not None and held_inputs.template_patches
    assert released_inputs.raw_snaps == () and released_inputs.calibs is None
    assert released_inputs.template_patches == ()


def test_released_inputs_give_the_same_result_and_cannot_be_reused(mini):
    load, warm = mini
    inputs = load()
    result = process_ccd(inputs, release_inputs=True)
    assert result.flags == warm.flags
    np.testing.assert_array_equal(result.dia_sources, warm.dia_sources)
    np.testing.assert_array_equal(result.difference.image, warm.difference.image)
    np.testing.assert_array_equal(result.difference.variance, warm.difference.variance)
    np.testing.assert_array_equal(result.calexp.image, warm.calexp.image)
    with pytest.raises(CcdProcessingError, match="release_inputs=True"):
        process_ccd(inputs)


def test_the_differencing_never_reads_missing_science_pixels(mini):
    """With both PSFs known the template is convolved and the calexp is read in place (no zero-filled
    copies): its NaN and NO_DATA pixels must not reach the difference, which must equal the one of a
    calexp zero-filled there beforehand (what the copies held)."""
    from lsstpipe.pipelines.difference import difference_exposure
    from lsstpipe.pipelines.exposure import Exposure, MaskBit

    load, warm = mini
    patches = list(load().template_patches)
    calexp, char = warm.calexp, warm.characterization
    image, variance, mask = calexp.image.copy(), calexp.variance.copy(), calexp.mask.copy()
    nd = int(MaskBit.NO_DATA)
    image[100:130, 200:260] = np.nan
    mask[100:130, 200:260] |= nd
    image[300, 50] = np.inf  # missing without the NO_DATA bit
    variance[310, 400] = np.nan
    mask[50:60, 450:470] |= nd  # NO_DATA over finite values
    missing = ((mask & nd) != 0) | ~np.isfinite(image) | ~np.isfinite(variance)
    filled = Exposure(np.where(missing, 0, image).astype(np.float32), np.where(missing, 0, variance).astype(np.float32),
                      mask | np.where(missing, np.int32(nd), np.int32(0)), calexp.metadata)  # fmt: skip
    fwhm = float(warm.difference.kernel_info["psf_fwhm_science"])
    inputs = (image.copy(), variance.copy())
    a = difference_exposure(Exposure(image, variance, mask, calexp.metadata), patches, char.wcs, char.zero_point, fwhm)
    b = difference_exposure(filled, patches, char.wcs, char.zero_point, fwhm)
    assert a.kernel_info["matched_side"] == "template"
    np.testing.assert_array_equal(image, inputs[0])  # the calexp is read, never written
    np.testing.assert_array_equal(variance, inputs[1])
    for name in ("image", "variance", "mask", "template"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert np.isnan(a.image[missing]).all() and np.isfinite(a.image[(a.mask & nd) == 0]).all()


def test_prepare_pair_without_science_copies_gives_the_same_template_side_and_codes():
    from kernels import diffim

    rng = np.random.default_rng(5)
    shape = (40, 50)
    s, sv, t, tv = (rng.normal(1, 0.2, shape).astype(np.float32) for _ in range(4))
    sm, tm = (rng.choice([0, 0, 0, 2, 4], shape).astype(np.int32) for _ in range(2))
    s[3, 4], sv[5, 6], t[7, 8] = np.nan, np.inf, np.nan
    ins = [a.copy() for a in (s, sv, sm, t, tv, tm)]
    full = diffim.prepare_pair(*ins, 2, keep_bits=~4, flag_bits=4)
    lean = diffim.prepare_pair(*ins, 2, keep_bits=~4, flag_bits=4, copy_science=False)
    assert lean[0] is None and lean[1] is None
    for a, b in zip(full[2:], lean[2:]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(ins, (s, sv, sm, t, tv, tm)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="copy_science=False"):
        diffim.prepare_pair(*ins, 2, out=(np.empty(shape, np.float32), None, None, None), copy_science=False)
