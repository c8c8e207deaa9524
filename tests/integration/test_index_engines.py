"""The index seam: one suite, run against every engine (SQLite on a file, PostgreSQL on a fresh
database), asserting what callers observe. Then what only a shared engine has: migrations that
replicas race on, concurrent writers, outages and what its errors may say."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from mirror.store.index import Index, SqliteIndex, TagRow, Traffic
from mirror.store.index.postgres import (
    MIGRATIONS,
    PostgresIndex,
    PostgresIndexError,
    SchemaTooNewError,
)
from tests.fixtures.postgres import PostgresServer, postgres_server

pytestmark = pytest.mark.integration

OpenIndex = Callable[[], Awaitable[Index]]
HUB = "docker.io"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def d(n: int) -> str:
    return f"sha256:{n:064x}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
async def pg_dsn(pg_server: PostgresServer) -> AsyncIterator[str]:
    """A fresh, empty database of the session's server: its DSN (the password is apart)."""
    name = await pg_server.create_database()
    yield pg_server.dsn(name)
    await pg_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
async def open_index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenIndex]:
    """Opens a handle on one store (each call another handle, as another worker or replica
    would have); all are closed after the test."""
    opened: list[Index] = []
    if request.param == "sqlite":
        path = tmp_path / "index.db"

        async def open_one() -> Index:
            opened.append(await SqliteIndex.open(path))
            return opened[-1]

    else:
        server: PostgresServer = request.getfixturevalue("pg_server")
        name = await server.create_database()

        async def open_one() -> Index:
            opened.append(await PostgresIndex.open(server.dsn(name), password=server.password))
            return opened[-1]

    yield open_one
    for index in opened:
        await index.close()
    if request.param == "postgres":
        await server.drop_database(name)


@pytest.fixture
async def index(open_index: OpenIndex) -> Index:
    return await open_index()


# -- blobs and manifests ---------------------------------------------------------------------------
async def test_add_blob_is_new_only_once_and_refreshes_access(index: Index) -> None:
    before = time.time()
    assert await index.add_blob(d(1), 1234, None) is True
    row = await index.blob_row(d(1))
    assert row is not None and row[:2] == (1234, "")
    assert before <= row[2] <= time.time()
    await index.touch_many({d(1): before - 50})  # never backwards: still the add's time
    assert await index.blob_row(d(1)) == row
    time.sleep(0.01)
    assert await index.add_blob(d(1), 1234, "x") is False
    again = await index.blob_row(d(1))
    assert again is not None and again[:2] == (1234, "") and again[2] > row[2]
    assert await index.get_blob(d(1)) == 1234
    assert await index.get_blob(d(2)) is None
    assert await index.blob_row(d(2)) is None
    await index.add_blob(d(3), 3, None)
    assert await index.stored([d(3), d(2), d(1), d(3)]) == {d(1), d(3)}
    assert await index.stored([]) == set()


async def test_large_sizes_and_float_times_come_back_exactly(index: Index) -> None:
    await index.add_blob(d(1), 5 * 1024**4, "application/octet-stream")  # 5 TiB: past int32
    when = time.time() + 1000.123456789
    await index.touch_many({d(1): when})
    assert await index.blob_row(d(1)) == (5 * 1024**4, "application/octet-stream", when)
    assert await index.usage() == (5 * 1024**4, 1, 0)


async def test_manifest_records_type_children_and_holders(index: Index) -> None:
    children = [(d(11), 100), (d(12), 200)]
    assert await index.add_manifest(HUB, "library/a", d(10), MANIFEST, 50, children) is True
    assert await index.add_manifest(HUB, "library/b", d(10), MANIFEST, 50, children) is False
    assert await index.get_manifest_type(HUB, "library/a", d(10)) == MANIFEST
    assert await index.get_manifest_type(HUB, "library/c", d(10)) is None
    assert await index.get_blob(d(10)) == 50
    assert await index.closure(d(10)) == {d(10): 50, d(11): 100, d(12): 200}
    assert await index.closure(d(99)) == {d(99): 0}  # unknown: itself, size unknown
    assert await index.holds(HUB, "library/a", d(10)) is True  # the manifest itself
    assert await index.holds(HUB, "library/a", d(11)) is True  # a blob it names
    assert await index.holds(HUB, "library/c", d(11)) is False
    assert await index.holds("ghcr.io", "library/a", d(11)) is False
    await index.add_holder(HUB, "library/c", d(11))
    await index.add_holder(HUB, "library/c", d(11))  # twice: no error
    assert await index.holds(HUB, "library/c", d(11)) is True
    assert await index.repositories() == [(HUB, "library/a"), (HUB, "library/b")]
    assert await index.usage() == (50, 1, 1)  # children are counted when their blobs are added


