"""Archive storage of the observing night: image blobs, the network outage buffer, raw image cache, tape.

See :mod:`lsstpipe.archive.blobs` (keys, modes, metadata, image blobs), :mod:`lsstpipe.archive.storage`
(outage buffer, raw image cache) and :mod:`lsstpipe.archive.tape` (append-only HDF5 tape volumes and the
library reading across them).
"""

from lsstpipe.archive.blobs import ArchiverMode, ImageKey, ItemMeta, blob_meta, decode_image, encode_image
from lsstpipe.archive.storage import (
    ArchiveConflict,
    ArchiveError,
    ArchiveNotFound,
    OutageBuffer,
    OutageBufferFull,
    RawImageCache,
    StoredItem,
)
from lsstpipe.archive.tape import TapeArchive, TapeLibrary, TapeRecord

__all__ = [
    "ArchiveConflict", "ArchiveError", "ArchiveNotFound", "ArchiverMode", "ImageKey", "ItemMeta", "OutageBuffer",
    "OutageBufferFull", "RawImageCache", "StoredItem", "TapeArchive", "TapeLibrary", "TapeRecord", "blob_meta",
    "decode_image", "encode_image",
]  # fmt: skip
