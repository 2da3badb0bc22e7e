#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs the package with its test tools, then runs the
# serial tests and the MPI tests at 2 and 4 ranks (4 ranks on 2 cores is oversubscribed: correctness only).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[test]'
python -m pytest -q tests
for n in 2 4; do
    echo "== MPI tests on $n ranks"
    mpiexec -n "$n" python -m pytest -q --with-mpi -m mpi -p no:cacheprovider tests
done
