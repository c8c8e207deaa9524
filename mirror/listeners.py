"""Binding the listen addresses: first, before any work, and failing with one clear line.

A mirror must not start on a port something else serves. Two traps make that easy to miss:

- Workers bind with SO_REUSEPORT, so a second mirror's workers would *join* a running mirror's
  port (the kernel allows it for the same user) and take half its connections, with a cache of
  their own. So the supervisor first binds a probe socket *without* SO_REUSEPORT: that fails
  with EADDRINUSE whoever listens there, another mirror included. It sets SO_REUSEADDR, like
  every listener, so connections of a previous run waiting out TIME_WAIT do not stop a restart.
- While no worker listens (at start, or while one restarts), a probe would find the port free.
  So the supervisor keeps a socket bound with SO_REUSEPORT (and without SO_REUSEADDR) for its
  lifetime, never listening, so it is handed no connections: its workers can still join it,
  but any later probe fails on it.

A mirror probing in the very microseconds another one probes could still pass: the window is
that of two starts at once, and a lock shared by every possible mirror does not exist.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any


class ListenError(Exception):
    """An address the mirror cannot listen on; the message is the one line a user sees."""


def _addresses(host: str, port: int) -> Iterator[tuple[int, Any]]:
    """The addresses asyncio's create_server would bind for `host` (one per family/address)."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    seen = set()
    for family, _, _, _, address in infos:
        if (family, address) not in seen:
            seen.add((family, address))
            yield family, address


def _socket(family: int, *, reuse_address: bool, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if reuse_address:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:  # as asyncio does: "::" means IPv6 only
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


def _refusal(setting: str, host: str, port: int, exc: OSError) -> ListenError:
    reason = exc.strerror
    if exc.errno == errno.EADDRINUSE:
        reason = "address already in use (another process, or another mirror, serves it)"
    return ListenError(f"cannot listen on {host}:{port} ({setting}): {reason}")


def bind(host: str, port: int, setting: str, *, reuse_port: bool) -> list[socket.socket]:
    """Bound sockets for `host:port`, ready for `create_server(sock=...)` (which listens).

    Raises ListenError naming `setting` if the address cannot be had."""
    sockets: list[socket.socket] = []
    try:
        for family, address in _addresses(host, port):
            sock = _socket(family, reuse_address=True, reuse_port=reuse_port)
            sockets.append(sock)
            sock.bind(address)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise _refusal(setting, host, port, exc) from None
    return sockets


def probe(host: str, port: int, setting: str) -> None:
    """Raise ListenError if anyone, even an SO_REUSEPORT group, has `host:port`."""
    for sock in bind(host, port, setting, reuse_port=False):
        sock.close()


def hold(host: str, port: int, setting: str) -> list[socket.socket]:
    """Probe `host:port`, then keep it from later probes (see the module docstring)."""
    probe(host, port, setting)
    held: list[socket.socket] = []
    try:
        for family, address in _addresses(host, port):
            sock = _socket(family, reuse_address=False, reuse_port=True)
            held.append(sock)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                # TIME_WAIT connections of a previous single-process run (no SO_REUSEPORT):
                # hold with SO_REUSEADDR too; the workers' listeners then do the guarding.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
    except OSError as exc:
        for sock in held:
            sock.close()
        raise _refusal(setting, host, port, exc) from None
    return held
