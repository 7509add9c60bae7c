"""The connection service against hostile or broken peers.

A real node process (``hubwire service``) and raw app-server links opened by the test with the
access key: a malformed frame or a link of another version gets a clear refusal and the node
carries on; tokens of the wrong kind or hub are refused at the door; a big send keeps its link;
a client piling up calls is closed past a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from hubwire.protocol.messagepack_protocol import write_varint
from hubwire.protocol.service import (
    BroadcastData,
    HandshakeRequest,
    HandshakeResponse,
    Ping,
    ServiceFrame,
    ServiceFrameParser,
    encode_frame,
)
from hubwire.service.acceptor import HANDSHAKE_TIMEOUT
from hubwire.service.applink import ServiceLinks
from hubwire.service.tokens import client_audience, client_token, link_token
from tests.conftest import ServerProcess

KEY = "security-test-access-key-0123456789abcdef"


@pytest.fixture
def node() -> Iterator[ServerProcess]:
    server = ServerProcess("", env={"HUBWIRE_SERVICE_ACCESS_KEY": KEY}, command="service")
    try:
        yield server
    finally:
        server.close()


def _ws_url(node: ServerProcess, hub: str = "chat") -> str:
    return node.url.replace("http", "ws", 1) + f"/server/?hub={hub}"


@contextlib.asynccontextmanager
async def raw_link(
    node: ServerProcess, hub: str = "chat", token: str | None = None
) -> AsyncIterator[ClientConnection]:
    token = token if token is not None else link_token(KEY, node.url, hub)
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(_ws_url(node, hub), additional_headers=headers, max_size=None, open_timeout=10) as ws:
        yield ws


async def _frames(ws: ClientConnection, parser: ServiceFrameParser) -> list[ServiceFrame]:
    return parser.feed(bytes(await asyncio.wait_for(ws.recv(decode=False), 10)))


async def _linked(node: ServerProcess, ws: ClientConnection) -> ServiceFrameParser:
    await ws.send(encode_frame(HandshakeRequest(ext={"server": "raw"})))
    parser = ServiceFrameParser()
    (answer,) = await _frames(ws, parser)
    assert isinstance(answer, HandshakeResponse) and answer.error is None
    return parser


async def _closed_with(ws: ClientConnection, within: float = 10) -> int | None:
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(within):
            while True:
                await ws.recv()
    assert ws.close_code is not None
    return ws.close_code


async def _still_linked(node: ServerProcess, ws: ClientConnection, parser: ServiceFrameParser) -> None:
    """The link is up: the node's own keep-alive comes (it pings every 5 seconds)."""
    frames = await asyncio.wait_for(_frames(ws, parser), 10)
    assert frames and all(isinstance(f, Ping) for f in frames), frames


async def test_tokens_of_another_kind_or_hub_cannot_open_a_link(node: ServerProcess) -> None:
    wrong = [
        client_token(KEY, client_audience(node.url, "chat"), None),  # a client's token
        link_token(KEY, node.url, "other"),  # another hub's link
        link_token(KEY + "x", node.url, "chat"),  # another key
        link_token(KEY, node.url, "chat", lifetime=-10),  # expired
        "",
    ]
    for token in wrong:
        with pytest.raises(InvalidStatus) as refused:
            async with raw_link(node, "chat", token or "x"):
                pass
        assert refused.value.response.status_code == 401


async def test_a_frame_nested_too_deep_drops_only_its_link(node: ServerProcess) -> None:
    async with raw_link(node) as other:
        other_parser = await _linked(node, other)
        async with raw_link(node) as ws:
            await _linked(node, ws)
            body = b"\x91" * 100_000 + b"\xc0"
            await ws.send(write_varint(len(body)) + body)
            assert await _closed_with(ws) == 1002  # a protocol error, not a crash (1011)
        await _still_linked(node, other, other_parser)
    assert "Traceback" not in node.output()


async def test_a_link_of_another_version_is_refused_with_a_reason(node: ServerProcess) -> None:
    async with raw_link(node) as ws:
        await ws.send(encode_frame(HandshakeRequest(2, {"server": "future"})))
        (answer,) = await _frames(ws, ServiceFrameParser())
        assert isinstance(answer, HandshakeResponse) and answer.error and "version 1" in answer.error
        assert await _closed_with(ws) == 1002


