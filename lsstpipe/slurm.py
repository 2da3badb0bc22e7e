"""Render the sbatch templates in ``slurm/`` with validated values.

A template is a shell script with ``${name}`` placeholders (Python ``string.Template``). Rendering
checks that every placeholder gets a value, that no unknown value is passed, and that values are safe
to paste into a shell line (no quotes, backquotes, ``$`` or newlines), then writes the script.
"""

from __future__ import annotations

import os
import re
import string
from importlib import resources
from pathlib import Path

#: Defaults per template; a value of None must be given by the caller.
DEFAULTS: dict[str, dict[str, str | None]] = {
    "simulate": {
        "job_name": "lsstpipe-simulate",
        "nodes": "1",
        "ranks": "16",
        "time_limit": "01:00:00",
        "log_dir": ".",
        "partition_line": "",
        "numba_cache_dir": "/tmp/lsstpipe-numba-cache",
        "srun_mpi": "pmi2",
        "repo": None,
        "camera": "lsstcam",
        "visit_args": "--visits 4",
        "seed": "1",
        "extra_args": "--calibs",
    },
    "calibration_products": {
        "job_name": "lsstpipe-cpp",
        "nodes": "1",
        "ranks": "16",
        "time_limit": "02:00:00",
        "log_dir": ".",
        "partition_line": "",
        "numba_cache_dir": "/tmp/lsstpipe-numba-cache",
        "srun_mpi": "pmi2",
        "repo": None,
        "job_script": "jobs/calibration_products.py",
        "mode": "main",
        "min_frames": "3",
        "extra_args": "",
    },
    "night": {
        "job_name": "lsstpipe-night",
        "nodes": "1",
        "ranks": "4",
        "time_limit": "01:00:00",
        "log_dir": ".",
        "partition_line": "",
        "numba_cache_dir": "/tmp/lsstpipe-numba-cache",
        "srun_mpi": "pmi2",
        "repo": None,
        "out": None,
        "camera": "mini",
        "job_script": "jobs/night.py",
        "extra_args": "",
    },
}
#: Settings that must be positive integers (``seed``: ≥ 0), where a template has them.
_INTEGERS = {"nodes": 1, "ranks": 1, "seed": 0, "min_frames": 1}
_SAFE = re.compile(r"^[A-Za-z0-9_./:,=@%+ -]*$")


def template_dir() -> Path:
    """The repository's ``slurm/`` folder (next to the package in a source checkout)."""
    here = Path(__file__).resolve().parent.parent / "slurm"
    if here.is_dir():
        return here
    return Path(str(resources.files("lsstpipe") / "slurm"))


def render(name: str, values: dict[str, str]) -> str:
    """The script of template ``name`` with ``values`` filled in (defaults for the rest).

    Raises
    ------
    ValueError
        Unknown template, unknown or missing placeholder, or a value that is not shell-safe.
    """
    if name not in DEFAULTS:
        raise ValueError(f"unknown sbatch template {name!r}; templates are {', '.join(sorted(DEFAULTS))}")
    text = (template_dir() / f"{name}.sbatch").read_text()
    tmpl = string.Template(text)
    placeholders = {m.group("named") or m.group("braced") for m in tmpl.pattern.finditer(text)} - {None}
    defaults = DEFAULTS[name]
    if placeholders != set(defaults):
        raise ValueError(f"template {name}.sbatch and its defaults disagree: {sorted(placeholders ^ set(defaults))}")
    unknown = set(values) - placeholders
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(sorted(unknown))} for {name}.sbatch; it takes {', '.join(sorted(placeholders))}"
        )
    merged = {**defaults, **{k: str(v) for k, v in values.items()}}
    missing = sorted(k for k, v in merged.items() if v is None)
    if missing:
        raise ValueError(f"{name}.sbatch needs a value for {', '.join(missing)}: pass --set {missing[0]}=…")
    for k, v in merged.items():
        if not _SAFE.match(str(v)):
            raise ValueError(f"value of {k} ({v!r}) is not shell-safe: use letters, digits, spaces and ./:,=@%+-_")
    for k, least in _INTEGERS.items():
        value = merged.get(k)
        if value is not None and (not value.isdigit() or int(value) < least):
            raise ValueError(f"{k} must be a positive integer, not {value!r}")
    if "mode" in merged and merged["mode"] not in ("main", "pre-drp"):
        raise ValueError(f"mode must be main or pre-drp, not {merged['mode']!r}")
    if merged["partition_line"] and not merged["partition_line"].startswith("#SBATCH --partition="):
        merged["partition_line"] = f"#SBATCH --partition={merged['partition_line']}"
    return tmpl.substitute(merged)


def write_script(path: Path, script: str) -> None:
    """Write a rendered script to ``path`` (replacing a file there), executable.

    Raises
    ------
    ValueError
        If ``path`` is a directory or its directory does not exist.
    OSError
        If the file cannot be written (permissions, disk full); an existing file is then left as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path} is a directory; give a file name, e.g. {path / 'job.sbatch'}")
    if not path.parent.is_dir():
        raise ValueError(f"--out {path}: the directory {path.parent} does not exist; create it first")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(script)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    except OSError as exc:  # name the file asked for, not the temporary one
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
