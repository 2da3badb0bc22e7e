"""Template coadds for image differencing, on a tract/patch sky map.

Visits are grouped into fields; each field gets a *tract*: a gnomonic (TAN) projection centred on the
field's first pointing, north up, east left, at the camera's pixel scale. A tract is cut into square
*patches* of ``patch_size`` pixels, each stored with ``overlap`` extra pixels on every side; patch
``"i,j"`` (``i`` along x, ``j`` along y, the tract centre in patch ``"50,50"``) covers tract pixels
``[(i-50) P - P/2 - overlap, (i-50) P + P/2 + overlap)`` in x, likewise in y.

A template is the static sky as a deep coadd would show it: stars at their mean flux (variables
included, transients and asteroids absent), a round Moffat PSF of 0.75″ FWHM, background subtracted,
in nJy per pixel, with Gaussian noise for a coadd ``COADD_DEPTH_GAIN`` magnitudes deeper than a single
visit. Files: ``templates/{band}/{tract}/{i},{j}.fits`` with HDUs IMAGE, VARIANCE (nJy²) and MASK
(int32, 0 = good), each carrying the patch's WCS.
"""

from __future__ import annotations

import os

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from kernels.astrometry import angular_separation_deg
from kernels.render import add_moffat_sources
from lsstpipe.camera import Camera
from lsstpipe.pipelines.exposure import NJY_AB_ZP
from lsstpipe.repo import Repository
from lsstpipe.sim import sky as skymod
from lsstpipe.sim.instrument import stable_seed
from lsstpipe.sim.wcs import DetectorSkyModel, FocalPlaneSkyModel

TEMPLATE_FWHM_ARCSEC = 0.75
TEMPLATE_BETA = 3.5
#: Typical single-visit 5σ depths (Ivezić et al. 2019) and the gain of a ~20-visit coadd.
SINGLE_VISIT_M5 = {"u": 23.7, "g": 24.97, "r": 24.52, "i": 24.13, "z": 23.56, "y": 22.55}
COADD_DEPTH_GAIN = 1.6
PATCH_CENTER = 50
#: Visits within this distance of a tract's centre use that tract.
TRACT_RADIUS_DEG = 1.5


