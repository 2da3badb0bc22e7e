"""``lsstpipe simulate``: a deterministic night of camera data, with its calibrations, templates and truth.

Order of work: the visit sequence; the sky over the footprint (stars, variables, transients, asteroids);
the reference catalogue; then detector by detector (so one instrument signature is in memory at a
time) every exposure of the night — calibrations first (biases, darks, flats, then the crosstalk spot
exposures of :mod:`lsstpipe.sim.spots`), then the science snaps — written as raws with their truth; then
templates; then the Camera Data System buffer, raft by raft, as the camera would have filled it during
the night.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lsstpipe import __version__
from lsstpipe.camera import Camera, Detector, get_camera
from lsstpipe.io.raw import write_raw
from lsstpipe.repo import Repository, sha256_file, write_csv, write_json
from lsstpipe.runtime.idle import idle_barrier
from lsstpipe.runtime.selfcomm import SelfComm
from lsstpipe.sim import opsim, scene, spots
from lsstpipe.sim import sky as skymod
from lsstpipe.sim.exposure import ExposureSpec, raw_header, render_exposure
from lsstpipe.sim.instrument import FRINGE_BANDS, DetectorSignature, make_signature, stable_seed
from lsstpipe.sim.solar_system import Ephemerides, make_ssos, write_sso_truth
from lsstpipe.sim.truth import SOURCE_COLUMNS, SPOT_COLUMNS, source_rows, spot_rows, write_instrument_truth
from lsstpipe.sim.wcs import DetectorSkyModel, FocalPlaneSkyModel

#: Calibration sequence numbers start here so they never collide with the night's exposures.
CALIB_SEQ_START = 50001
N_BIAS, N_DARK, N_FLAT = 10, 10, 5
DARK_EXPTIME, FLAT_LEVEL_E = 300.0, 30000.0
READOUT_S = opsim.READOUT_S


@dataclass(frozen=True)
class SimulationRequest:
    """Everything ``lsstpipe simulate`` was asked for."""

    repo: str
    camera: str = "mini"
    detectors: tuple[str, ...] = ()
    #: Visits of the built-in generator (default 4); with ``n_snaps`` and ``bands``, only without ``opsim``.
    n_visits: int | None = None
    #: A Rubin survey-simulation database to take the visits from; with ``night`` (default 1) and ``max_visits``.
    opsim: str | None = None
    night: int | None = None
    max_visits: int | None = None
    #: Snaps per visit of the built-in generator (default 2).
    n_snaps: int | None = None
    calibs: bool = False
    #: Crosstalk spot exposures per CCD made with ``calibs`` (0 or a multiple of 4; see lsstpipe.sim.spots).
    n_spot: int = spots.N_SPOT_EXPOSURES
    templates: bool = True
    cds: bool = True
    seed: int = 1
    progress: bool = True
    noise: bool = True
    sky: skymod.SkyConfig | None = None
    bands: str | None = None
    compress: bool = True
    #: Replace an existing repository's simulation (its products are deleted first; see Repository.create).
    overwrite: bool = False


def default_sky(camera: Camera) -> skymod.SkyConfig:
    """Sky densities: the real sky for LSSTCam; a denser one for ``mini`` so its small CCDs hold enough
    stars for astrometry and enough transients and asteroids to score."""
    if camera.name == "mini":
        return skymod.SkyConfig(star_density=200000.0, transient_density=8000.0, sso_density=1500.0, cell_deg=0.02)
    return skymod.SkyConfig()


def check_request(request: SimulationRequest) -> None:
    """Refuse options that do not apply to the request's source of visits, and impossible counts.

    Raises
    ------
    ValueError
        ``n_visits``, ``n_snaps`` or ``bands`` with ``opsim`` (the database sets them), ``night`` or
        ``max_visits`` without it (they select visits of the database), or a count below 1.
    """
    if request.opsim:
        given = [opt for opt, value in (("--visits", request.n_visits), ("--snaps", request.n_snaps),
                                        ("--bands", request.bands)) if value is not None]  # fmt: skip
        if given:
            raise ValueError(
                f"{' and '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to the built-in visit generator, "
                "not to --opsim, whose database sets each visit's band and snaps; with --opsim choose visits "
                "with --night and --max-visits"
            )
    else:
        given = [opt for opt, value in (("--night", request.night), ("--max-visits", request.max_visits))
                 if value is not None]  # fmt: skip
        if given:
            raise ValueError(
                f"{' and '.join(given)} select{'' if len(given) > 1 else 's'} visits of an --opsim database; "
                "without --opsim the built-in generator makes --visits N visits (default 4) in --bands with --snaps"
            )
    for opt, value in (("--visits", request.n_visits), ("--night", request.night),
                       ("--max-visits", request.max_visits)):  # fmt: skip
        if value is not None and value < 1:
            raise ValueError(f"{opt} must be at least 1, not {value}")
    if request.n_snaps is not None and request.n_snaps not in (1, 2):
        raise ValueError(f"--snaps must be 1 or 2, not {request.n_snaps}")


def visits_for(request: SimulationRequest) -> list[opsim.VisitSpec]:
    """The visits a request simulates: from its opsim database, or from the built-in generator."""
    check_request(request)
    if request.opsim:
        night = request.night if request.night is not None else 1
        return opsim.read_opsim(request.opsim, night=night, visits=request.max_visits)
    n = request.n_visits if request.n_visits is not None else 4
    n_snaps = request.n_snaps if request.n_snaps is not None else 2
    return opsim.synthetic_visits(n, seed=request.seed, n_snaps=n_snaps, bands=request.bands or None)


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[simulate {time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def science_specs(visit: opsim.VisitSpec, seed: int) -> list[ExposureSpec]:
    """The snaps of a visit as exposures, with the visit's sky gradient and fringe amplitude."""
    rng = np.random.default_rng(stable_seed("visit-conditions", seed, visit.visit))
    grad = tuple(rng.normal(0.0, 0.01, 2))
    fringe_amp = float(rng.uniform(0.01, 0.03)) if visit.band in FRINGE_BANDS else 0.0
    out = []
    for i in range(visit.n_snaps):
        out.append(
            ExposureSpec(
                obsid=visit.obsid(i), day_obs=visit.day_obs, seq_num=visit.seq_num + i, imgtype="OBJECT",
                band=visit.band, mjd=visit.snap_mjd(i), exptime=visit.snap_exptime,
                dark_time=visit.snap_exptime + READOUT_S, ra=visit.ra, dec=visit.dec,
                rot_sky_pos=visit.rot_sky_pos, airmass=visit.airmass, seeing=visit.seeing_fwhm,
                sky_mag=visit.sky_mag, visit=visit.visit, snap=i, sky_gradient=grad, fringe_amp=fringe_amp,
            )
        )  # fmt: skip
    return out


