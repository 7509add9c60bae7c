"""SignalR's default timeouts, pinned: every other live test overrides them.

ASP.NET Core SignalR's defaults are 15 s keep-alive, 30 s client timeout, 15 s handshake timeout,
15 s disconnect timeout (HttpConnectionDispatcherOptions) and a 90 s long-poll timeout. The options
must default to them, a default server must use them where they are read (the hub handler, the
connection manager, the long-polling transport, the 30 s token window), and three of them are
checked live against a server started without options, at once so the test takes their 15 s only
once: the first keep-alive ping to an idle connection, the end of a connection that never sends its
handshake, and the disposal of a negotiated connection nobody uses. The 30 s client timeout and the
90 s poll timeout are checked where the server reads them instead of being waited out.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from hubwire import Hub, HubOptions, HubServer

from .conftest import ServerProcess
from .hwtools import APP, negotiate, wait_stats
from .rawhub import RS, RawHub, open_ws, ws_url

KEEP_ALIVE, CLIENT_TIMEOUT, HANDSHAKE_TIMEOUT, DISCONNECT_TIMEOUT, LONG_POLL_TIMEOUT = 15, 30, 15, 15, 90
#: a live timer fires at the heartbeat (about once a second) after it is due; what is left is slack
#: for a loaded machine (and tells these defaults apart from any other whole number of seconds)
LATE = 5.0


def test_options_default_to_signalr() -> None:
    options = HubOptions()
    assert options.keep_alive_interval == KEEP_ALIVE
    assert options.client_timeout_interval == CLIENT_TIMEOUT
    assert options.handshake_timeout == HANDSHAKE_TIMEOUT
    assert options.disconnect_timeout == DISCONNECT_TIMEOUT
    assert options.long_poll_timeout == LONG_POLL_TIMEOUT
    assert options.maximum_receive_message_size == 32 * 1024


def test_a_default_server_uses_them(monkeypatch: Any) -> None:
    monkeypatch.delenv("HUBWIRE_REDIS_URL", raising=False)  # an in-memory server, whatever the shell has
    server = HubServer()
    endpoint = server.add_hub("/hub", Hub)
    # what the hub handler's heartbeat reads (keep-alive, client and handshake timeouts) and what the
    # long-polling transport reads for its poll timeout: the endpoint's options
    opts = endpoint.options
    assert (opts.keep_alive_interval, opts.client_timeout_interval, opts.handshake_timeout) == (
        KEEP_ALIVE,
        CLIENT_TIMEOUT,
        HANDSHAKE_TIMEOUT,
    )
    assert opts.long_poll_timeout == LONG_POLL_TIMEOUT
    # the connection manager sweeps after the disconnect timeout; a token starts a connection within
    # 30 s (tests/test_tokens.py checks that window live)
    assert server.connections.disconnect_timeout == DISCONNECT_TIMEOUT
    assert server.connections.issuer.max_age == 30


async def test_default_timers_live(start_server: Any) -> None:
    hubs: ServerProcess = start_server(APP)  # no HW_OPTIONS: HubOptions() as is
    sweeps: ServerProcess = start_server(APP)  # alone, so its connection count is that one connection

    async def first_ping() -> float:
        started = time.monotonic()  # the handshake answer, the last send before the ping, comes later
        hub = RawHub(await open_ws(ws_url(hubs.url)), "json")
        assert await hub.handshake("json") == {}
        message = await hub.next_message(timeout=KEEP_ALIVE + LATE + 5, skip_pings=False)
        took = time.monotonic() - started
        assert message == {"type": 6}
        await hub.close()
        return took

    async def handshake_canceled() -> float:
        started = time.monotonic()  # before the upgrade: the server's handshake clock starts later
        ws = await open_ws(ws_url(hubs.url))
        answer = await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT + LATE + 5)
        took = time.monotonic() - started
        assert answer == json.dumps({"error": "Handshake was canceled."}, separators=(",", ":")) + RS
        await ws.close()
        return took

    async def unused_disposed() -> float:
        started = time.monotonic()  # before negotiate: the connection is inactive from then on
        assert (await negotiate(sweeps.url)).status_code == 200
        await wait_stats(sweeps.url, lambda s: s["connections"] == 1, 5, "the negotiated connection")
        await wait_stats(
            sweeps.url, lambda s: s["connections"] == 0, DISCONNECT_TIMEOUT + LATE + 5, "its disposal"
        )
        return time.monotonic() - started

    ping, canceled, disposed = await asyncio.gather(first_ping(), handshake_canceled(), unused_disposed())
    # never before the default (each measured from before the server could start its clock), and not
    # as late as another default would be
    assert KEEP_ALIVE <= ping < KEEP_ALIVE + LATE, ping
    assert HANDSHAKE_TIMEOUT <= canceled < HANDSHAKE_TIMEOUT + LATE, canceled
    assert DISCONNECT_TIMEOUT <= disposed < DISCONNECT_TIMEOUT + LATE, disposed
