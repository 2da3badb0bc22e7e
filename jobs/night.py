"""The observing night on MPI: ``mpiexec -n K python -m mpi4py jobs/night.py --repo REPO --out OUT``.

Thin entry point; everything is in :mod:`lsstpipe.runtime.night` (``--help`` lists the options and faults).
"""

from lsstpipe.runtime.night import run_and_finish

if __name__ == "__main__":
    run_and_finish()
