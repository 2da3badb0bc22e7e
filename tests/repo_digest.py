"""Fingerprints of a data repository, to compare two simulations file by file."""

import hashlib
from pathlib import Path

import h5py


def digest_files(root: Path) -> dict:
    """sha256 of every file but the registry; for the CDS's HDF5 raft images, the content checksum they
    carry (HDF5 does not promise byte-identical containers for identical content; the CDS verifies content)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if not p.is_file() or p.name == "registry.sqlite3":
            continue
        if p.suffix == ".h5":
            with h5py.File(p, "r") as f:
                out[str(p.relative_to(root))] = str(f.attrs["checksum"])
        else:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