def calibration_specs(visits: list[opsim.VisitSpec], n_spot: int = spots.N_SPOT_EXPOSURES) -> list[ExposureSpec]:
    """Biases, darks, flats (in each band of the night) and ``n_spot`` crosstalk spot exposures (dark dome,
    :mod:`lsstpipe.sim.spots`; exposure ``k`` has spot pattern ``k``), taken in the afternoon before the night."""
    spots.check_spot_count(n_spot)
    first = visits[0]
    bands = sorted({v.band for v in visits}, key="ugrizy".index)
    mjd = first.mjd - 0.25
    zenith_ra = float(opsim.local_sidereal_time_deg(mjd))
    seq = CALIB_SEQ_START
    specs = []

    def add(imgtype, band, exptime, level=0.0, pattern=-1):
        nonlocal seq, mjd
        specs.append(
            ExposureSpec(
                obsid=f"MC_C_{first.day_obs}_{seq:06d}", day_obs=first.day_obs, seq_num=seq, imgtype=imgtype,
                band=band, mjd=mjd, exptime=exptime, dark_time=exptime + READOUT_S, ra=zenith_ra,
                dec=opsim.RUBIN_LAT_DEG, rot_sky_pos=0.0, airmass=1.0, seeing=0.0, flat_level_e=level,
                spot_pattern=pattern,
            )
        )  # fmt: skip
        seq += 1
        mjd += (exptime + READOUT_S + 1.0) / 86400.0

    for _ in range(N_BIAS):
        add("BIAS", "NONE", 0.0)
    for _ in range(N_DARK):
        add("DARK", "NONE", DARK_EXPTIME)
    for band in bands:
        for _ in range(N_FLAT):
            add("FLAT", band, 15.0, FLAT_LEVEL_E)
    for k in range(n_spot):
        add("SPOT", "NONE", spots.SPOT_EXPTIME, pattern=k)
    return specs


