"""Single-core throughput of master combination, against ``numpy.median`` over the same stack in the same run.

What is timed (one process, one thread: numba's and the BLAS libraries' thread counts are pinned to 1 before
numpy is imported), on a stack of ``--frames`` float32 frames of ``--size``² pixels (Gaussian noise with 1 %
of the pixels hit by cosmic rays, as a set of darks):

1. :func:`kernels.combine.combine_streaming` with blocks of 128 rows (what the Calibration Products
   Production runs): the clipped mean with the frames' noise model (``stdfunc='model'``, the masters'
   setting), with MAD-then-std clipping, and the median combination;
2. :func:`kernels.combine.combine_stack` (the whole stack as one block) with the noise-model clipped mean;
3. anchors: ``numpy.median(stack, axis=0)`` (no clipping, no variance, no NaN handling; the ratio's
   denominator) and ``numpy.mean(stack, axis=0)`` (the memory-bound floor of any combination).

Throughput is combined (output) pixels per second per core, Mpix/s; ratios are against ``numpy.median``.
Each measurement is the fastest of ``--repeat`` runs after an untimed warm-up (JIT compilation excluded).
Run ``python benchmarks/combine.py [--frames N] [--size PIX] [--repeat N] [--json PATH]``.
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import fastest  # noqa: E402
from kernels.combine import combine_stack, combine_streaming  # noqa: E402


def make_stack(n: int, size: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    stack = rng.normal(1000.0, 6.0, (n, size, size)).astype(np.float32)
    hit = rng.random(stack.shape) < 0.01
    stack[hit] += rng.exponential(2000.0, int(hit.sum())).astype(np.float32)
    stack.flags.writeable = False
    return stack


def run(frames: int, size: int, repeat: int) -> dict:
    stack = make_stack(frames, size)
    npix = size * size

    def streaming(**kw):
        return lambda: combine_streaming(lambda i, r0, r1: stack[i, r0:r1], frames, (size, size), block_rows=128, **kw)

    cases = {
        "numpy.median": lambda: np.median(stack, axis=0),
        "numpy.mean": lambda: np.mean(stack, axis=0),
        "streaming clipped mean (model)": streaming(nsigma=4.0, stdfunc="model", noise_model=(36.0, 0.0)),
        "streaming clipped mean (mad_then_std)": streaming(nsigma=3.0, stdfunc="mad_then_std"),
        "streaming median": streaming(method="median"),
        "whole-stack clipped mean (model)": lambda: combine_stack(
            stack, nsigma=4.0, stdfunc="model", noise_model=(36.0, 0.0)
        ),  # fmt: skip
    }
    seconds = {name: fastest(fn, repeat) for name, fn in cases.items()}
    anchor = seconds["numpy.median"]
    results = {name: {"seconds": t, "mpix_per_s": npix / t / 1e6, "speed_vs_numpy_median": anchor / t}
               for name, t in seconds.items()}  # fmt: skip
    return {
        "frames": frames, "size": size, "repeat": repeat, "results": results,
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
                    "processor": platform.processor() or platform.machine(), "threads": 1},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=10, help="frames in the stack (default 10, the simulator's biases)")
    p.add_argument("--size", type=int, default=1024, help="frame side in pixels (default 1024; 4096: a full CCD)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.frames < 1 or args.size < 1 or args.repeat < 1:
        p.error("--frames, --size and --repeat must be ≥ 1")
    out = run(args.frames, args.size, args.repeat)
    print(f"master combination of {args.frames} frames of {args.size}x{args.size} float32, one core:")
    print(f"{'':40s} {'Mpix/s':>9s} {'vs numpy.median':>16s}")
    for name, r in out["results"].items():
        print(f"{name:40s} {r['mpix_per_s']:9.2f} {r['speed_vs_numpy_median']:15.2f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
