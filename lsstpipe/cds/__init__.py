"""The Camera Data System (CDS) buffer: the camera writes raft images, DM retrieves and verifies them.

:class:`CDSBuffer` is the camera's side (atomic writes, content checksums, ring-buffer eviction);
:class:`CDSClient` is DM's side (blocking retrieval with checksum verification, oldest-first scans for
the Catch-Up Archiver). Failures are :class:`CDSError` subclasses with a ``retriable`` flag.
"""

from lsstpipe.cds.buffer import CDSBuffer, CDSClient
from lsstpipe.cds.image import (
    N_SEGMENTS,
    CDSChecksumError,
    CDSError,
    CDSFormatError,
    CDSNotFound,
    CDSTimeout,
    ImageKind,
    RaftImage,
    compute_checksum,
    image_day_obs,
)
from lsstpipe.cds.store import BufferEntry, image_path

__all__ = [
    "N_SEGMENTS", "BufferEntry", "CDSBuffer", "CDSChecksumError", "CDSClient", "CDSError", "CDSFormatError",
    "CDSNotFound", "CDSTimeout", "ImageKind", "RaftImage", "compute_checksum", "image_day_obs", "image_path",
]  # fmt: skip
