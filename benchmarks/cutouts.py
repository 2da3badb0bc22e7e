"""Alert cutouts of one CCD: the per-CCD writer (:class:`lsstpipe.alerts.cutouts.CcdCutouts`) against astropy.

What is timed (one process), on a full-size LSSTCam CCD (4004×4096, e2v R22_S11: its nominal TAN-SIP WCS, a
noise calexp, difference and template) and ``--sources`` positions spread over it, edges included:

1. the reference: three stamps per source made with astropy (:func:`lsstpipe.alerts.cutouts.make_cutout`:
   ``Cutout2D``, ``WCS.to_header``, HDUs, ``writeto``), as :func:`~lsstpipe.alerts.cutouts.ccd_cutouts` did
   for every alert before;
2. ``CcdCutouts`` made once for the CCD (its set-up timed apart) and ``.at(x, y)`` per source.

The bytes of both are compared for every source (they must be equal). Medians of ``--repeat`` runs.
Run ``python benchmarks/cutouts.py [--sources N] [--repeat N] [--json PATH] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import median  # noqa: E402
from lsstpipe.alerts.cutouts import CcdCutouts, Cutouts, cutout_size_pixels, make_cutout  # noqa: E402
from lsstpipe.camera import get_camera  # noqa: E402
from lsstpipe.pipelines.characterize import initial_wcs  # noqa: E402
from lsstpipe.pipelines.diasources import njy_per_electron  # noqa: E402
from lsstpipe.pipelines.difference import Difference  # noqa: E402
from lsstpipe.pipelines.exposure import Exposure  # noqa: E402


def _planes(shape, seed: int):
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 10.0, shape).astype(np.float32)
    variance = np.full(shape, 100.0, np.float32)
    mask = np.zeros(shape, np.int32)
    calexp = Exposure(image, variance, mask)
    difference = Difference(image - 100.0, variance * 2.0, mask, image * 0.5)
    return calexp, difference


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=int, default=100, help="DIASources of the CCD (a full-size CCD has ~100)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="a mini-camera CCD, 10 sources, 1 repeat (test suite)")
    args = ap.parse_args(argv)
    camera_name, detector = ("mini", "R10_S11") if args.quick else ("lsstcam", "R22_S11")
    n_src, repeat = (10, 1) if args.quick else (args.sources, args.repeat)
    camera = get_camera(camera_name)
    det = camera[detector]
    wcs = initial_wcs(camera, det, 150.0, -30.0, 10.0)
    calexp, difference = _planes(det.shape, 1)
    zero_point = 31.0
    ny, nx = det.shape
    rng = np.random.default_rng(2)
    xy = np.column_stack([rng.uniform(-0.5, nx - 0.5, n_src), rng.uniform(-0.5, ny - 0.5, n_src)])
    xy[:4] = [(-0.5, -0.5), (nx - 0.6, ny - 0.6), (0.0, ny - 1.0), (nx - 1.0, 0.0)][: min(4, n_src)]
    scale, size = njy_per_electron(zero_point), cutout_size_pixels(wcs)

    def reference():
        return [Cutouts(make_cutout(calexp.image, x, y, wcs, size, calexp.variance, calexp.mask, scale),
                        make_cutout(difference.template, x, y, wcs, size, flux_scale=scale),
                        make_cutout(difference.image, x, y, wcs, size, difference.variance, difference.mask, scale))
                for x, y in xy]  # fmt: skip

    def writer():
        cuts = CcdCutouts(calexp, difference, wcs, zero_point)
        return [cuts.at(x, y) for x, y in xy]

    same = reference() == writer()  # also the untimed warm-up of both
    t_ref = median(reference, repeat)
    t_setup = median(lambda: CcdCutouts(calexp, difference, wcs, zero_point), repeat)
    t_new = median(writer, repeat)
    result = {
        "camera": camera_name, "detector": detector, "shape": [ny, nx], "sources": n_src, "stamp_pixels": size,
        "astropy_seconds_per_alert": t_ref / n_src, "writer_seconds_per_alert": t_new / n_src,
        "writer_setup_seconds": t_setup, "astropy_over_writer": t_ref / t_new, "identical_bytes": bool(same),
    }  # fmt: skip
    print(f"{camera_name} {detector} {ny}×{nx}, {n_src} sources, {size}² stamps (science, template, difference):")
    print(f"  astropy make_cutout ×3: {t_ref / n_src * 1e3:.2f} ms per alert; CcdCutouts: "
          f"{t_new / n_src * 1e3:.2f} ms per alert (set-up {t_setup * 1e3:.1f} ms per CCD, included) = "
          f"{t_ref / t_new:.1f}× faster; bytes identical: {same}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if not same:
        raise SystemExit("the writer's bytes differ from make_cutout's")
    return result


if __name__ == "__main__":
    main()