async def test_closure_follows_an_index_down_to_layers(index: Index) -> None:
    await index.add_manifest(HUB, "r", d(1), INDEX, 10, [(d(2), 20), (d(3), 30)])
    await index.add_manifest(HUB, "r", d(2), MANIFEST, 20, [(d(4), 40), (d(5), 50)])
    await index.add_manifest(HUB, "r", d(3), MANIFEST, 30, [(d(4), 40), (d(6), 60)])
    assert await index.closure(d(1)) == {
        d(1): 10, d(2): 20, d(3): 30, d(4): 40, d(5): 50, d(6): 60
    }  # fmt: skip
    assert await index.holds(HUB, "r", d(6)) is True
    assert await index.referenced_outside({d(3), d(4), d(6)}) == {d(3), d(4)}
    assert await index.referenced_outside({d(1), d(2), d(3), d(4), d(5), d(6)}) == set()
    assert await index.referenced_outside(set()) == set()


# -- tags ------------------------------------------------------------------------------------------
async def test_tags_are_set_replaced_listed_in_byte_order_and_deleted(index: Index) -> None:
    for tag in ("a", "B", "_x", "Z9", "10"):
        await index.set_tag(HUB, "library/r", tag, d(1), 100.5)
    await index.set_tag(HUB, "library/other", "a", d(2), 7.0)
    # Byte order (as SQLite's BINARY): digits, upper case, underscore, lower case.
    assert await index.list_tags(HUB, "library/r") == ["10", "B", "Z9", "_x", "a"]
    assert await index.get_tag(HUB, "library/r", "a") == TagRow(d(1), 100.5)
    await index.set_tag(HUB, "library/r", "a", d(3), 200.25)
    assert await index.get_tag(HUB, "library/r", "a") == TagRow(d(3), 200.25)
    assert await index.tags_of(HUB, "library/r", d(1)) == ["10", "B", "Z9", "_x"]
    assert await index.tagged({d(1), d(2), d(4)}) == {d(1), d(2)}
    await index.delete_tag(HUB, "library/r", "B")
    await index.delete_tag(HUB, "library/r", "missing")
    assert await index.get_tag(HUB, "library/r", "B") is None
    assert await index.list_tags(HUB, "library/r") == ["10", "Z9", "_x", "a"]
    assert await index.list_tags(HUB, "library/none") == []


async def test_tags_sharing_finds_tags_naming_a_blob_directly_or_through_an_index(
    index: Index,
) -> None:
    await index.add_manifest(HUB, "r", d(1), INDEX, 10, [(d(2), 20)])
    await index.add_manifest(HUB, "r", d(2), MANIFEST, 20, [(d(9), 90)])
    await index.add_manifest(HUB, "s", d(3), MANIFEST, 30, [(d(9), 90)])
    await index.set_tag(HUB, "r", "multi", d(1), 1.0)
    await index.set_tag(HUB, "r", "single", d(2), 1.0)
    await index.set_tag(HUB, "s", "other", d(3), 1.0)
    await index.set_tag("ghcr.io", "a", "z", d(3), 1.0)
    assert await index.tags_sharing(d(9), set()) == [
        (HUB, "r", "multi"), (HUB, "r", "single"), (HUB, "s", "other"), ("ghcr.io", "a", "z")
    ]  # fmt: skip
    assert await index.tags_sharing(d(9), {d(3)}) == [(HUB, "r", "multi"), (HUB, "r", "single")]
    assert await index.tags_sharing(d(2), {d(3)}) == [(HUB, "r", "multi")]
    assert await index.tags_sharing(d(8), set()) == []


