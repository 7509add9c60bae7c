"""Direct outbound writes for natively served WebSockets: pre-framed frames straight to the socket.

Why: through plain ASGI every recipient of a broadcast costs one
``await send({"type": "websocket.send", ...})`` - a coroutine step, a dict,
and the server re-framing the same payload for each socket (measured ~1.7x the
cost of a direct transport write). In native mode outbound data frames bypass
all of that:

* a connection's :class:`~hubwire.connections.outbox.Outbox` gets a *sink*; ``write``
  appends and marks the outbox dirty (no await, no task);
* once per event-loop iteration the outbox hands each dirty socket's
  pending records as **one** frame (coalescing bursts), and a frame built for
  one bytes object is reused for every socket in that iteration, so a
  broadcast is framed once per protocol, not once per recipient;
* a socket whose unsent bytes are still past the outbox bound when more data
  arrives is closed as a slow consumer instead of growing memory (at most the
  bound plus one loop iteration's writes are ever held for a client).

Used by :mod:`hubwire.transports.native`; without it the ASGI path is used,
with identical behaviour.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..protocol.base import TransferFormat
from ..protocol.websocket import encode_frame

if TYPE_CHECKING:
    from ..connections.connection import Connection
    from ..connections.outbox import Outbox

__all__ = ["DirectSink"]

log = logging.getLogger("hubwire.websocket")

_BINARY_FORMAT = TransferFormat.BINARY


class DirectSink:
    """Writes one connection's outbound records straight to its WebSocket transport.

    The outbox calls :meth:`flush` once per loop iteration when it has records
    (see ``hubwire.connections.outbox._flush_dirty``), with a frame memo shared by every
    socket flushed in that pass.
    """

    __slots__ = ("_conn", "_proto")

    def __init__(self, proto: Any, conn: Connection) -> None:
        self._proto = proto
        self._conn = conn

    def flush(self, outbox: Outbox, memo: dict[int, tuple[bytes, bytes]] | None = None) -> None:
        chunks = outbox.take_nowait()
        if not chunks:
            return
        proto = self._proto
        transport = proto.transport
        if proto.close_sent or transport is None or transport.is_closing():
            return
        binary = self._conn.transfer_format is _BINARY_FORMAT
        if len(chunks) == 1:
            payload = chunks[0]
            key = id(payload) * 2 + binary
            entry = memo.get(key) if memo is not None else None
            if entry is not None and entry[0] is payload:
                data = entry[1]
            else:
                data = encode_frame(payload, binary)
                if memo is not None:
                    memo[key] = (payload, data)
        else:
            data = encode_frame(b"".join(chunks), binary)
        limit = outbox.max_buffered
        if limit is not None:
            # what earlier writes left unsent is still over the bound: the client is not reading.
            # (A burst written within one loop iteration does not count against a client that
            # reads: the bound applies to what is still unsent when more arrives.)
            backlog = transport.get_write_buffer_size()
            if backlog > limit:
                self._conn.close_slow(f"{backlog} bytes unsent")
                return
        transport.write(data)

    def closed(self) -> None:
        """The application closed the connection (after the last flush)."""
        hook = getattr(self._proto, "app_closed", None)
        if hook is not None:
            hook()
