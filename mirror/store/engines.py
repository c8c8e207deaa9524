"""Which engines the Config asks for: the one place that knows every engine by name.

Everything else receives a `ContentStore` (store/blobs/base.py) and an `Index`
(store/index/base.py) and never asks which it has.
"""

from __future__ import annotations

from mirror.config import Config
from mirror.store.blobs.base import ContentStore
from mirror.store.blobs.local import BlobStore, LocalContent
from mirror.store.index.base import Index


async def open_content(config: Config, files: BlobStore) -> ContentStore:
    """The content store over the data directory's files: those alone, or a bucket with the
    files as its hot tier. Imports an engine's library only when it is used."""
    if config.s3 is None:
        return LocalContent(files)
    from mirror.store.blobs.bucket import BucketContent
    from mirror.store.blobs.s3 import ObjectStore, S3Settings

    s3 = config.s3
    objects = await ObjectStore.open(
        S3Settings(
            bucket=s3.bucket,
            prefix=s3.prefix,
            endpoint=s3.endpoint,
            region=s3.region,
            path_style=s3.path_style,
            access_key=s3.access_key,
            secret_key=s3.secret_key,
        )
    )
    return BucketContent(
        files, objects, config.local_cache_size, s3.redirect, coherent=config.clustered
    )


async def open_index(config: Config) -> Index:
    """The index the Config names; SQLite is opened by recovery (recovery.py), which may
    have to rebuild it, so this is only called for the other engines or after recovery."""
    if config.index_url is None:
        from mirror.store.index.sqlite import SqliteIndex

        return await SqliteIndex.open(config.data_dir / "index.db")
    from mirror.store.index.postgres import PostgresIndex

    return await PostgresIndex.open(config.index_url, password=config.index_password)