# -- access, eviction, pins ------------------------------------------------------------------------
async def test_eviction_candidates_are_lru_without_pinned_or_freshly_tagged(index: Index) -> None:
    now = time.time()
    for n in range(1, 7):
        await index.add_blob(d(n), n * 10, None)
    await index.add_manifest(HUB, "r", d(7), MANIFEST, 70, [(d(1), 10)])
    await index.add_manifest(HUB, "r", d(8), MANIFEST, 80, [(d(2), 20)])
    # Access order, oldest first: 3, 1, 8, 5, 2, 7, 6, 4 (4 is pinned, 7 is freshly tagged).
    order = [d(3), d(1), d(8), d(5), d(2), d(7), d(6), d(4)]
    await index.touch_many({digest: now + 100 + i for i, digest in enumerate(order)})
    await index.set_tag(HUB, "r", "fresh", d(7), now)
    await index.set_tag(HUB, "r", "stale", d(8), now - 1000)
    await index.pin(HUB, "r", "keep", {d(4)})
    everything = await index.eviction_candidates(now - 60, 100)
    assert everything == [(d(3), 30), (d(1), 10), (d(8), 80), (d(5), 50), (d(2), 20), (d(6), 60)]
    assert await index.eviction_candidates(now - 60, -1) == everything  # negative: no limit
    assert await index.eviction_candidates(now - 60, 2) == everything[:2]
    assert await index.eviction_candidates(now - 60, 100, now + 103) == everything[:3]
    # Once the tag is older than the freshness horizon its manifest may go too.
    assert (d(7), 70) in await index.eviction_candidates(now + 1, 100)


async def test_touch_many_never_moves_an_access_time_backwards(index: Index) -> None:
    now = time.time()
    await index.add_blob(d(1), 1, None)
    await index.add_blob(d(2), 2, None)
    await index.touch_many({d(1): now + 50, d(2): now + 60, d(3): now + 70})  # 3: not indexed
    await index.touch_many({d(1): now + 40, d(2): now + 80})
    one, two = await index.blob_row(d(1)), await index.blob_row(d(2))
    assert one is not None and one[2] == now + 50
    assert two is not None and two[2] == now + 80
    assert await index.get_blob(d(3)) is None
    await index.touch_many({})


async def test_forget_blobs_removes_every_trace(index: Index) -> None:
    await index.add_manifest(HUB, "r", d(1), MANIFEST, 10, [(d(2), 20)])
    await index.add_blob(d(2), 20, None)
    await index.add_blob(d(3), 30, None)
    await index.set_tag(HUB, "r", "t", d(1), time.time())
    await index.add_holder(HUB, "s", d(2))
    assert await index.forget_blobs([d(1), d(2), d(4)]) == 30  # 4: never indexed
    assert await index.all_blobs() == {d(3): 30}
    assert await index.get_manifest_type(HUB, "r", d(1)) is None
    assert await index.closure(d(1)) == {d(1): 0}
    assert await index.get_tag(HUB, "r", "t") is None
    assert await index.holds(HUB, "s", d(2)) is False
    assert await index.repositories() == []
    assert await index.usage() == (30, 1, 0)
    assert await index.forget_blobs([d(1)]) == 0  # already gone: counts nothing
    assert await index.forget_blobs([]) == 0


async def test_two_handles_forgetting_the_same_blobs_count_them_once(
    open_index: OpenIndex,
) -> None:
    a, b = await open_index(), await open_index()
    for n in range(1, 51):
        await a.add_blob(d(n), n, None)
    batch = [d(n) for n in range(1, 51)]
    freed = await asyncio.gather(a.forget_blobs(batch), b.forget_blobs(batch[::-1]))
    assert sum(freed) == sum(range(1, 51)) and sorted(freed)[0] == 0
    assert await b.usage() == (0, 0, 0)