def run_simulation(request: SimulationRequest, comm=None) -> dict:
    """Simulate into ``request.repo``; returns a summary (counts, paths, timings).

    With an MPI communicator, detectors (then template patches, then rafts for the CDS) are dealt
    round-robin to its ranks; every random stream is keyed by what it draws (seed, detector, exposure),
    so the repository is byte-identical for any number of ranks. Rank 0 writes the shared truth and the
    registry's exposure table; every rank must call this with the same request.
    """
    comm = comm if comm is not None else SelfComm()
    rank, size = comm.rank, comm.size
    t_start = time.perf_counter()
    log = _Progress(request.progress and rank == 0)
    spots.check_spot_count(request.n_spot)
    camera = get_camera(request.camera)
    try:
        detectors = camera.select(list(request.detectors))
    except KeyError as exc:  # an unknown detector name or id: the camera's message says which are valid
        raise ValueError(exc.args[0]) from None
    sky_cfg = request.sky or default_sky(camera)
    visits = visits_for(request)
    if not visits:
        raise ValueError("no visits to simulate; ask for --visits N ≥ 1 or a night with visits")
    repo = Repository(request.repo)
    error, removed = None, []
    if rank == 0:
        try:
            visit_rows = [asdict(v) for v in visits]
            removed = repo.create({
                "camera": camera.name, "seed": request.seed, "software": f"lsstpipe {__version__}",
                "sky": asdict(sky_cfg), "noise": request.noise,
            }, visits=visit_rows, overwrite=request.overwrite)  # fmt: skip
            write_csv(repo.visits_path, visit_rows, list(visit_rows[0]))
        except (ValueError, OSError) as exc:
            error = exc
    error = comm.bcast(error, root=0)
    if error is not None:
        raise error
    if removed:
        log(f"--overwrite: removed the previous simulation ({', '.join(removed)})")
    log(f"{len(visits)} visits, {len(detectors)} detectors of {camera.name}, seed {request.seed}, {size} rank(s)")

    # The sky over the footprint.
    radius = camera.field_radius_deg + 0.05
    cells = sorted({c for v in visits for c in skymod.cells_around(v.ra, v.dec, radius, sky_cfg)})
    stars = skymod.stars_in_cells(cells, request.seed, sky_cfg)
    mjds = (min(v.mjd for v in visits), max(v.mjd for v in visits))
    transients = skymod.transients_in_cells(cells, request.seed, sky_cfg, mjds)
    ssos = make_ssos(visits, camera, sky_cfg, request.seed)
    if rank == 0:
        write_reference_catalog(repo, stars)
        write_transient_truth(repo, transients)
        write_sso_truth(repo.root / "truth" / "ssos.csv", ssos)
    log(f"sky: {len(stars)} stars, {len(transients)} transients, {len(ssos)} solar system objects")

    calibs = calibration_specs(visits, request.n_spot) if request.calibs else []
    exposures = calibs + [s for v in visits for s in science_specs(v, request.seed)]
    science = [s for s in exposures if s.imgtype == "OBJECT"]
    ephem = Ephemerides(ssos, [t for s in science for t in (s.mjd, s.mjd + s.exptime / 86400.0)])
    if rank == 0:
        for spec in exposures:
            repo.register_exposure(_exposure_row(spec))
    comm.Barrier()
    n_raw = 0
    for det in detectors[rank::size]:
        t_det = time.perf_counter()
        sig = make_signature(camera, det, request.seed)
        bands = sorted({s.band for s in exposures if s.band != "NONE"})
        write_instrument_truth(repo.instrument_truth_path(det.name), sig, bands)
        for spec in exposures:
            simulate_one(repo, camera, sig, spec, stars, transients, ephem, request)
            n_raw += 1
        log(f"{det.name}: {len(exposures)} exposures in {time.perf_counter() - t_det:.1f}s")

    idle_barrier(comm)  # ranks with fewer detectors wait without taking cores from the others
    n_raw = comm.allreduce(n_raw)
    n_templates = 0
    if request.templates:
        from lsstpipe.sim.templates import make_templates

        n_templates = make_templates(repo, camera, detectors, visits, stars, request.seed, log, part=(rank, size))
        idle_barrier(comm)
        n_templates = comm.allreduce(n_templates)
    comm.Barrier()
    n_cds = 0
    if request.cds:
        from lsstpipe.sim.camera_daq import fill_cds

        n_cds = fill_cds(repo, camera, detectors, exposures, log, part=(rank, size))
        idle_barrier(comm)
        n_cds = comm.allreduce(n_cds)
    comm.Barrier()
    summary = {
        "camera": camera.name, "seed": request.seed, "visits": len(visits),
        "exposures": len(exposures), "detectors": len(detectors), "raws": n_raw, "templates": n_templates,
        "cds_raft_images": n_cds, "seconds": round(time.perf_counter() - t_start, 2),
    }  # fmt: skip
    if rank == 0:
        write_json(repo.root / "simulation.json", {k: v for k, v in summary.items() if k != "seconds"})
    summary["repo"] = str(repo.root)
    if removed:
        summary["replaced"] = removed
    log("done")
    return summary


