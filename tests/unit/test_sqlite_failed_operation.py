"""An index operation that fails half-way on SQLite leaves nothing behind: no transaction
holding the database's write lock against the other workers, no half committed later by the
next operation of the same connection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mirror.store.index.sqlite import SqliteIndex

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


async def test_a_failed_write_rolls_back_and_holds_no_lock(tmp_path: Path) -> None:
    db = tmp_path / "index.db"
    worker, other = await SqliteIndex.open(db), await SqliteIndex.open(db)
    try:
        broken, child = f"sha256:{1:064x}", f"sha256:{2:064x}"
        # The blob row is written, then a child size SQLite cannot bind fails the operation.
        with pytest.raises(OverflowError):
            await worker.add_manifest("hosted", "acme/app", broken, MANIFEST, 10, [(child, 2**64)])
        # Another worker writes at once (its busy wait would be 30 s behind an open
        # transaction), and this worker's next commit carries no half of the failed one.
        await asyncio.wait_for(other.add_blob(f"sha256:{3:064x}", 5, None), 5)
        await worker.add_blob(f"sha256:{4:064x}", 5, None)
        assert await other.get_blob(broken) is None
        assert await worker.get_blob(broken) is None
    finally:
        await worker.close()
        await other.close()
