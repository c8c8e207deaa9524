"""The README's first command, exactly as written, in a clean copy of the repository.

It runs with a stock Debian PATH (so `python3` is Debian's, which refuses a bare `pip install`
under PEP 668) and pip pointed at the wheelhouse `.ci/run` prepared (the namespace has no
network). It must install and then serve with the embedded defaults: the registry on
0.0.0.0:5000 (only loopback exists in the namespace) and the admin API on 127.0.0.1:5001.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from tests.fixtures.offline import ROOT, clean_copy, offline_pip_env, prepared
from tests.fixtures.procs import spawn, wait_http

pytestmark = pytest.mark.e2e

STOCK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def readme_first_command(readme: Path) -> str:
    """Line 1 of the README's first ```sh block."""
    found = re.search(r"^```sh\n(.*)$", readme.read_text(), re.MULTILINE)
    assert found, f"{readme} has no ```sh block"
    return found.group(1)


def assert_free(host: str, port: int) -> None:
    """Nothing else may answer where the README's mirror should: the test would pass on it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT is no listener
        s.bind((host, port))


async def stop_group(proc: asyncio.subprocess.Process, timeout: float = 30) -> bool:
    """SIGTERM to the command's whole process group (shell, supervisor, workers), as Ctrl-C
    would; True if all of it was gone within `timeout`, else it is killed and False."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return True
            await asyncio.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return False
    finally:
        await proc.wait()


async def test_readme_first_command_installs_and_serves_with_embedded_defaults(
    tmp_path: Path,
) -> None:
    wheelhouse = prepared("MIRROR_TEST_WHEELHOUSE")
    command = readme_first_command(ROOT / "README.md")
    assert "mirror serve" in command
    assert_free("0.0.0.0", 5000)
    assert_free("127.0.0.1", 5001)
    repo = clean_copy(tmp_path / "mirror")
    env = {**offline_pip_env(wheelhouse), "PATH": STOCK_PATH}
    log = tmp_path / "readme-command.log"
    proc = await spawn(["sh", "-c", command], log, cwd=repo, env=env, start_new_session=True)
    try:
        try:
            await wait_http("http://127.0.0.1:5000/v2/", proc, timeout=300)
            await wait_http("http://127.0.0.1:5001/healthz", proc)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}\n{log.read_text(errors='replace')[-4000:]}") from e
        async with aiohttp.ClientSession() as http:
            async with http.get("http://127.0.0.1:5000/v2/") as resp:
                assert resp.status == 200
                assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
            async with http.get("http://127.0.0.1:5000/readyz") as resp:
                assert (resp.status, await resp.text()) == (200, "ready\n")
        assert (repo / "mirror-data" / "index.db").is_file()  # the default ./mirror-data
    finally:
        stopped = await stop_group(proc)
    assert stopped, "mirror serve did not stop within 30 s of SIGTERM"
    assert_free("0.0.0.0", 5000)  # it was this command's mirror that answered
