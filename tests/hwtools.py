"""Helpers of the hardening tests: raw sockets, stats polling, negotiate, bounded waits."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

APP = "tests.apps.hardening:app"
RS = b"\x1e"


def options_env(**options: Any) -> dict[str, str]:
    """The environment that gives tests.apps.hardening these HubOptions."""
    return {"HW_OPTIONS": json.dumps(options)}


async def stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        response = await client.get("/debug/stats")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.1
) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_stats(
    url: str, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> dict[str, Any]:
    """Poll the server's stats until ``predicate`` holds; return them."""
    last: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal last
        last = await stats(url)
        return predicate(last)

    try:
        await wait_for(check, timeout, what, 0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last stats: {last}") from None
    return last


async def negotiate(url: str, path: str = "/hub", version: int = 1, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        return await client.post(
            f"{path}/negotiate", params={"negotiateVersion": str(version)}, headers=headers
        )


def upgrade_request(port: int, path: str = "/hub", query: str = "", extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    target = f"{path}?{query}" if query else path
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode("latin-1")


def masked(payload: bytes, opcode: int = 0x1, fin: bool = True, mask: bytes | None = None) -> bytes:
    """A client (masked) WebSocket frame."""
    mask = os.urandom(4) if mask is None else mask
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = bytes((first, 0x80 | size))
    elif size < 65536:
        head = bytes((first, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + size.to_bytes(8, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def read_head(sock: socket.socket, timeout: float = 5.0) -> tuple[int, bytes]:
    """Read an HTTP response head from a raw socket: (status, bytes after the head)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    line = head.split(b"\r\n", 1)[0].split()
    return (int(line[1]) if len(line) > 1 and line[1].isdigit() else 0), rest


def raw_hub_socket(
    port: int, query: str = "", rcvbuf: int | None = None, protocol: str = "json"
) -> socket.socket:
    """A raw-socket hub connection (upgrade + handshake sent, 101 checked); reads nothing else."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(upgrade_request(port, query=query))
    status, _ = read_head(sock)
    assert status == 101, status
    sock.sendall(masked(json.dumps({"protocol": protocol, "version": 1}).encode() + RS))
    return sock


#: how long a server may keep a slow consumer's WebSocket after closing its connection: native serving
#: drops it after hubwire's websocket_close_timeout, but under ASGI serving, once its Close frame is out,
#: uvicorn's own close timeout (10 s, not configurable) waits for the client's Close frame, which a
#: client that stopped reading never sends
SLOW_WEBSOCKET_DROPPED_WITHIN = 15.0


def socket_closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Drain ``sock`` until the server closes it (EOF or reset); False if still open at ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not sock.recv(1 << 16):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def unexpected_tracebacks(log: str, on_purpose: tuple[str, ...] = ("Boom",)) -> list[str]:
    """The tracebacks in a server's log, less those of hub methods that fail on purpose.

    A hub method that raises is logged at ERROR with its traceback (a bug of the hub, as far as
    the server knows); test apps raise ``Boom`` (or the hardening app's ``RuntimeError: boom``) to
    check what clients get, so those are expected: ``on_purpose`` names exception classes or whole
    exception lines. Returns the exception line of every other traceback.
    """
    unexpected = []
    for block in log.split("Traceback (most recent call last):")[1:]:
        # the exception line is the first one that is not indented (the frames are)
        line = next((x for x in block.splitlines() if x.strip() and not x.startswith((" ", "\t"))), "")
        name = line.split(":", 1)[0].rsplit(".", 1)[-1]
        if name not in on_purpose and line not in on_purpose:
            unexpected.append(line or block[:200])
    return unexpected