async def test_usage_is_exact_after_handles_add_and_forget_at_once(
    open_index: OpenIndex,
) -> None:
    """The totals `usage()` reads are kept with each write, not summed: blobs added twice,
    forgotten twice and forgotten before they were added, from two handles at once, must
    leave them equal to the rows that remain."""
    a, b = await open_index(), await open_index()
    sizes = {d(n): n * 1000 for n in range(1, 201)}
    await asyncio.gather(*(i.add_blob(x, size, None) for x, size in sizes.items() for i in (a, b)))
    gone = [d(n) for n in range(1, 201, 3)]
    await asyncio.gather(
        a.forget_blobs(gone), b.forget_blobs(gone[::-1]),
        *(i.add_blob(d(n), 7, None) for n in range(300, 340) for i in (b, a)),
        a.forget_blobs([d(n) for n in range(320, 400)]),
    )  # fmt: skip
    remaining = await a.all_blobs()
    assert len(remaining) < 200 + 40
    assert await b.usage() == (sum(remaining.values()), len(remaining), 0)


async def test_an_index_made_before_usage_totals_counts_its_blobs_once(
    pg_server: PostgresServer, pg_dsn: str, tmp_path: Path
) -> None:
    """An index of the previous schema (no totals) opens with totals equal to its rows."""
    for engine in ("sqlite", "postgres"):
        index = await _previous_schema_with_blobs(
            engine, tmp_path / "index.db", pg_server, pg_dsn, {d(1): 5, d(2): 7}
        )
        try:
            assert await index.usage() == (12, 2, 0)
            await index.add_blob(d(3), 30, None)
            assert await index.forget_blobs([d(1)]) == 5
            assert await index.usage() == (37, 2, 0)
        finally:
            await index.close()


async def _previous_schema_with_blobs(
    engine: str, path: Path, server: PostgresServer, dsn: str, blobs: dict[str, int]
) -> Index:
    rows = [(x, size, None, 1.0, 1.0) for x, size in blobs.items()]
    if engine == "sqlite":
        await (await SqliteIndex.open(path)).close()
        db = sqlite3.connect(path)
        db.executescript(
            "DROP TRIGGER usage_on_insert; DROP TRIGGER usage_on_delete; "
            "DROP TABLE usage_totals; PRAGMA user_version=2;"
        )
        db.executemany("INSERT INTO blobs VALUES (?, ?, ?, ?, ?)", rows)
        db.commit()
        db.close()
        return await SqliteIndex.open(path)
    conn = await asyncpg.connect(dsn, password=server.password, timeout=10)
    try:
        await conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL); INSERT INTO schema_migrations VALUES (1, now());"
        )
        await conn.execute(MIGRATIONS[0])
        await conn.executemany("INSERT INTO blobs VALUES ($1, $2, $3, $4, $5)", rows)
    finally:
        await conn.close()
    return await PostgresIndex.open(dsn, password=server.password)


async def test_blobs_in_range_compares_digests_in_byte_order(index: Index) -> None:
    names = ["sha256:0a", "sha256:0b", "sha256:0Z", "sha256:1", "sha256:0", "sha256:0_"]
    for size, name in enumerate(names):
        await index.add_blob(name, size, None)
    # Byte order: "0" < "0Z" < "0_" < "0a" < "0b" < "1"; a linguistic one puts Z after b.
    assert await index.blobs_in_range("sha256:0", "sha256:0a") == {
        "sha256:0": 4, "sha256:0Z": 2, "sha256:0_": 5
    }  # fmt: skip
    assert await index.blobs_in_range("sha256:0a", "sha256:1") == {"sha256:0a": 0, "sha256:0b": 1}
    assert await index.blobs_in_range("sha256:2", "sha256:3") == {}


async def test_pins_are_per_reference_and_counted_on_unpin(index: Index) -> None:
    await index.pin(HUB, "r", "v1", {d(1), d(2)})
    await index.pin(HUB, "r", "v1", {d(1), d(2)})  # again: no duplicates
    await index.pin(HUB, "r", "v2", {d(2), d(3)})
    assert await index.pinned() == {d(1), d(2), d(3)}
    assert await index.pinned_among([d(2), d(4), d(3), d(2)]) == {d(2), d(3)}
    assert await index.pinned_among([d(n) for n in range(4, 1200)]) == set()
    assert await index.pinned_among([]) == set()
    assert await index.is_pinned(d(1)) is True
    assert await index.is_pinned(d(4)) is False
    assert await index.unpin(HUB, "r", "v1") == 2
    assert await index.unpin(HUB, "r", "v1") == 0
    assert await index.pinned() == {d(2), d(3)}
    assert await index.is_pinned(d(1)) is False
    await index.pin(HUB, "r", "empty", set())
    assert await index.unpin(HUB, "r", "empty") == 0


