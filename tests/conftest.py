"""Shared fixtures: the fake Docker Hub, an in-process mirror on loopback, an HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from mirror.admin import create_admin_app
from mirror.app import create_app
from mirror.config import Config, RegistryConfig
from mirror.reference import DOCKER_HUB
from tests.fixtures.backends import BACKENDS, Backend, backend, pg_server
from tests.fixtures.fakehub import FakeHub
from tests.fixtures.seaweed import seaweed, seaweed_dir
from tests.fixtures.webhooks import receiver

__all__ = [
    "backend",
    "pg_server",
    "receiver",
    "seaweed",
    "seaweed_dir",
]  # fixtures, for every test module

StartMirror = Callable[..., Awaitable[TestServer]]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends(*names): run this module's backend tests on each (local, s3)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`backend` (and so `start_mirror`) is parametrised by the `backends` mark: the module's
    tests run once per backend it names; unmarked, on the default only."""
    if "backend" not in metafunc.fixturenames:
        return
    mark = metafunc.definition.get_closest_marker("backends")
    names = tuple(mark.args) if mark is not None else ("local",)
    unknown = set(names) - set(BACKENDS)
    if unknown:
        raise pytest.UsageError(f"unknown backend(s): {sorted(unknown)}")
    metafunc.parametrize("backend", names, indirect=True, ids=[f"on-{n}" for n in names])


StartAdmin = Callable[[TestServer], Awaitable[TestServer]]


@pytest.fixture
async def hub() -> AsyncIterator[FakeHub]:
    fake = await FakeHub().start()
    yield fake
    await fake.stop()


def mirror_config(
    data: Path,
    upstream: str,
    *,
    tag_ttl: float = 300.0,
    username: str | None = None,
    password: str | None = None,
    token_realms: tuple[str, ...] = (),
    negative_ttl: float = 30.0,
    max_size: int = 20 * 1024**3,
    registries: tuple[RegistryConfig, ...] = (),
    private: str = "deny",
    max_upstream_fetches: int = 32,
    upstream_read_timeout: float = 30.0,
    **settings: object,
) -> Config:
    """A loopback mirror's Config; `settings` are further Config fields (web_ui, webhooks...)."""
    hub = RegistryConfig(DOCKER_HUB, upstream, username, password, tag_ttl, token_realms, private)
    return Config(
        listen_host="127.0.0.1",
        listen_port=0,
        data_dir=data,
        registries={DOCKER_HUB: hub, **{r.name: r for r in registries}},
        negative_ttl=negative_ttl,
        max_size=max_size,
        max_upstream_fetches=max_upstream_fetches,
        upstream_read_timeout=upstream_read_timeout,
        **settings,  # type: ignore[arg-type]
    )


@pytest.fixture
def start_mirror(backend: Backend, aiohttp_server: AiohttpServer, tmp_path: Path) -> StartMirror:
    """Start a mirror in this test's event loop, on the test's backend; stopped with the test."""

    async def start(upstream: str, *, data: Path | None = None, **kw: object) -> TestServer:
        kw = {**backend.config, **kw}
        config = mirror_config(data or tmp_path / "mirror-data", upstream, **kw)  # type: ignore[arg-type]
        return await aiohttp_server(await create_app(config), host="127.0.0.1")

    return start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        auto_decompress=False, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        yield session


@pytest.fixture
def start_admin(aiohttp_server: AiohttpServer) -> StartAdmin:
    """The admin API of an in-process mirror, on its own loopback port."""

    async def start(mirror: TestServer) -> TestServer:
        return await aiohttp_server(create_admin_app(mirror.app), host="127.0.0.1")

    return start
