"""The slow-consumer guard of the ASGI transports (WebSockets in ASGI mode, Server-Sent Events).

Why: a client that stops reading leaves the transport's writer stuck in
``send()`` behind a full socket buffer, and a graceful close would wait for
that same client. When the outbox bound is crossed the connection is closed
as a slow consumer; if the close has not finished after the close timeout,
the socket is dropped (uvicorn exposes its transport behind ``send``), and
failing that ``fallback`` runs (the WebSocket writer cancels its stuck send).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..connections.connection import Connection
from ..http import Send, abort_transport

__all__ = ["SlowConsumerGuard"]


class SlowConsumerGuard:
    """Armed on one connection for the life of its transport request."""

    __slots__ = ("_conn", "_fallback", "_gone", "_send", "_timeout", "_timer")

    def __init__(
        self,
        conn: Connection,
        send: Send,
        timeout: float,
        gone: asyncio.Event,
        fallback: Callable[[], None] | None = None,
    ) -> None:
        self._conn = conn
        self._send = send
        self._timeout = timeout
        self._gone = gone
        self._fallback = fallback
        self._timer: asyncio.TimerHandle | None = None
        conn.outbox.on_overflow = self._overflow

    def _overflow(self) -> None:
        self._conn.close_slow(f"{self._conn.outbox.buffered} bytes unsent")
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._drop)

    def _drop(self) -> None:
        if self._gone.is_set() or abort_transport(self._send):
            return
        if self._fallback is not None:
            self._fallback()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
