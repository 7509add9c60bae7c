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

Sockets that negotiated permessage-deflate get each record at or above the
compression threshold as a compressed message of its own, compressed once per
loop iteration for every such socket through the same memo (the extension is
negotiated without context takeover, so one compressed frame fits them all);
smaller records go out uncompressed, as on other sockets.

Used by :mod:`hubwire.transports.native`; without it the ASGI path is used,
with identical behaviour.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..protocol.base import TransferFormat
from ..protocol.websocket import compress_frame, encode_frame

if TYPE_CHECKING:
    from ..connections.connection import Connection
    from ..connections.outbox import Outbox

__all__ = ["CompressionStats", "DirectSink", "compression_stats"]

log = logging.getLogger("hubwire.websocket")

_BINARY_FORMAT = TransferFormat.BINARY


class CompressionStats:
    """permessage-deflate in this process (native serving), read by the stats and metrics."""

    __slots__ = ("bytes_saved", "compressions", "frames", "inflated", "negotiated")

    def __init__(self) -> None:
        #: WebSockets that negotiated permessage-deflate
        self.negotiated = 0
        #: records compressed: once per broadcast, however many sockets it went to
        self.compressions = 0
        #: compressed frames written to sockets
        self.frames = 0
        #: bytes those frames saved on the wire against uncompressed frames
        self.bytes_saved = 0
        #: compressed messages received from clients and inflated
        self.inflated = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


compression_stats = CompressionStats()


def _head_size(size: int) -> int:
    return 2 if size < 126 else 4 if size < 65536 else 10


def _framed(payload: bytes, binary: bool, memo: dict[int, tuple[bytes, bytes]] | None) -> bytes:
    """An uncompressed frame of ``payload``, built once per loop iteration for every socket."""
    key = id(payload) * 2 + binary
    entry = memo.get(key) if memo is not None else None
    if entry is not None and entry[0] is payload:
        return entry[1]
    data = encode_frame(payload, binary)
    if memo is not None:
        memo[key] = (payload, data)
    return data


def _compressed(payload: bytes, binary: bool, memo: dict[int, tuple[bytes, bytes]] | None) -> bytes:
    """A compressed frame of ``payload`` (built once per loop iteration for every deflate socket),
    or b"" when compressing does not make it smaller."""
    key = -1 - (id(payload) * 2 + binary)  # negative: never an uncompressed frame's key
    entry = memo.get(key) if memo is not None else None
    if entry is not None and entry[0] is payload:
        data = entry[1]
    else:
        compression_stats.compressions += 1
        data = compress_frame(payload, binary)
        if len(data) >= len(payload) + _head_size(len(payload)):
            data = b""
        if memo is not None:
            memo[key] = (payload, data)
    if data:
        compression_stats.frames += 1
        compression_stats.bytes_saved += len(payload) + _head_size(len(payload)) - len(data)
    return data


def _deflate_frames(
    chunks: list[bytes], binary: bool, threshold: int, memo: dict[int, tuple[bytes, bytes]] | None
) -> bytes:
    """Frames for a deflate socket: each record over the threshold a compressed message of its
    own (so it can be shared), the records between them coalesced uncompressed."""
    frames: list[bytes] = []
    plain: list[bytes] = []

    def coalesce() -> None:
        if len(plain) == 1:
            frames.append(_framed(plain[0], binary, memo))
        elif plain:
            frames.append(encode_frame(b"".join(plain), binary))
        plain.clear()

    for chunk in chunks:
        frame = _compressed(chunk, binary, memo) if len(chunk) >= threshold else b""
        if frame:
            coalesce()
            frames.append(frame)
        else:
            plain.append(chunk)
    coalesce()
    return frames[0] if len(frames) == 1 else b"".join(frames)


class DirectSink:
    """Writes one connection's outbound records straight to its WebSocket transport.

    The outbox calls :meth:`flush` once per loop iteration when it has records
    (see ``hubwire.connections.outbox._flush_dirty``), with a frame memo shared by every
    socket flushed in that pass. ``compress_threshold``: the socket negotiated
    permessage-deflate, and records this size or larger go out compressed.
    """

    __slots__ = ("_conn", "_proto", "_threshold")

    def __init__(self, proto: Any, conn: Connection, compress_threshold: int | None = None) -> None:
        self._proto = proto
        self._conn = conn
        self._threshold = compress_threshold
        if compress_threshold is not None:
            compression_stats.negotiated += 1

    def flush(self, outbox: Outbox, memo: dict[int, tuple[bytes, bytes]] | None = None) -> None:
        chunks = outbox.take_nowait()
        if not chunks:
            return
        proto = self._proto
        transport = proto.transport
        if proto.close_sent or transport is None or transport.is_closing():
            return
        binary = self._conn.transfer_format is _BINARY_FORMAT
        threshold = self._threshold
        if threshold is not None:
            if len(chunks) == 1:  # the usual case: one broadcast record
                payload = chunks[0]
                data = _compressed(payload, binary, memo) if len(payload) >= threshold else b""
                if not data:
                    data = _framed(payload, binary, memo)
            else:
                data = _deflate_frames(chunks, binary, threshold, memo)
        elif len(chunks) == 1:
            data = _framed(chunks[0], binary, memo)
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
