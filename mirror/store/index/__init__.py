"""The index: one interface (base.py), an engine per file."""

from mirror.store.index.base import ImageRow, Index, TagRow, Traffic
from mirror.store.index.postgres import PostgresIndex
from mirror.store.index.sqlite import SqliteIndex

__all__ = ["ImageRow", "Index", "PostgresIndex", "SqliteIndex", "TagRow", "Traffic"]
