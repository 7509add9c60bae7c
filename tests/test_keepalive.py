"""Keep-alive pings, client timeout, handshake timeout and parallel-invocation limit (digest section 4).

The server runs ``tests.apps.short_timeouts:app``: keep-alive 1 s, client timeout 2 s, handshake
timeout 2 s, at most one running invocation per client (the default). Waits are bounded generously
(the server heartbeat has 1 s granularity); ordering is asserted, never tight wall-clock thresholds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import ServerProcess
from .rawhub import RS, RawHub, open_ws, ws_url

APP = "tests.apps.short_timeouts:app"
KEEP_ALIVE = 1.0  # tests.apps.short_timeouts' keep_alive_interval
TIMEOUT_TEXT = "Connection closed with an error."
DETAIL = (
    " OperationCanceledException: Client hasn't sent a message/ping within the configured "
    "ClientTimeoutInterval."
)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess(APP)
    yield proc
    proc.close()


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_idle_client_receives_pings(server: ServerProcess, protocol: str) -> None:
    hub = await RawHub.open(server.url, protocol=protocol)
    pings = 0
    async with asyncio.timeout(8):
        while pings < 3:
            message = await hub.next_message(skip_pings=False)
            assert hub.kind(message) == 6, message
            pings += 1
    if protocol == "json":
        assert hub.frame_types and all(t is str for t in hub.frame_types)
    else:
        assert hub.frame_types and all(t is bytes for t in hub.frame_types)
    await hub.close()


async def test_ping_bytes_on_the_wire(server: ServerProcess) -> None:
    for protocol, expected in (("json", '{"type":6}' + RS), ("messagepack", b"\x02\x91\x06")):
        ws = await open_ws(ws_url(server.url))
        await ws.send(f'{{"protocol":"{protocol}","version":1}}' + RS)
        async with asyncio.timeout(8):
            handshake = await ws.recv()
            assert handshake in ("{}" + RS, b"{}" + RS.encode())
            assert await ws.recv() == expected
        await ws.close()


async def test_pings_only_when_idle(server: ServerProcess) -> None:
    """A ping goes out only when the server sent nothing else for the keep-alive interval (1 s).

    The connection gets a completion about every 0.4 s. Rather than expect no ping at all (a loaded
    machine may stall longer than the interval, and then a ping is right), every ping is checked
    against a lower bound of the server's last send before it: a completion was sent no earlier than
    its invocation was, and a ping no earlier than the interval after the send before it. A ping is
    wrong if it arrives sooner than the interval after that bound.
    """
    hub = RawHub(await open_ws(ws_url(server.url)), "json")
    last_send = time.monotonic()  # the handshake response is sent after this
    assert await hub.handshake("json") == {}
    for i in range(8):
        sent = time.monotonic()
        await hub.send(hub.invocation("echo", [str(i)], str(i)))
        while True:
            message = await hub.next_message(skip_pings=False)
            if message["type"] == 6:
                arrived = time.monotonic()
                assert arrived - last_send >= KEEP_ALIVE - 0.05, (i, arrived - last_send)
                last_send += KEEP_ALIVE  # the server's time of this ping is no earlier than that
                continue
            assert message == {"type": 3, "invocationId": str(i), "result": str(i)}
            last_send = max(last_send, sent)
            break
        await asyncio.sleep(0.4)
    await hub.close()


@pytest.mark.parametrize(("path", "error"), [("/hub", TIMEOUT_TEXT), ("/detailed", TIMEOUT_TEXT + DETAIL)])
async def test_client_timeout_after_first_ping(server: ServerProcess, path: str, error: str) -> None:
    hub = await RawHub.open(server.url, path=path)
    await hub.send({"type": 6})
    started = time.monotonic()
    close = await hub.expect_close_message(timeout=10)
    elapsed = time.monotonic() - started
    assert close["error"].startswith(TIMEOUT_TEXT)
    assert close == {"type": 7, "error": error, "allowReconnect": True}
    await hub.expect_closed()
    assert elapsed >= 1.5  # not before the 2 s client timeout (heartbeat granularity is 1 s)


async def test_client_timeout_messagepack(server: ServerProcess) -> None:
    hub = await RawHub.open(server.url, protocol="messagepack")
    await hub.send([6])
    close = await hub.expect_close_message(timeout=10)
    assert close == [7, TIMEOUT_TEXT, True]
    await hub.expect_closed()


async def test_client_that_never_pings_is_not_timed_out(server: ServerProcess) -> None:
    hub = await RawHub.open(server.url)
    pings = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0  # 2.5 x the client timeout
    while loop.time() < deadline:
        try:
            message = await hub.next_message(timeout=deadline - loop.time(), skip_pings=False)
        except TimeoutError:
            break
        assert message == {"type": 6}, message  # never a Close
        pings += 1
    assert pings >= 2
    assert await hub.invoke("echo", "still here") == "still here"
    await hub.close()


async def test_client_that_keeps_pinging_stays(server: ServerProcess) -> None:
    hub = await RawHub.open(server.url)
    for _ in range(10):  # 5 s of pings every 0.5 s
        await hub.send({"type": 6})
        await asyncio.sleep(0.5)
    assert await hub.invoke("echo", "alive") == "alive"
    await hub.close()


async def test_any_message_resets_the_timeout(server: ServerProcess) -> None:
    hub = await RawHub.open(server.url)
    await hub.send({"type": 6})  # arms the timeout
    for i in range(8):  # invocations alone, no more pings, for ~4 s
        assert await hub.invoke("echo", str(i)) == str(i)
        await asyncio.sleep(0.5)
    # and then silence: closed
    close = await hub.expect_close_message(timeout=10)
    assert close["error"] == TIMEOUT_TEXT
    await hub.expect_closed()


async def test_no_handshake_is_canceled(server: ServerProcess) -> None:
    started = time.monotonic()  # before the upgrade: the server's handshake clock starts after this
    hub = RawHub(await open_ws(ws_url(server.url)), "json")
    response = await hub.handshake_response()
    assert response == {"error": "Handshake was canceled."}
    assert time.monotonic() - started >= 2.0  # never before the 2 s handshake timeout
    await hub.expect_closed()


async def test_incomplete_handshake_is_canceled(server: ServerProcess) -> None:
    hub = RawHub(await open_ws(ws_url(server.url)), "json")
    await hub.send_raw('{"protocol":"json",')
    response = await hub.handshake_response()
    assert response == {"error": "Handshake was canceled."}
    await hub.expect_closed()


async def test_one_invocation_at_a_time(server: ServerProcess) -> None:
    hub = await RawHub.open(server.url)
    # both sent back to back; the second must not start before the first ended
    first = hub.encode(hub.invocation("slow", ["a", 600], "a"))
    second = hub.encode(hub.invocation("slow", ["b", 10], "b"))
    assert isinstance(first, str) and isinstance(second, str)
    await hub.send_raw(first + second)
    completions: list[Any] = []
    while len(completions) < 2:
        message = await hub.next_message()
        if message["type"] == 3:
            completions.append(message)
    assert [c["invocationId"] for c in completions] == ["a", "b"]
    assert [c["result"] for c in completions] == ["a", "b"]
    assert await hub.invoke("get_log") == ["start a", "end a", "start b", "end b"]
    await hub.close()


async def test_invocations_of_different_clients_run_in_parallel(server: ServerProcess) -> None:
    """The limit is per client: another connection's invocation is not queued behind it."""
    first = await RawHub.open(server.url)
    second = await RawHub.open(server.url)
    await first.send(first.invocation("slow", ["long", 3000], "1"))
    await asyncio.sleep(0.2)  # a head start, so the first call is running when the second comes
    # answered while the first client's invocation is still running: before the first completes
    assert await second.invoke("echo", "quick") == "quick"
    with pytest.raises(TimeoutError):
        await first.next_message(timeout=0.1)  # nothing from the first connection yet
    message = await first.next_message(timeout=10)
    assert message == {"type": 3, "invocationId": "1", "result": "long"}
    await first.close()
    await second.close()
