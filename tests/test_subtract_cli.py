"""``lsstpipe subtract`` on FITS files: integer and float images, with and without variance HDUs, compressed,
with backgrounds; its output and its errors."""

import argparse
import math
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from scipy.special import erf

from lsstpipe import cli, subtract_cli


def parse(argv):
    parser = argparse.ArgumentParser(prog="lsstpipe")
    sub = parser.add_subparsers(dest="command")
    subtract_cli.add_parser(sub)
    return parser.parse_args(["subtract", *argv])


def gaussian_scene(shape, xs, ys, fluxes, fwhm):
    s = fwhm / 2.3548200450309493 * math.sqrt(2)
    X, Y = np.arange(shape[1]), np.arange(shape[0])
    img = np.zeros(shape)
    for x, y, f in zip(xs, ys, fluxes):
        px = 0.5 * (erf((X + 0.5 - x) / s) - erf((X - 0.5 - x) / s))
        py = 0.5 * (erf((Y + 0.5 - y) / s) - erf((Y - 0.5 - y) / s))
        img += f * py[:, None] * px[None, :]
    return img


@pytest.fixture(scope="module")
def images():
    """A science image (FWHM 4.5, sky 300 + gradient, a 3e4 transient at (150.3, 120.6)) and a deeper template
    (FWHM 3.2, sky 100, scaled by 1.1) of the same 60 stars."""
    rng = np.random.default_rng(11)
    shape = (260, 300)
    n = 60
    xs, ys = rng.uniform(5, shape[1] - 5, n), rng.uniform(5, shape[0] - 5, n)
    fl = 10 ** rng.uniform(3.3, 5.3, n)
    sci = gaussian_scene(shape, np.r_[xs, 150.3], np.r_[ys, 120.6], np.r_[fl, 3e4], 4.5)
    sky = 300.0 + 0.05 * np.arange(shape[1])[None, :]
    sci_var = sci + sky
    sci_img = sci + sky + rng.standard_normal(shape) * np.sqrt(sci_var)
    tmp = 1.1 * gaussian_scene(shape, xs, ys, fl, 3.2)
    tmp_var = np.full(shape, 25.0)
    tmp_img = tmp + 100.0 + rng.standard_normal(shape) * 5.0
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, -5.0]
    w.wcs.cdelt = [-5e-5, 5e-5]
    return sci_img, sci_var, tmp_img, tmp_var, w


def aperture_flux(d, x, y, r=10.0):
    """Aperture sum minus the median of an annulus (15-25 px) times the aperture's area."""
    yy, xx = np.mgrid[0 : d.shape[0], 0 : d.shape[1]]
    rr = np.hypot(xx - x, yy - y)
    ap, ann = rr <= r, (rr >= 15) & (rr <= 25) & np.isfinite(d)
    return float(d[ap].sum() - np.median(d[ann]) * ap.sum())


def write(path, hdus):
    fits.HDUList([fits.PrimaryHDU(), *hdus]).writeto(path, overwrite=True)
    return str(path)


def test_float_images_with_variance_hdus(tmp_path, images, capsys):
    sci, sv, tmp, tv, w = images
    s = write(tmp_path / "s.fits", [fits.ImageHDU(sci.astype(np.float32), header=w.to_header(), name="SCI"),
                                    fits.ImageHDU(sv.astype(np.float32), name="VAR")])  # fmt: skip
    t = write(tmp_path / "t.fits", [fits.ImageHDU(tmp), fits.ImageHDU(tv)])
    out = tmp_path / "d.fits"
    assert subtract_cli.run(parse([s, t, "--out", str(out), "--hdu", "SCI", "--variance-hdu", "VAR",
                                   "--template-hdu", "1", "--template-variance-hdu", "2"])) == 0  # fmt: skip
    assert "kernel" in capsys.readouterr().out
    with fits.open(out) as h:
        assert [x.name for x in h] == ["PRIMARY", "IMAGE", "VARIANCE", "MASK", "TEMPLATE"]
        hdr = h[0].header
        assert hdr["KMETHOD"] == "alard-lupton" and hdr["KSIDE"] == "template" and hdr["NSTAMPS"] >= 5
        assert hdr["FSCALE"] == pytest.approx(1 / 1.1, rel=0.02)  # the photometric scale, fitted (after backgrounds)
        assert WCS(h["IMAGE"].header).wcs.crval[0] == pytest.approx(10.0)
        d, v, m = h["IMAGE"].data, h["VARIANCE"].data, h["MASK"].data
    ok = m == 0
    yy, xx = np.mgrid[0 : d.shape[0], 0 : d.shape[1]]
    assert aperture_flux(d, 150.3, 120.6) == pytest.approx(3e4, rel=0.03)
    far = ok & ~(np.hypot(xx - 150.3, yy - 120.6) <= 15)
    z = d[far] / np.sqrt(v[far])
    # the mean carries the two mesh backgrounds' bias from star light (more of it in the broader science
    # wings): ~0.07 sigma on this crowded field; the scatter is the variance plane's
    assert abs(z.std() - 1) < 0.05 and abs(z.mean()) < 0.1


