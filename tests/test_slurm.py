"""sbatch templates render only with complete, known, shell-safe values."""

import subprocess

import pytest

from lsstpipe.slurm import render


def test_render_fills_every_placeholder():
    script = render("simulate", {"repo": "/scratch/night1", "ranks": "32", "partition_line": "lsst"})
    assert "${" not in script
    assert "#SBATCH --ntasks=32" in script and "--repo /scratch/night1" in script
    assert "#SBATCH --partition=lsst" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


@pytest.mark.parametrize("values,match", [
    ({}, "needs a value for repo"),
    ({"repo": "r", "colour": "red"}, "unknown setting"),
    ({"repo": "r; rm -rf /"}, "shell-safe"),
    ({"repo": "r", "ranks": "0"}, "positive integer"),
])  # fmt: skip
def test_render_rejects_bad_values(values, match):
    with pytest.raises(ValueError, match=match):
        render("simulate", values)


def test_unknown_template():
    with pytest.raises(ValueError, match="templates are"):
        render("dinner", {})
