"""MPI entry point of the simulator: ``mpiexec -n K python -m mpi4py jobs/simulate.py --repo REPO …``.

Takes the same arguments as ``lsstpipe simulate``; detectors, template patches and rafts are shared
among the K ranks, and the repository is byte-identical for any K.
"""

import sys

from lsstpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["simulate", "--mpi", *sys.argv[1:]]))
