"""Scene pieces: the PSF model across the field, trails, wavefront-sensor donuts."""

import numpy as np
import pytest

from lsstpipe.camera import get_camera
from lsstpipe.sim.scene import DONUT_OBSCURATION, PsfModel, Sources, donut_template, mm_scale, render_sources


def test_psf_model_follows_the_seeing_and_grows_to_the_edge():
    cam = get_camera("lsstcam")
    psf = PsfModel(0.8, 0.2, mm_scale(cam))
    fwhm, e1, e2, beta = psf.at(np.array([0.0, 300.0]), np.array([0.0, 0.0]))
    assert fwhm[0] == pytest.approx(4.0)
    assert fwhm[1] > fwhm[0] * 1.03
    assert abs(e1[1]) > abs(e1[0]) and np.all(beta == 3.5)
    mini = PsfModel(0.8, 0.2, mm_scale(get_camera("mini")))
    assert mini.at(300.0 / 8, 0.0)[0] == pytest.approx(fwhm[1])


def _one(x, y, x_end, y_end, flux):
    a = lambda v: np.array([v], dtype=float)  # noqa: E731
    return Sources(
        id=np.array([1]), kind=np.array(["sso"], object), ra=a(0), dec=a(0), x=a(x), y=a(y), x_end=a(x_end),
        y_end=a(y_end), mag=a(20), flux_e=a(flux), fwhm=a(3.0), e1=a(0), e2=a(0),
    )  # fmt: skip


def test_trails_spread_the_flux_along_the_motion():
    img = np.zeros((100, 200), np.float32)
    src = _one(50.0, 50.0, 130.0, 50.0, 1e5)
    render_sources(img, src)
    assert img.sum() == pytest.approx(1e5, rel=1e-4)
    row = img[50]
    assert row[60:120].min() > 0.5 * row[60:120].max()  # flat along the trail
    assert src.trail_length[0] == pytest.approx(80.0) and src.trail_angle[0] == pytest.approx(0.0)


def test_donut_is_an_annulus_with_unit_sum():
    t = donut_template(61.0, 4.0, 0.0, 0.0)
    c = t.shape[0] // 2
    assert t.sum() == pytest.approx(1.0)
    ring = t[c, c + int(61 * (1 + DONUT_OBSCURATION) / 2)]
    assert t[c, c] < 0.02 * ring and t[c, c + 75] < 0.02 * ring
    img = np.zeros((300, 300), np.float32)
    render_sources(img, _one(150.0, 150.0, 150.0, 150.0, 5e4), donut_radius=61.0)
    assert img.sum() == pytest.approx(5e4, rel=1e-4)