def test_integer_compressed_images_without_variance(tmp_path, images):
    """Integer images (one tile-compressed), no variance HDU: the noise comes from the background rms plus the
    Poisson noise of the sources (--gain)."""
    sci, _, tmp, _, _ = images
    s = write(tmp_path / "s.fits", [fits.CompImageHDU(np.round(sci).astype(np.int32))])
    t = write(tmp_path / "t.fits", [fits.ImageHDU(np.round(tmp * 4).astype(np.int32))])
    out = tmp_path / "d.fits"
    assert subtract_cli.run(parse([s, t, "--out", str(out), "--gain", "1", "--quiet"])) == 0
    with fits.open(out) as h:
        d, v, m = h["IMAGE"].data, h["VARIANCE"].data, h["MASK"].data
        assert h[0].header["FSCALE"] == pytest.approx(1 / 4.4, rel=0.02)
    yy, xx = np.mgrid[0 : d.shape[0], 0 : d.shape[1]]
    assert aperture_flux(d, 150.3, 120.6) == pytest.approx(3e4, rel=0.05)
    far = (m == 0) & (np.hypot(xx - 150.3, yy - 120.6) > 15)
    z = d[far] / np.sqrt(v[far])
    assert abs(z.std() - 1) < 0.1


def test_console_script_and_nan_blocks(tmp_path, images):
    sci, sv, tmp, tv, _ = images
    sci = sci.copy()
    sci[:20, :40] = np.nan
    s = write(tmp_path / "s.fits", [fits.ImageHDU(sci)])
    t = write(tmp_path / "t.fits", [fits.ImageHDU(tmp)])
    out = tmp_path / "d.fits"
    r = subprocess.run([sys.executable, "-m", "lsstpipe", "subtract", s, t, "--out", str(out), "--fwhm", "4.5",
                        "--template-fwhm", "3.2"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    with fits.open(out) as h:
        m = h["MASK"].data
        assert (m[:20, :40] & 2).all() and np.isnan(h["IMAGE"].data[:20, :40]).all()
    assert cli.main(["subtract", s, t, "--out", str(out)]) == 2  # exists


def test_clear_errors(tmp_path, images, capsys):
    sci, _, tmp, _, _ = images
    s = write(tmp_path / "s.fits", [fits.ImageHDU(sci)])
    t = write(tmp_path / "t.fits", [fits.ImageHDU(tmp[:, :200])])
    with pytest.raises(ValueError, match="same pixel grid"):
        subtract_cli.run(parse([s, t, "--out", str(tmp_path / "d.fits")]))
    with pytest.raises(FileNotFoundError, match="no such file"):
        subtract_cli.run(parse([s, str(tmp_path / "missing.fits"), "--out", str(tmp_path / "d.fits")]))
    nan = write(tmp_path / "nan.fits", [fits.ImageHDU(np.full((10, 10), np.nan, np.float32))])
    with pytest.raises(ValueError, match="no finite pixel"):
        subtract_cli.run(parse([s, nan, "--out", str(tmp_path / "d.fits")]))
    with pytest.raises(ValueError, match="FITS file"):
        subtract_cli.run(parse([s, s, "--out", str(tmp_path / "d.csv")]))
    txt = tmp_path / "x.fits"
    txt.write_text("not fits")
    with pytest.raises(ValueError, match="not a readable FITS"):
        subtract_cli.run(parse([s, str(txt), "--out", str(tmp_path / "d.fits")]))
    with pytest.raises(ValueError, match="template variance"):
        subtract_cli.run(parse([s, s, "--template-variance-hdu", "7", "--out", str(tmp_path / "d.fits")]))
    assert cli.main(["subtract", s, t, "--out", str(tmp_path / "d.fits")]) == 2
    assert "same pixel grid" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:File may have been truncated")
def test_truncated_image_and_unusable_output_are_clear_errors(tmp_path, images, capsys):
    sci, _, tmp, _, _ = images
    s = write(tmp_path / "s.fits", [fits.ImageHDU(sci.astype(np.float32))])
    t = write(tmp_path / "t.fits", [fits.ImageHDU(tmp.astype(np.float32))])
    cut = tmp_path / "cut.fits"
    cut.write_bytes((tmp_path / "t.fits").read_bytes()[:20000])
    with pytest.raises(ValueError) as info:
        subtract_cli.run(parse([s, str(cut), "--out", str(tmp_path / "d.fits")]))
    assert str(cut) in str(info.value) and "template" in str(info.value) and "truncated or corrupt" in str(info.value)
    (tmp_path / "dir.fits").mkdir()
    assert cli.main(["subtract", s, t, "--out", str(tmp_path / "dir.fits"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "is a directory; give a file name" in err and "Traceback" not in err
    assert not (tmp_path / "d.fits").exists()
