"""Tiny ASGI HTTP helpers (responses and body reading) used by negotiate and the transports."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = [
    "ASGIApp",
    "Receive",
    "Scope",
    "Send",
    "abort_transport",
    "close_frame_received",
    "read_body",
    "respond",
]


class BodyTooLarge(Exception):
    """The request body exceeded the allowed size."""


class ClientGone(Exception):
    """The client disconnected while we were reading its request."""


async def respond(
    send: Send,
    status: int,
    body: bytes = b"",
    content_type: str | None = "text/plain",
    headers: Iterable[tuple[str, str]] = (),
) -> None:
    """Send a complete response with an explicit Content-Length."""
    raw: list[tuple[bytes, bytes]] = []
    if content_type is not None:
        raw.append((b"content-type", content_type.encode("latin-1")))
    if status not in (204, 304):  # these must not carry a Content-Length (RFC 9110 8.6)
        raw.append((b"content-length", str(len(body)).encode("ascii")))
    raw.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def abort_transport(send: Send) -> bool:
    """Drop the connection behind an ASGI ``send`` at once, when the server exposes its transport.

    uvicorn's ``send`` callables are bound methods of objects holding the asyncio transport. Used
    for slow consumers: a graceful close would wait for a client that does not read. False when
    the server does not expose it.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    if not callable(abort):
        return False
    abort()
    return True


def close_frame_received(receive: Receive, disconnect: Message) -> bool:
    """Whether a WebSocket ended with the peer's Close frame rather than a dropped socket.

    Stateful reconnect keeps a connection whose socket dropped, never one the
    client closed. ASGI cannot say which: uvicorn reports a lost socket as
    1005, the code of a Close frame without a status too. Its ``receive`` is a
    bound method of the protocol holding the ``websockets`` state, which knows;
    elsewhere only 1006 ("abnormal closure") is taken as a dropped socket.
    """
    state = getattr(getattr(receive, "__self__", None), "conn", None)
    if state is not None and hasattr(state, "close_rcvd"):
        close: object = state.close_rcvd
        return close is not None
    code: object = disconnect.get("code", 1005)
    return code != 1006


async def read_body(receive: Receive, limit: int | None = None) -> bytes:
    """The whole request body; raises :class:`BodyTooLarge` past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if limit is not None and size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
