"""Timing helpers shared by the benchmarks: the fastest or the median of repeated runs of a callable.

The fastest run (:func:`fastest`) is the repeatable cost of memory-bound kernels on a shared node, where
other processes' traffic only ever adds time; the median (:func:`median`, :func:`median_wall_cpu`) is what
a user sees for longer stages. A warm-up run first pays JIT compilation and first-touch page faults.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from time import perf_counter, process_time

__all__ = ["fastest", "fastest_interleaved", "median", "median_wall_cpu"]


def _runs(fn: Callable[[], object], repeat: int, warmup: bool) -> tuple[list[float], list[float]]:
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    if warmup:
        fn()
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = perf_counter(), process_time()
        fn()
        wall.append(perf_counter() - t0)
        cpu.append(process_time() - c0)
    return wall, cpu


def fastest(fn: Callable[[], object], repeat: int, *, warmup: bool = True) -> float:
    """Wall seconds of the fastest of ``repeat`` runs (after one untimed run with ``warmup``)."""
    return min(_runs(fn, repeat, warmup)[0])


def fastest_interleaved(fns: dict[str, Callable[[], object]], repeat: int, *, warmup: bool = True) -> dict[str, float]:
    """Wall seconds of the fastest run of each callable, the callables run in turn ``repeat`` rounds (after an
    untimed run of each with ``warmup``).

    For a ratio of two memory-bound measurements on a shared node: run one after the other, each block of
    runs meets another load (a ratio moved by 20 points between two runs of ``benchmarks/isr.py`` on the
    2-vCPU VM); in turn, both see the same loads.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    if warmup:
        for fn in fns.values():
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = perf_counter()
            fn()
            best[name] = min(best[name], perf_counter() - t0)
    return best


def median(fn: Callable[[], object], repeat: int, *, warmup: bool = False) -> float:
    """Median wall seconds of ``repeat`` runs (after one untimed run with ``warmup``)."""
    return statistics.median(_runs(fn, repeat, warmup)[0])


def median_wall_cpu(fn: Callable[[], object], repeat: int, *, warmup: bool = True) -> tuple[float, float]:
    """Median wall and CPU seconds of ``repeat`` runs (after one untimed run with ``warmup``)."""
    wall, cpu = _runs(fn, repeat, warmup)
    return statistics.median(wall), statistics.median(cpu)
