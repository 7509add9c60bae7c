"""A node's door for app servers: the ``/server/?hub=H`` WebSocket that becomes a link.

The app server shows a token signed with the access key; its first frame is the
handshake, then frames flow both ways until either side goes. Frames are bounded
(``max_frame``); a frame that breaks the protocol drops the link, and every client
connection pinned to it moves (``ServiceClients.link_closed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..auth import bearer_token
from ..connections.connection import RequestInfo
from ..http import Receive, Scope, Send
from ..protocol.service import (
    VERSION,
    HandshakeRequest,
    HandshakeResponse,
    ServiceFrameParser,
    ServiceProtocolError,
    encode_frame,
)
from ..transports.websocket import reject_websocket
from .node import NodeLink, ServiceClients
from .tokens import check_access_key, verify

__all__ = ["LinkAcceptor"]

log = logging.getLogger("hubwire.service")

#: an app server that sends nothing (not even its 5-second ping), or reads nothing, for this long is gone
LINK_TIMEOUT = 30.0
#: the whole handshake of a link (its first frame) comes within this
HANDSHAKE_TIMEOUT = 10.0


def _link_ended(reader: asyncio.Task[None], writer: asyncio.Task[None]) -> None:
    """Why a link's reader or writer stopped: raise its error (a clean disconnect returns)."""
    if reader.done():
        reader.result()
        return
    writer.result()
    raise ServiceProtocolError("the node closed the link")


class LinkAcceptor:
    """ASGI app for app-server links (WebSocket only)."""

    def __init__(self, clients: ServiceClients, access_key: str, max_frame: int = 16 * 1024 * 1024) -> None:
        self.clients = clients
        self.access_key = check_access_key(access_key)
        self.max_frame = max_frame
        self.links = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = RequestInfo.from_scope(scope)
        hub = request.query_param("hub") or ""
        token = bearer_token(request)
        if not hub or token is None or verify(self.access_key, token, "server", hub) is None:
            await reject_websocket(scope, receive, send, 401, "Unauthorized")
            return
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        parser = ServiceFrameParser(self.max_frame)
        try:
            first = await asyncio.wait_for(self._handshake(receive, parser), HANDSHAKE_TIMEOUT)
        except (ServiceProtocolError, TimeoutError) as exc:
            log.warning("app-server link refused: %s", exc or "no handshake in time")
            await send({"type": "websocket.close", "code": 1002})
            return
        if first is None:
            return
        if first.version != VERSION:
            log.warning("app-server link refused: it speaks version %s", first.version)
            error = f"This node speaks version {VERSION} of the link protocol, not {first.version}."
            await send({"type": "websocket.send", "bytes": encode_frame(HandshakeResponse(error))})
            await send({"type": "websocket.close", "code": 1002})
            return
        await self._serve(first, hub, parser, receive, send)

    async def _handshake(self, receive: Receive, parser: ServiceFrameParser) -> HandshakeRequest | None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return None
            data = message.get("bytes")
            if data is None:
                raise ServiceProtocolError("a link carries binary frames only")
            frames = parser.feed(data)
            if frames:
                first = frames[0]
                if not isinstance(first, HandshakeRequest) or len(frames) > 1:
                    raise ServiceProtocolError("the first frame of a link is its handshake, alone")
                return first

    async def _serve(
        self, first: HandshakeRequest, hub_name: str, parser: ServiceFrameParser, receive: Receive, send: Send
    ) -> None:
        server = first.ext.get("server")
        server_id = server[:200] if isinstance(server, str) and server else "unnamed"

        async def write(data: bytes) -> None:
            # an app server that stops reading stalls this: past LINK_TIMEOUT the link is dropped
            async with asyncio.timeout(LINK_TIMEOUT):
                await send({"type": "websocket.send", "bytes": data})

        try:
            hub = await self.clients.hub(hub_name)
        except Exception:  # the hub's lifetime manager could not start (the backplane is down)
            log.exception("app-server link %s for hub %s refused", server_id, hub_name)
            await send({"type": "websocket.close", "code": 1011})
            return
        link = NodeLink(server_id, hub_name, write)
        try:
            await write(encode_frame(HandshakeResponse(None, {"node": "hubwire"})))
        except (OSError, TimeoutError):  # gone (or not reading) before its link was up
            return
        hub.links.append(link)
        self.links += 1
        loop = asyncio.get_running_loop()
        writer = loop.create_task(link.writer(), name=f"link {server_id}")
        reader = loop.create_task(self._read(link, parser, receive), name=f"link reader {server_id}")
        log.info("app server %s linked for hub %s", server_id, hub_name)
        try:
            await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
            _link_ended(reader, writer)
        except (ServiceProtocolError, TimeoutError, OSError) as exc:
            log.warning("app-server link %s dropped: %s", server_id, exc or "it stopped reading")
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1002})
        except Exception:
            log.exception("app-server link %s failed", server_id)
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1011})
        finally:
            self.links -= 1
            self.clients.link_closed(link)
            for task in (reader, writer):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            log.info("app server %s unlinked from hub %s", server_id, hub_name)

    async def _read(self, link: NodeLink, parser: ServiceFrameParser, receive: Receive) -> None:
        on_frame = self.clients.on_frame
        while True:
            message = await asyncio.wait_for(receive(), LINK_TIMEOUT)
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                raise ServiceProtocolError("a link carries binary frames only")
            for frame in parser.feed(data):
                on_frame(link, frame)