async def test_hosted_manifests_are_listed_deleted_with_their_tags_and_counted(
    index: Index,
) -> None:
    await index.add_blob(d(1), 100, None)
    await index.add_blob(d(2), 50, None)
    await index.add_manifest("hosted", "acme/app", d(3), MANIFEST, 7, [(d(1), 100)])
    await index.add_manifest("hosted", "acme/app", d(4), MANIFEST, 9, [(d(2), 50)])
    await index.set_tag("hosted", "acme/app", "b", d(3), 1.0)
    await index.set_tag("hosted", "acme/app", "a", d(3), 1.0)
    await index.set_tag("hosted", "acme/app", "c", d(4), 1.0)
    assert await index.manifests_of("hosted", "acme/app") == [d(3), d(4)]
    assert await index.manifests_of("hosted", "acme/other") == []
    assert await index.delete_manifest("hosted", "acme/app", d(3)) == ["a", "b"]
    assert await index.manifests_of("hosted", "acme/app") == [d(4)]
    assert await index.list_tags("hosted", "acme/app") == ["c"]
    assert await index.get_blob(d(3)) == 7  # the content stays: GC decides
    await index.pin("hosted", "acme/app", d(4), {d(4), d(2)})
    await index.pin(HUB, "r", "v1", {d(1)})
    assert await index.pinned_bytes("hosted") == 9 + 50
    assert await index.pinned_bytes(HUB) == 100


async def test_claim_tag_sets_only_a_new_tag_and_pinned_by_is_per_registry(
    index: Index,
) -> None:
    assert await index.claim_tag("hosted", "acme/app", "1.0", d(1), 1.0) == d(1)
    assert await index.claim_tag("hosted", "acme/app", "1.0", d(2), 2.0) == d(1)
    assert (await index.get_tag("hosted", "acme/app", "1.0")) == TagRow(d(1), 1.0)
    await index.pin("hosted", "acme/app", d(1), {d(1), d(2)})
    await index.pin(HUB, "r", "v1", {d(3)})
    assert await index.pinned_by("hosted", [d(1), d(3), d(4)]) == {d(1)}
    assert await index.pinned_by(HUB, [d(n) for n in range(1, 1200)]) == {d(3)}
    assert await index.pinned_by("hosted", []) == set()


async def test_collect_garbage_frees_deleted_manifests_and_stale_uploads_only(
    index: Index,
) -> None:
    """acme/app: manifest d(10) (config d(1), layer d(2)) live; manifest d(11) (layer d(3),
    shared layer d(2)) deleted; d(4) uploaded and never named; d(5) the same, but used
    after the cutoff (a push in progress); d(6) the same, and a cached image's layer."""
    for n, size in ((1, 10), (2, 20), (3, 30), (4, 40), (5, 50), (6, 60)):
        await index.add_blob(d(n), size, None)
    await index.add_manifest("hosted", "acme/app", d(10), MANIFEST, 5, [(d(1), 10), (d(2), 20)])
    await index.add_manifest("hosted", "acme/app", d(11), MANIFEST, 6, [(d(3), 30), (d(2), 20)])
    await index.add_manifest(HUB, "library/x", d(12), MANIFEST, 7, [(d(6), 60)])
    await index.pin("hosted", "acme/app", d(10), {d(10), d(1), d(2)})
    await index.pin("hosted", "acme/app", d(11), {d(11), d(3), d(2)})
    for n in (4, 5, 6):
        await index.pin("hosted", "acme/app", d(n), {d(n)})
        await index.add_holder("hosted", "acme/app", d(n))
    await index.delete_manifest("hosted", "acme/app", d(11))
    cutoff = time.time() + 10  # every blob was last used before it...
    await index.touch_many({d(5): cutoff + 100})  # ...but this one
    expected = [(d(3), 30), (d(4), 40), (d(11), 6)]
    assert sorted(await index.collect_garbage("hosted", cutoff, dry_run=True)) == expected
    assert await index.pinned_bytes("hosted") == 5 + 10 + 20 + 6 + 30 + 40 + 50 + 60
    # Without grace for uploads, only the deleted manifest's pins go.
    assert sorted(await index.collect_garbage("hosted", 0.0)) == [(d(3), 30), (d(11), 6)]
    assert await index.collect_garbage("hosted", cutoff) == [(d(4), 40)]
    # d(6) lost its pin too, but a cached image keeps it.
    assert await index.pinned() == {d(10), d(1), d(2), d(5)}
    assert await index.collect_garbage("hosted", cutoff) == []
    assert await index.pinned_bytes("hosted") == 5 + 10 + 20 + 50