async def test_a_text_message_or_a_frame_before_the_handshake_is_refused(node: ServerProcess) -> None:
    async with raw_link(node) as ws:
        await ws.send("hello")
        assert await _closed_with(ws) == 1002
    async with raw_link(node) as ws:
        await ws.send(encode_frame(Ping()))
        assert await _closed_with(ws) == 1002
    async with raw_link(node) as ws:
        await ws.send(write_varint(64 * 1024 * 1024))  # a frame over the bound, from its prefix alone
        assert await _closed_with(ws) == 1002


async def test_a_big_send_of_an_app_server_keeps_its_link(node: ServerProcess) -> None:
    links = ServiceLinks([node.url], KEY, "big-sender")
    links.add_hub("chat", cast(Any, None))  # no client connects: the endpoint is never called
    (link,) = links.links["chat"]
    link.start()
    try:
        await asyncio.wait_for(link.ready.wait(), 10)
        ws = link._ws
        link.send(BroadcastData([], {"json": b"x" * 100 * 1024}))
        await asyncio.sleep(1.0)
        assert link._ws is ws, "a 100 KiB send dropped the link"
        link.send(BroadcastData([], {"json": b"x" * 200 * 1024}))
        await asyncio.sleep(2.0)
        assert link._ws is ws, "a 200 KiB send dropped the link"
    finally:
        await link.stop()


@contextlib.asynccontextmanager
async def app_server(node: ServerProcess) -> AsyncIterator[ServerProcess]:
    env = {"HUBWIRE_SERVICE_ACCESS_KEY": KEY, "HUBWIRE_SERVICE_SERVER_ID": "A"}
    server = ServerProcess("tests.apps.service_app:app", args=["--service", node.url], env=env)
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            for _ in range(150):  # up to 15 s for its link to the node
                if (await http.get(f"{server.url}/debug/links")).json()["links_up"] == 1:
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"the app server did not link: {server.output()[-2000:]}")
        yield server
    finally:
        server.close()


async def _client_through_node(app: ServerProcess) -> ClientConnection:
    """A raw JSON-protocol client, negotiated at the app server and sent to the node."""
    async with httpx.AsyncClient(timeout=5) as http:
        redirect = (await http.post(f"{app.url}/chat/negotiate?negotiateVersion=1")).json()
        url, token = redirect["url"], redirect["accessToken"]
        base, _, query = url.partition("?")
        headers = {"Authorization": f"Bearer {token}"}
        negotiated = (
            await http.post(f"{base.rstrip('/')}/negotiate?{query}&negotiateVersion=1", headers=headers)
        ).json()
    ws_url = f"{base.replace('http', 'ws', 1)}?{query}&id={negotiated['connectionToken']}"
    ws = await connect(ws_url, additional_headers=headers, max_size=None, open_timeout=10)
    await ws.send('{"protocol":"json","version":1}\x1e')
    assert await asyncio.wait_for(ws.recv(), 10) == "{}\x1e"
    return ws


async def test_a_client_piling_up_calls_is_closed_past_a_bound(node: ServerProcess) -> None:
    async with app_server(node) as app:
        ws = await _client_through_node(app)
        try:
            await ws.send('{"type":1,"invocationId":"0","target":"slow","arguments":[20000]}\x1e')
            pad = "x" * 1000
            for n in range(1, 4001):  # 4 MB of calls queued behind the slow one
                await ws.send(f'{{"type":1,"invocationId":"{n}","target":"echo","arguments":["{pad}"]}}\x1e')
            assert await _closed_with(ws) is not None
        finally:
            await ws.close()


async def test_a_link_without_a_handshake_is_closed_after_the_handshake_deadline(node: ServerProcess) -> None:
    async with raw_link(node) as ws:
        await ws.send(b"\x05\x95")  # the start of a frame, never finished
        assert await _closed_with(ws, HANDSHAKE_TIMEOUT + 5) == 1002