def _exposure_row(spec: ExposureSpec) -> dict:
    return {
        "obsid": spec.obsid, "day_obs": spec.day_obs, "seq_num": spec.seq_num,
        "visit": spec.visit if spec.visit >= 0 else None, "snap": spec.snap, "imgtype": spec.imgtype,
        "band": spec.band, "mjd_obs": spec.mjd, "exptime": spec.exptime, "ra": spec.ra, "dec": spec.dec,
        "rotpa": spec.rot_sky_pos, "seeing": spec.seeing, "airmass": spec.airmass,
    }  # fmt: skip


def exposure_scene(camera: Camera, det: Detector, spec: ExposureSpec, stars, transients, ephem) -> tuple:
    """(sources, sky model, psf model) of a science exposure of one detector."""
    model = DetectorSkyModel(FocalPlaneSkyModel.from_camera(camera, spec.ra, spec.dec, spec.rot_sky_pos), det)
    psf = scene.PsfModel(spec.seeing, camera.pixel_scale_arcsec, scene.mm_scale(camera))
    mid = spec.mjd + spec.exptime / 2.0 / 86400.0
    args = (spec.band, spec.airmass)
    sources = scene.Sources.concat([
        scene.static_sources(det, model, psf, stars, *args, mid, spec.exptime),
        scene.transient_sources(det, model, psf, transients, *args, mid, spec.exptime),
        scene.moving_sources(det, model, psf, ephem, *args, spec.mjd, spec.exptime),
    ])  # fmt: skip
    return sources, model, psf


