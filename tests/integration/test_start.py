"""Starting: the mirror binds before it announces itself, a port already served stops the start
with one line and a non-zero exit, and a worker that cannot start stops the mirror."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.fakehub import FakeHub
from tests.fixtures.procs import free_port, mirror_process, spawn, stop, worker_pids


def listening_socket(port: int) -> socket.socket:
    """Something else serving `port`: a plain listening socket, no SO_REUSEPORT."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def plain_listener(port: int) -> Iterator[socket.socket]:
    with listening_socket(port) as sock:
        yield sock


async def serve_until_exit(*args: str, timeout: float = 10) -> tuple[int, list[str], float]:
    """`mirror serve ARGS` run to its end: exit code, stderr lines, seconds it took."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mirror", "serve", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"mirror serve {' '.join(args)} still ran after {timeout}s") from None
    assert proc.returncode is not None
    return proc.returncode, err.decode().splitlines(), time.monotonic() - started


def addresses(tmp_path: Path, listen: int, admin: int) -> list[str]:
    return ["--listen", f"127.0.0.1:{listen}", "--admin-listen", f"127.0.0.1:{admin}",
            "--data", str(tmp_path / "second"), "--upstream", "http://127.0.0.1:9"]  # fmt: skip


@pytest.mark.parametrize("workers", ["2", "1"])
async def test_a_port_something_else_serves_stops_the_start_with_one_line(
    tmp_path: Path, workers: str
) -> None:
    port = free_port()
    with plain_listener(port):
        code, lines, took = await serve_until_exit(
            *addresses(tmp_path, port, free_port()), "--workers", workers
        )
    print(f"workers {workers}: exited {code} after {took:.2f}s")
    assert code != 0
    assert len(lines) == 1, lines
    assert f"127.0.0.1:{port} (listen): address already in use" in lines[0]


@pytest.mark.parametrize("workers", ["2", "1"])
async def test_the_admin_port_held_stops_the_start(tmp_path: Path, workers: str) -> None:
    admin = free_port()
    with plain_listener(admin):
        code, lines, took = await serve_until_exit(
            *addresses(tmp_path, free_port(), admin), "--workers", workers
        )
    print(f"workers {workers}: exited {code} after {took:.2f}s")
    assert code != 0
    assert len(lines) == 1, lines
    assert f"127.0.0.1:{admin} (admin_listen): address already in use" in lines[0]


async def test_a_second_mirror_on_a_running_mirrors_port_stops_and_the_first_serves_all(
    hub: FakeHub, tmp_path: Path
) -> None:
    async with mirror_process(tmp_path / "first", hub.registry_url, "--workers", "2") as first:
        port = int(first.url.rsplit(":", 1)[1])
        for workers in ("2", "1"):
            code, lines, took = await serve_until_exit(
                *addresses(tmp_path, port, free_port()), "--workers", workers
            )
            print(f"second mirror, workers {workers}: exited {code} after {took:.2f}s")
            assert code != 0 and len(lines) == 1, lines
            assert "address already in use" in lines[0]

        async def status() -> int:  # each on its own connection: the kernel spreads them
            async with aiohttp.ClientSession() as http, http.get(f"{first.url}/v2/") as resp:
                return resp.status

        assert await asyncio.gather(*(status() for _ in range(64))) == [200] * 64


async def test_listening_is_announced_once_every_worker_serves(
    hub: FakeHub, tmp_path: Path
) -> None:
    port, admin = free_port(), free_port()
    log = tmp_path / "mirror.log"
    argv = [sys.executable, "-m", "mirror", "serve", "--listen", f"127.0.0.1:{port}",
            "--admin-listen", f"127.0.0.1:{admin}", "--data", str(tmp_path / "data"),
            "--upstream", hub.registry_url, "--workers", "2"]  # fmt: skip
    proc = await spawn(argv, log)
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in log.read_text():
            assert proc.returncode is None and time.monotonic() < deadline
            await asyncio.sleep(0.005)

        async def status(url: str) -> int:
            async with aiohttp.ClientSession() as http, http.get(url) as resp:
                return resp.status

        urls = [f"http://127.0.0.1:{port}/v2/"] * 16 + [f"http://127.0.0.1:{admin}/healthz"]
        assert await asyncio.gather(*(status(url) for url in urls)) == [200] * len(urls)
    finally:
        await stop(proc)


async def test_a_worker_that_cannot_start_again_stops_the_mirror_instead_of_looping(
    hub: FakeHub, tmp_path: Path
) -> None:
    async with mirror_process(tmp_path / "data", hub.registry_url, "--workers", "2") as mirror:
        admin = int(mirror.admin.rsplit(":", 1)[1])
        os.kill(worker_pids(mirror.proc.pid)[0], signal.SIGKILL)  # worker 0 serves the admin API
        for _ in range(100):  # until the dead worker's admin listener is gone
            try:
                holder = listening_socket(admin)
                break
            except OSError:
                await asyncio.sleep(0.01)
        else:
            raise AssertionError("the admin port stayed busy after worker 0 died")
        with holder:
            code = await asyncio.wait_for(mirror.proc.wait(), 20)
    assert code == 1
    assert (
        f"mirror: worker 0 failed to start: cannot listen on 127.0.0.1:{admin} (admin_listen)"
        in mirror.logs()
    )
