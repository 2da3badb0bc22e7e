"""Archive storage of the observing night: image blobs, the network outage buffer, raw image cache, tape.

See :mod:`lsstpipe.archive.storage` (keys, blobs, outage buffer, raw image cache) and
:mod:`lsstpipe.archive.tape` (append-only HDF5 tape volumes and the library reading across them).
"""

from lsstpipe.archive.storage import (
    ArchiveConflict,
    ArchiveError,
    ArchiveNotFound,
    ArchiverMode,
    ImageKey,
    ItemMeta,
    OutageBuffer,
    OutageBufferFull,
    RawImageCache,
    StoredItem,
    blob_meta,
    decode_image,
    encode_image,
)
from lsstpipe.archive.tape import TapeArchive, TapeLibrary, TapeRecord

__all__ = [
    "ArchiveConflict", "ArchiveError", "ArchiveNotFound", "ArchiverMode", "ImageKey", "ItemMeta", "OutageBuffer",
    "OutageBufferFull", "RawImageCache", "StoredItem", "TapeArchive", "TapeLibrary", "TapeRecord", "blob_meta",
    "decode_image", "encode_image",
]  # fmt: skip