def simulate_one(repo: Repository, camera: Camera, sig: DetectorSignature, spec: ExposureSpec,
                 stars, transients, ephem: Ephemerides, request: SimulationRequest) -> Path:  # fmt: skip
    """Render, write and register one raw, and its truth."""
    det = sig.detector
    sources = model = psf = None
    sky_rate = 0.0
    if spec.imgtype == "OBJECT":
        sources, model, psf = exposure_scene(camera, det, spec, stars, transients, ephem)
        sky_rate = skymod.sky_electrons_per_pixel(spec.sky_mag, spec.band, camera.pixel_scale_arcsec)
    elif spec.imgtype == "SPOT":
        sources = spots.spot_sources(det, spec.obsid, spec.spot_pattern, request.seed, camera.name)
    rendered = render_exposure(camera, sig, spec, sources, sky_rate, request.seed, noise=request.noise)
    path = repo.raw_path(spec.day_obs, spec.obsid, det.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_raw(path, det, rendered.segments, raw_header(camera, spec), overwrite=True, compress=request.compress)
    repo.register_raw(spec.obsid, det.name, path, sha256_file(path))
    if spec.imgtype == "SPOT" and sources is not None:
        tdir = repo.truth_dir(spec.day_obs, spec.obsid)
        write_csv(tdir / f"{spec.obsid}_{det.name}_spots.csv", spot_rows(sources, det, spec.spot_pattern), SPOT_COLUMNS)
    if spec.imgtype == "OBJECT":
        tdir = repo.truth_dir(spec.day_obs, spec.obsid)
        zp = skymod.exposure_zero_point(spec.band, spec.airmass, spec.exptime)
        write_csv(tdir / f"{spec.obsid}_{det.name}_sources.csv", source_rows(rendered.sources), SOURCE_COLUMNS)
        header = model.wcs_header()
        write_json(tdir / f"{spec.obsid}_{det.name}_meta.json", {
            "obsid": spec.obsid, "detector": det.name, "detector_id": det.id, "visit": spec.visit,
            "snap": spec.snap, "band": spec.band, "mjd": spec.mjd, "exptime": spec.exptime,
            "airmass": spec.airmass, "seeing_arcsec": spec.seeing, "sky_mag": spec.sky_mag,
            "sky_e_per_pixel": rendered.sky_e_per_pixel, "sky_gradient_per_100mm": list(spec.sky_gradient),
            "fringe_amplitude": spec.fringe_amp,
            "zero_point_mag_for_1e": zp,
            "zero_point_note": "magnitude of a source giving 1 electron in the flat-fielded exposure",
            "psf": psf.describe(), "n_saturated_pixels": rendered.n_saturated,
            "wcs": {k: header[k] for k in header},
            "cosmic_rays": {k: np.round(v, 3).tolist() for k, v in rendered.cosmics.items()},
        })  # fmt: skip
    return path


def write_reference_catalog(repo: Repository, stars: skymod.StaticCatalog, mag_limit: float = 22.0) -> None:
    """Non-variable stars brighter than ``mag_limit`` in r: the astrometric and photometric reference."""
    keep = (stars.mags["r"] < mag_limit) & ~stars.variable
    rows = []
    for k in np.nonzero(keep)[0]:
        row = {"id": int(stars.id[k]), "ra": float(stars.ra[k]), "dec": float(stars.dec[k])}
        for b in "ugrizy":
            row[f"{b}_mag"] = round(float(stars.mags[b][k]), 5)
            row[f"{b}_flux_nJy"] = float(skymod.mag_to_njy(stars.mags[b][k]))
        rows.append(row)
    cols = ["id", "ra", "dec"] + [f"{b}_{q}" for b in "ugrizy" for q in ("mag", "flux_nJy")]
    write_csv(repo.refcat_path, rows, cols)


def write_transient_truth(repo: Repository, tr: skymod.TransientCatalog) -> None:
    rows = (
        {"id": int(tr.id[k]), "ra": float(tr.ra[k]), "dec": float(tr.dec[k]), "peak_mjd": float(tr.peak_mjd[k]),
         "rise_days": float(tr.rise_days[k]), "fall_days": float(tr.fall_days[k]),
         **{f"{b}_peak_mag": float(tr.peak_mag[b][k]) for b in "ugrizy"}}
        for k in range(len(tr))
    )  # fmt: skip
    cols = ["id", "ra", "dec", "peak_mjd", "rise_days", "fall_days"] + [f"{b}_peak_mag" for b in "ugrizy"]
    write_csv(repo.root / "truth" / "transients.csv", rows, cols)