# -- what the CLI and the web page list ------------------------------------------------------------
async def test_images_lists_every_cached_tag_with_its_blob(index: Index) -> None:
    await index.add_manifest(HUB, "library/b", d(1), MANIFEST, 10, [])
    await index.add_manifest(HUB, "library/a", d(2), INDEX, 20, [])
    await index.touch_many({d(1): 2e9 + 0.5, d(2): 2e9 + 1.5})
    await index.set_tag(HUB, "library/b", "x", d(1), 11.5)
    await index.set_tag(HUB, "library/a", "y", d(2), 12.5)
    await index.set_tag(HUB, "library/a", "gone", d(5), 13.0)  # no blob: not listed
    await index.pin(HUB, "library/a", "y", {d(2)})
    images = await index.images()
    # The JSON `mirror ls --json` prints, byte for byte the same whatever the engine.
    assert json.dumps(images) == json.dumps([
        {"registry": HUB, "repository": "library/a", "tag": "y", "digest": d(2),
         "confirmed": 12.5, "media_type": INDEX, "last_access": 2e9 + 1.5, "pinned": 1},
        {"registry": HUB, "repository": "library/b", "tag": "x", "digest": d(1),
         "confirmed": 11.5, "media_type": MANIFEST, "last_access": 2e9 + 0.5, "pinned": 0},
    ])  # fmt: skip


async def test_search_is_a_case_insensitive_literal_substring_in_name_order(index: Index) -> None:
    await index.add_manifest(HUB, "library/alpine", d(1), MANIFEST, 10, [])
    await index.touch_many({d(1): 2e9})
    await index.pin(HUB, "x", "y", {d(1)})
    names = [
        (HUB, "library/alpine", "3.19"), (HUB, "library/alpine", "Latest"),
        (HUB, "library/my_app", "v1"), (HUB, "library/myxapp", "v1"),
        (HUB, "library/pct", "100%"), (HUB, "library/pct", "1000"),
        ("ghcr.io", "back\\slash", "t"), ("ghcr.io", "caf\u00e9", "v1"),
    ]  # fmt: skip
    for registry, repository, tag in names:
        await index.set_tag(registry, repository, tag, d(1) if "alpine" in repository else d(2), 1)

    async def found(text: str, offset: int = 0, limit: int = 100) -> tuple[int, list[str]]:
        total, rows = await index.search_images(text, offset, limit)
        return total, [f"{r.registry}/{r.repository}:{r.tag}" for r in rows]

    assert await found("ALPINE:l") == (1, ["docker.io/library/alpine:Latest"])
    assert await found("my_app") == (1, ["docker.io/library/my_app:v1"])  # `_` is no wildcard
    assert await found("100%") == (1, ["docker.io/library/pct:100%"])  # nor is `%`
    assert await found("k\\s") == (1, ["ghcr.io/back\\slash:t"])
    assert await found("CAF\u00c9") == (0, [])  # only ASCII letters fold, as in SQLite
    assert await found("caf\u00e9") == (1, ["ghcr.io/caf\u00e9:v1"])
    assert await found("library/", 1, 2) == (
        6, ["docker.io/library/alpine:Latest", "docker.io/library/my_app:v1"]
    )  # fmt: skip
    assert await found("", 6, -1) == (8, ["ghcr.io/back\\slash:t", "ghcr.io/caf\u00e9:v1"])
    assert await found("", -5, 1) == (8, ["docker.io/library/alpine:3.19"])
    _, rows = await index.search_images("alpine:3", 0, 10)
    assert [(r.digest, r.media_type, r.last_access, r.pinned) for r in rows] == [
        (d(1), MANIFEST, 2e9, True)
    ]
    _, rows = await index.search_images("pct:1000", 0, 10)  # a tag whose blob is not indexed
    assert [(r.digest, r.media_type, r.last_access, r.pinned) for r in rows] == [
        (d(2), "", 0.0, False)
    ]