def patch_geometry(camera: Camera) -> tuple[int, int]:
    """(patch_size, overlap) in pixels: a patch is a little larger than one CCD."""
    n = max(max(d.shape) for d in camera.detectors)
    size = int(np.ceil(n * 1.1 / 100.0) * 100)
    return size, max(size // 20, 16)


def tract_wcs(ra: float, dec: float, scale_arcsec: float) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [1.0, 1.0]  # tract pixel (0, 0), 0-based, is the tract centre
    s = scale_arcsec / 3600.0
    w.wcs.cd = [[-s, 0.0], [0.0, s]]
    return w


def patch_wcs(tract: WCS, i: int, j: int, size: int, overlap: int) -> WCS:
    """WCS of patch (i, j): its 0-based pixel (0, 0) is tract pixel (x0, y0)."""
    x0, y0 = patch_origin(i, j, size, overlap)
    w = tract.deepcopy()
    w.wcs.crpix = [1.0 - x0, 1.0 - y0]
    return w


def patch_origin(i: int, j: int, size: int, overlap: int) -> tuple[int, int]:
    return ((i - PATCH_CENTER) * size - size // 2 - overlap, (j - PATCH_CENTER) * size - size // 2 - overlap)


def group_fields(visits, radius_deg: float) -> list[tuple[float, float]]:
    """Field centres: each visit joins the first field within ``radius_deg`` of its pointing."""
    fields: list[tuple[float, float]] = []
    for v in visits:
        for f in fields:
            if _sep(v.ra, v.dec, *f) < radius_deg:
                break
        else:
            fields.append((round(v.ra, 4), round(v.dec, 4)))
    return fields


def _sep(ra1, dec1, ra2, dec2) -> float:
    return float(angular_separation_deg(ra1, dec1, ra2, dec2))


def needed_patches(camera, detectors, visits, fields, size, overlap) -> dict:
    """{(band, tract): set of (i, j)} covering every simulated detector of every visit, with a margin."""
    need: dict = {}
    for v in visits:
        tract = min(range(len(fields)), key=lambda k: _sep(v.ra, v.dec, *fields[k]))
        tw = tract_wcs(*fields[tract], camera.pixel_scale_arcsec)
        pointing = FocalPlaneSkyModel.from_camera(camera, v.ra, v.dec, v.rot_sky_pos)
        for d in detectors:
            ny, nx = d.shape
            m = 20
            xs = np.array([-m, nx / 2, nx + m, nx + m, nx + m, nx / 2, -m, -m], float)
            ys = np.array([-m, -m, -m, ny / 2, ny + m, ny + m, ny + m, ny / 2], float)
            ra, dec = DetectorSkyModel(pointing, d).pixel_to_sky(xs, ys)
            tx, ty = tw.all_world2pix(ra, dec, 0)
            i0, i1 = (int(np.floor((t + size / 2) / size)) + PATCH_CENTER for t in (tx.min(), tx.max()))
            j0, j1 = (int(np.floor((t + size / 2) / size)) + PATCH_CENTER for t in (ty.min(), ty.max()))
            cells = need.setdefault((v.band, tract), set())
            cells.update((i, j) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1))
    return need


def render_patch(tract: WCS, i: int, j: int, size: int, overlap: int, stars: skymod.StaticCatalog, band: str,
                 scale_arcsec: float, seed: int, tract_id: int) -> tuple[np.ndarray, np.ndarray, WCS]:  # fmt: skip
    """(image nJy, variance nJy², wcs) of one template patch."""
    n = size + 2 * overlap
    w = patch_wcs(tract, i, j, size, overlap)
    x, y = w.all_world2pix(stars.ra, stars.dec, 0)
    fwhm = TEMPLATE_FWHM_ARCSEC / scale_arcsec
    keep = (x > -40) & (x < n + 40) & (y > -40) & (y < n + 40)
    image = np.zeros((n, n), np.float32)
    flux = skymod.mag_to_njy(stars.mags[band][keep])
    add_moffat_sources(image, x[keep], y[keep], flux, fwhm, TEMPLATE_BETA, 0.0, 0.0)
    m5 = SINGLE_VISIT_M5[band] + COADD_DEPTH_GAIN
    a_eff = 2.266 * fwhm**2
    sigma = float(skymod.mag_to_njy(m5) / (5.0 * np.sqrt(a_eff)))
    rng = np.random.Generator(np.random.PCG64(stable_seed("template", seed, band, tract_id, i, j)))
    image += np.float32(sigma) * rng.standard_normal((n, n), dtype=np.float32)
    variance = np.full((n, n), sigma**2, np.float32)
    return image, variance, w


def make_templates(repo: Repository, camera: Camera, detectors, visits, stars, seed: int, log,
                   part: tuple[int, int] = (0, 1)) -> int:  # fmt: skip
    """Render and register every template patch the simulated visits need (this rank's share, patch ``k``
    going to rank ``k % size`` of ``part = (rank, size)``); returns how many this rank made."""
    size, overlap = patch_geometry(camera)
    fields = group_fields(visits, TRACT_RADIUS_DEG)
    need = needed_patches(camera, detectors, visits, fields, size, overlap)
    count = 0
    jobs = [(band, tract, i, j) for (band, tract), cells in sorted(need.items()) for i, j in sorted(cells)]
    rank, nranks = part
    for band, tract, i, j in jobs[rank::nranks]:
        tw = tract_wcs(*fields[tract], camera.pixel_scale_arcsec)
        patch = f"{i},{j}"
        path = repo.template_path(band, tract, patch)
        image, variance, w = render_patch(tw, i, j, size, overlap, stars, band, camera.pixel_scale_arcsec, seed,
                                          tract)  # fmt: skip
        write_template(path, image, variance, w, band, tract, patch, camera.pixel_scale_arcsec)
        ra, dec = w.all_pix2world((image.shape[1] - 1) / 2, (image.shape[0] - 1) / 2, 0)
        repo.register_template(band, tract, patch, path, float(ra), float(dec), image.shape[0])
        count += 1
    log(f"templates: {len(jobs)} patches in {len(fields)} tracts")
    return count


def write_template(path, image, variance, wcs: WCS, band, tract, patch, scale_arcsec) -> None:
    hdr = wcs.to_header()
    primary = fits.PrimaryHDU()
    primary.header.update({
        "BAND": band, "TRACT": tract, "PATCH": patch, "BUNIT": "nJy", "PSFFWHM": TEMPLATE_FWHM_ARCSEC,
        "PSFBETA": TEMPLATE_BETA, "MAGZERO": NJY_AB_ZP, "PIXSCALE": scale_arcsec,
        "ORIGIN": "lsstpipe simulator",
    })  # fmt: skip
    hdus = [primary]
    hdus.append(fits.ImageHDU(image, header=hdr, name="IMAGE"))
    hdus.append(fits.ImageHDU(variance, header=hdr, name="VARIANCE"))
    # The mask plane is integer: RICE tiles store it losslessly in almost nothing (astropy's GZIP tiles
    # would embed the write time and break byte-reproducibility).
    mask = np.zeros(image.shape, np.int32)
    # 256² tiles: a CCD reads the part of a patch it covers without decompressing the whole plane (one tile
    # of the whole 5k² patch cost a full-size CCD ~0.1 s per patch, ~1 s of its ~9 patches)
    tile = (min(256, mask.shape[0]), min(256, mask.shape[1]))
    hdus.append(fits.CompImageHDU(mask, header=hdr, name="MASK", compression_type="RICE_1", tile_shape=tile))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fits.HDUList(hdus).writeto(tmp, overwrite=True)
    os.replace(tmp, path)
