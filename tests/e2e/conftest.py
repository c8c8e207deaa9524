"""End-to-end tests drive real clients, which fall back to the public registries when the
mirror fails: they run only where nothing can leave the machine."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(autouse=True)
def private_network() -> None:
    outside = [name for _index, name in socket.if_nameindex() if name != "lo"]
    if outside:
        message = f"e2e tests need a private network namespace (.ci/run); found {outside}"
        if os.environ.get("CI"):
            raise RuntimeError(message)
        pytest.skip(message)
