"""What a process computes from a file, kept until the file changes.

A worker reads the same files for many CCD jobs of a night — the reference catalogue, the template patches'
headers, the master calibrations it checksums — and a night never rewrites them; :class:`FileMemo` keeps the
value computed from each file, keyed by its path and the file's version (device, inode, size, modification
time), so a file replaced or rewritten in place is read again.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["FileMemo"]

T = TypeVar("T")


class FileMemo(Generic[T]):
    """``memo(path)`` is ``compute(path)``, computed once per version of the file.

    Parameters
    ----------
    compute : callable
        The value of a file from its path. An exception it raises is not kept.
    max_entries : int
        Values kept at most; when full, all are dropped (a night reads a bounded set of files).
    what : str
        What the files are, for the error about a missing one (``"template"``: "template PATH: no such file").
    """

    def __init__(self, compute: Callable[[str | os.PathLike], T], max_entries: int = 4096, what: str = "file") -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._compute, self._max, self._what = compute, max_entries, what
        self._values: dict[tuple, T] = {}

    def __call__(self, path: str | os.PathLike) -> T:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(f"{self._what} {path}: no such file")
        key = (os.fspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        try:
            return self._values[key]
        except KeyError:
            pass
        value = self._compute(path)
        if len(self._values) >= self._max:
            self._values.clear()
        self._values[key] = value
        return value

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        self._values.clear()
