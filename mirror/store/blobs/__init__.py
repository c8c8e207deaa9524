"""Blob and manifest content by digest: the local files engine (local.py)."""

from mirror.store.blobs.local import BlobStore, BlobWriter, DigestMismatch, digest_of

__all__ = ["BlobStore", "BlobWriter", "DigestMismatch", "digest_of"]
