"""FileMemo: a value per file version, computed once per process, again when the file changes."""

from __future__ import annotations

import os

import pytest

from lsstpipe.io.filememo import FileMemo


def test_computed_once_per_file_version(tmp_path):
    calls = []
    memo = FileMemo(lambda p: calls.append(os.fspath(p)) or open(p).read(), what="catalogue")
    path = tmp_path / "a.txt"
    path.write_text("one")
    assert memo(path) == memo(path) == "one" and len(calls) == 1 and len(memo) == 1
    path.write_text("three")  # rewritten in place: another size (and time)
    assert memo(path) == "three" and len(calls) == 2
    st = os.stat(path)
    path.write_text("fiver")  # same size: the modification time tells it apart
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert memo(path) == "fiver" and len(calls) == 3
    other = tmp_path / "b.txt"
    other.write_text("b")
    os.replace(other, path)  # replaced by another file: another inode
    assert memo(path) == "b" and len(calls) == 4


def test_missing_files_errors_and_bound(tmp_path):
    def compute(p):
        if open(p).read() == "bad":
            raise ValueError("bad file")
        return 1

    memo = FileMemo(compute, max_entries=2, what="template")
    with pytest.raises(FileNotFoundError, match="template .*nope: no such file"):
        memo(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no such file"):
        memo(tmp_path)  # a directory is no file
    bad = tmp_path / "bad"
    bad.write_text("bad")
    for _ in range(2):  # an error is not kept: raised again
        with pytest.raises(ValueError, match="bad file"):
            memo(bad)
    assert len(memo) == 0
    for k in range(3):
        (tmp_path / f"f{k}").write_text("ok")
        memo(tmp_path / f"f{k}")
    assert len(memo) == 1  # full at two: dropped, then the third kept
    memo.clear()
    assert len(memo) == 0
    with pytest.raises(ValueError, match="at least 1"):
        FileMemo(compute, max_entries=0)
