"""Blob and manifest content by digest: the seam (base.py), the local files engine (local.py),
the bucket engine (bucket.py over s3.py)."""

from mirror.store.blobs.local import (
    BlobStore,
    BlobWriter,
    DigestMismatch,
    LocalContent,
    digest_of,
)

__all__ = ["BlobStore", "BlobWriter", "DigestMismatch", "LocalContent", "digest_of"]