# -- traffic, the rest -----------------------------------------------------------------------------
async def test_traffic_adds_up_per_hour(index: Index) -> None:
    await index.add_traffic(10, Traffic(1, 2, 3, 4))
    await index.add_traffic(10, Traffic(10, 20, 30, 40))
    await index.add_traffic(12, Traffic(cache_bytes=5 * 1024**4))
    await index.add_traffic(9, Traffic(hits=1))
    assert await index.traffic_since(10) == {
        10: Traffic(11, 22, 33, 44), 12: Traffic(5 * 1024**4, 0, 0, 0)
    }  # fmt: skip
    assert list(await index.traffic_since(0)) == [9, 10, 12]
    assert await index.traffic_total() == Traffic(11 + 5 * 1024**4, 22, 34, 44)


async def test_an_empty_index_answers_every_query(index: Index) -> None:
    assert await index.ping() is True
    assert await index.integrity_ok() is True
    assert await index.usage() == (0, 0, 0)
    assert await index.all_blobs() == {}
    assert await index.traffic_total() == Traffic()
    assert await index.traffic_since(0) == {}
    assert await index.images() == []
    assert await index.search_images("", 0, 10) == (0, [])
    assert await index.pinned() == set()
    assert await index.repositories() == []
    assert await index.eviction_candidates(0.0, 10) == []


async def test_a_second_handle_sees_what_the_first_wrote(open_index: OpenIndex) -> None:
    first = await open_index()
    await first.add_manifest(HUB, "r", d(1), MANIFEST, 10, [(d(2), 20)])
    await first.set_tag(HUB, "r", "t", d(1), 5.0)
    await first.close()
    second = await open_index()  # opening again migrates nothing and loses nothing
    assert await second.get_tag(HUB, "r", "t") == TagRow(d(1), 5.0)
    assert await second.closure(d(1)) == {d(1): 10, d(2): 20}
    third = await open_index()
    assert await third.add_blob(d(1), 10, None) is False
    assert await third.all_blobs() == {d(1): 10}


