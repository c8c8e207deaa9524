"""The index: one interface (base.py), an engine per file. The PostgreSQL engine is imported
from its module where it is used (engines.py): a mirror on SQLite never loads asyncpg."""

from mirror.store.index.base import ImageRow, Index, TagRow, Traffic
from mirror.store.index.sqlite import SqliteIndex

__all__ = ["ImageRow", "Index", "SqliteIndex", "TagRow", "Traffic"]