# -- PostgreSQL only: replicas, migrations, outages ------------------------------------------------
async def _migrations(server: PostgresServer, dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn, password=server.password, timeout=10)
    try:
        return [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
    finally:
        await conn.close()


async def test_replicas_starting_together_migrate_once(
    pg_server: PostgresServer, pg_dsn: str
) -> None:
    indexes = await asyncio.gather(
        *(PostgresIndex.open(pg_dsn, password=pg_server.password) for _ in range(4))
    )
    try:
        assert await _migrations(pg_server, pg_dsn) == list(range(1, len(MIGRATIONS) + 1))
        await indexes[0].add_blob(d(1), 1, None)
        assert [await i.get_blob(d(1)) for i in indexes] == [1, 1, 1, 1]
    finally:
        for index in indexes:
            await index.close()


async def test_a_database_migrated_by_a_newer_mirror_is_refused(
    pg_server: PostgresServer, pg_dsn: str
) -> None:
    index = await PostgresIndex.open(pg_dsn, password=pg_server.password)
    await index.close()
    conn = await asyncpg.connect(pg_dsn, password=pg_server.password, timeout=10)
    newer = len(MIGRATIONS) + 1
    await conn.execute("INSERT INTO schema_migrations VALUES ($1, now())", newer)
    await conn.close()
    with pytest.raises(SchemaTooNewError, match=f"schema version {newer}, newer than"):
        await PostgresIndex.open(pg_dsn, password=pg_server.password)


async def test_replicas_writing_at_once_lose_nothing(
    pg_server: PostgresServer, pg_dsn: str
) -> None:
    a = await PostgresIndex.open(pg_dsn, password=pg_server.password)
    b = await PostgresIndex.open(pg_dsn, password=pg_server.password)
    try:
        # The same blob committed by both: exactly one of them added it.
        for n in range(20):
            news = await asyncio.gather(
                *(i.add_blob(d(n), n, None) for i in (a, b, a, b))
            )  # fmt: skip
            assert sorted(news) == [False, False, False, True]
        # Counters added from both sides at once all count.
        await asyncio.gather(*(i.add_traffic(1, Traffic(hits=1)) for i in (a, b) * 50))
        assert await a.traffic_total() == Traffic(hits=100)
        # Overlapping access batches in opposite orders: neither deadlocks. (Batches must be
        # long enough to overlap in time: 2,000 rows locked in the callers' orders deadlocked
        # in about one call of two.)
        digests = [d(n) for n in range(2000)]
        await asyncio.gather(*(a.add_blob(x, 1, None) for x in digests))
        when = time.time() + 100
        for round_ in range(10):
            forward = {x: when + round_ for x in digests}
            backward = {x: when + round_ for x in reversed(digests)}
            await asyncio.gather(
                a.touch_many(forward), b.touch_many(backward),
                a.touch_many(backward), b.touch_many(forward),
            )  # fmt: skip
        assert {row[2] for x in digests if (row := await b.blob_row(x))} == {when + 9}
    finally:
        await a.close()
        await b.close()


@pytest.fixture
def own_pg_server() -> Iterator[PostgresServer]:
    """A server of this test's own: stopping it troubles no other test."""
    with postgres_server() as server:
        yield server


async def test_an_outage_fails_queries_fast_and_the_same_index_recovers(
    own_pg_server: PostgresServer,
) -> None:
    server = own_pg_server
    name = await server.create_database()
    index = await PostgresIndex.open(server.dsn(name), password=server.password, max_size=3)
    try:
        await index.add_blob(d(1), 1, None)
        server.stop()
        started = time.monotonic()
        assert await index.ping() is False
        with pytest.raises(PostgresIndexError):
            await index.get_blob(d(1))
        with pytest.raises(PostgresIndexError):
            await index.add_blob(d(2), 2, None)
        assert time.monotonic() - started < 2
        server.start()
        assert await index.ping() is True
        assert await index.get_blob(d(1)) == 1
        assert await index.add_blob(d(2), 2, None) is True
    finally:
        await index.close()


async def test_a_database_that_never_answers_fails_open_within_the_connect_timeout() -> None:
    with socket.socket() as silent:  # accepts TCP connections, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(PostgresIndexError, match="TimeoutError"):
            await PostgresIndex.open(f"postgresql://mirror@127.0.0.1:{port}/db", connect_timeout=1)
        assert time.monotonic() - started < 3


async def test_errors_never_show_the_password(pg_server: PostgresServer, pg_dsn: str) -> None:
    # A wrong password, given apart and in the DSN.
    bad = "not-the-Password-123"
    with pytest.raises(PostgresIndexError, match="password authentication failed") as caught:
        await PostgresIndex.open(pg_dsn, password=bad)
    assert bad not in str(caught.value) and caught.value.__context__ is None
    in_dsn = pg_dsn.replace("mirror@", f"mirror:{bad}@")
    with pytest.raises(PostgresIndexError) as caught:
        await PostgresIndex.open(in_dsn)
    assert bad not in str(caught.value)
    # A `/` left unescaped: asyncpg reads `mirror:hunter2` as host and port, and says so.
    with pytest.raises(PostgresIndexError, match="invalid PostgreSQL DSN") as caught:
        await PostgresIndex.open(f"postgresql://mirror:hunter2/x@127.0.0.1:{pg_server.port}/db")
    assert "hunter2" not in str(caught.value) and caught.value.__context__ is None
