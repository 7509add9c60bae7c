"""The Prometheus endpoint of a live server: scraped before and after real traffic, the counters move as
they must (connections by transport and protocol, messages in and out, invocations and their errors,
rate-limited calls, refused origins, slow-consumer closes, backplane publishes / receipts / buffer /
drops / reconnects across a Redis outage)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from .conftest import RedisServer, ServerProcess
from .hwtools import (
    APP,
    SLOW_WEBSOCKET_DROPPED_WITHIN,
    negotiate,
    options_env,
    raw_hub_socket,
    socket_closed_by_peer,
    stats,
    unexpected_tracebacks,
    wait_for,
)
from .rawhub import RawHub

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
HUB = (("hub", "HardHub"), ("path", "/hub"))
HANDSHAKE = b'{"protocol":"json","version":1}\x1e'


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _lookup(samples: Samples, name: str, labels: tuple[tuple[str, str], ...]) -> float:
    """The sample's value; a missing metric or label set fails (it must never read as 0)."""
    key = (name, labels)
    if key not in samples:
        present = sorted(dict(k[1]) for k in samples if k[0] == name)
        raise AssertionError(f"no sample {name}{dict(labels)}; label sets present: {present}")
    return samples[key]


def value(samples: Samples, name: str, **labels: str) -> float:
    return _lookup(samples, name, tuple(sorted(labels.items())))


def hub(samples: Samples, name: str) -> float:
    return _lookup(samples, name, HUB)


async def wait_scrape(url: str, predicate: Callable[[Samples], bool], timeout: float, what: str) -> Samples:
    """Scrape until ``predicate`` holds; fail (showing the hubwire samples) after ``timeout`` seconds."""
    last: Samples = {}

    async def check() -> bool:
        nonlocal last
        last = await scrape(url)
        return predicate(last)

    try:
        await wait_for(check, timeout, what)
    except AssertionError as exc:
        shown = {f"{n}{dict(labels)}": v for (n, labels), v in last.items() if n.startswith("hubwire_")}
        raise AssertionError(f"{exc}; last scrape: {json.dumps(shown)}") from None
    return last


@pytest.fixture
def server(start_server: Any, private_redis: RedisServer) -> ServerProcess:
    options = options_env(
        max_invocations_per_second=50,
        invocation_burst=50,
        allowed_origins=["http://good.example"],
        max_buffered_bytes=64 * 1024,
        websocket_close_timeout=1,
    )
    proc: ServerProcess = start_server(
        APP,
        args=["--redis", private_redis.url, "--channel-prefix", "Metrics:"],
        env={**options, "HUBWIRE_BACKPLANE_BUFFER": "5"},
    )
    return proc


@pytest.fixture
async def http(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        yield client


async def test_metrics_move(
    server: ServerProcess, http: httpx.AsyncClient, private_redis: RedisServer
) -> None:
    url = server.url
    before = await scrape(url)
    assert value(before, "hubwire_connections_registered") == 0
    assert value(before, "hubwire_backplane_connected") == 1
    assert value(before, "process_resident_memory_bytes") > 10e6
    assert value(before, "hubwire_asyncio_tasks") > 0
    assert value(before, "hubwire_connections_refused_total", reason="max_connections") == 0
    assert value(before, "hubwire_connections_refused_total", reason="origin") == 0

    # connections over every transport and both protocols
    json_a, json_b = await RawHub.open(url), await RawHub.open(url)
    packed = await RawHub.open(url, protocol="messagepack")
    sse_token = (await negotiate(url)).json()["connectionToken"]
    sse = http.stream("GET", "/hub", params={"id": sse_token}, headers={"accept": "text/event-stream"})
    sse_response = await sse.__aenter__()
    assert (await http.post("/hub", params={"id": sse_token}, content=HANDSHAKE)).status_code == 200
    lp_token = (await negotiate(url)).json()["connectionToken"]
    assert (await http.get("/hub", params={"id": lp_token})).status_code == 200
    assert (await http.post("/hub", params={"id": lp_token}, content=HANDSHAKE)).status_code == 200
    expected = {
        ("WebSockets", "json"): 2,
        ("WebSockets", "messagepack"): 1,
        ("ServerSentEvents", "json"): 1,
        ("LongPolling", "json"): 1,
    }

    def connections(samples: Samples) -> dict[tuple[str, str], float]:
        return {
            (dict(labels)["transport"], dict(labels)["protocol"]): n
            for (name, labels), n in samples.items()
            if name == "hubwire_connections"
        }

    # the SSE and long-polling handshakes are POSTed: connected once the server has read them
    during = await wait_scrape(url, lambda s: connections(s) == expected, 10, "five connected clients")
    assert value(during, "hubwire_connections_registered") == 5
    assert hub(during, "hubwire_connections_opened_total") == 5

    # invocations, errors, rate limiting
    for i in range(10):
        assert await json_a.invoke("echo", i) == i
    for _ in range(2):
        failed = await json_a.invoke_raw("fail")
        assert "error" in failed
    assert "error" in await json_a.invoke_raw("no_such_method")
    # 80 calls at once against a bucket of 50 refilling at 50/s: at least the burst succeeds, and at
    # most what refilled while they were processed (a loaded machine only allows more)
    frame = "".join(str(json_b.encode(json_b.invocation("echo", [i], f"r{i}"))) for i in range(80))
    started = time.monotonic()
    await json_b.send_raw(frame)
    answered = limited_seen = 0
    while answered < 80:
        message = await json_b.next_message()
        if message.get("type") == 3:
            answered += 1
            limited_seen += "rate limit" in message.get("error", "")
    elapsed = time.monotonic() - started
    assert 50 <= 80 - limited_seen <= 50 + 50 * elapsed, (limited_seen, elapsed)
    # broadcasts through Redis
    for seq in range(5):
        assert (await http.post(f"/broadcast/{seq}")).status_code == 200
    for client in (json_a, json_b, packed):
        got = 0
        while got < 5:
            message = await client.next_message()
            kind = client.kind(message)
            got += kind == 1
    # everyone leaves (SSE by closing its stream, long polling by DELETE)
    await sse.__aexit__(None, None, None)
    assert sse_response.status_code == 200
    assert (await http.delete("/hub", params={"id": lp_token})).status_code == 202
    for client in (json_a, json_b, packed):
        await client.close()
    await wait_scrape(
        url, lambda s: value(s, "hubwire_connections_registered") == 0, 10, "every connection to be disposed"
    )
    # a refused origin
    assert (await negotiate(url, origin="http://evil.example")).status_code == 403
    # a slow consumer: a client that stops reading while 6 MB are broadcast
    slow = raw_hub_socket(server.port, rcvbuf=4096)
    await wait_scrape(url, lambda s: connections(s) == {("WebSockets", "json"): 1}, 10, "the slow client")
    for _ in range(30):
        assert (await http.post("/blast", params={"count": 5, "size": 40000})).status_code == 200
        await asyncio.sleep(0.02)
    assert socket_closed_by_peer(slow, SLOW_WEBSOCKET_DROPPED_WITHIN), (
        await stats(url),
        server.output()[-3000:],
    )
    slow.close()

    def delta(samples: Samples, name: str) -> float:
        return value(samples, name) - value(before, name)

    # the slow consumer is gone and every blast came back from Redis (the instance receives its own)
    after = await wait_scrape(
        url,
        lambda s: (
            value(s, "hubwire_connections_registered") == 0
            and hub(s, "hubwire_connections_closed_total") == 6
            and delta(s, "hubwire_backplane_received_total") >= 5 + 30 * 5
        ),
        10,
        "the slow consumer's close and every blast received from Redis",
    )

    def hub_delta(name: str) -> float:
        return hub(after, name) - hub(before, name)

    assert hub_delta("hubwire_invocations_total") == 10 + 2 + 1 + 80
    limited = hub_delta("hubwire_invocations_rate_limited_total")
    assert limited == limited_seen  # what the metric counts is what the client was refused
    assert hub_delta("hubwire_invocation_errors_total") == 2 + 1 + limited
    assert hub_delta("hubwire_messages_received_total") >= 93
    assert delta(after, "hubwire_messages_sent_total") >= 93 + 5 * 5  # completions, broadcasts to five
    assert delta(after, "hubwire_sent_bytes_total") > 20000
    assert value(after, "hubwire_connections_refused_total", reason="origin") == 1
    assert value(after, "hubwire_connections_refused_total", reason="max_connections") == 0
    assert value(after, "hubwire_slow_consumer_closes_total") == 1
    assert not any(name == "hubwire_connections" for name, _ in after)
    # broadcasts and blasts all go through Redis
    assert delta(after, "hubwire_backplane_published_total") >= 5 + 30 * 5
    # what the server reports subscribing is what Redis counts: its own channels (everyone left)
    with redis.Redis.from_url(private_redis.url) as r:
        channels = r.pubsub_channels("Metrics:*")
        assert channels
        assert not any(b":connection:" in c for c in channels)
        assert value(after, "hubwire_backplane_subscriptions") == sum(
            n for _, n in r.pubsub_numsub(*channels)
        )
    # a publish waits in the buffer from publish() until Redis answered: more than nothing, and
    # less than the publisher's command timeout (5 s) with Redis up
    assert 0 < value(after, "hubwire_backplane_publish_lag_seconds") < 5

    # a Redis outage: sends wait in the buffer (5 here), overflow is dropped and counted, reconnects
    private_redis.kill()

    async def both_links_down() -> bool:
        health = (await stats(url))["backplane"]
        return not health["publisher_connected"] and not health["subscriber_connected"]

    await wait_for(both_links_down, 15, "the backplane to notice Redis is gone")
    for seq in range(12):
        assert (await http.post(f"/broadcast/{100 + seq}")).status_code == 200
    down = await scrape(url)
    assert value(down, "hubwire_backplane_connected") == 0
    assert value(down, "hubwire_backplane_buffered") == 5
    assert value(down, "hubwire_backplane_dropped_total") == 7
    # 12 envelopes of about one size (their sequence numbers may differ by a byte): 5 kept, 7 dropped
    kept = value(down, "hubwire_backplane_buffered_bytes")
    dropped = value(down, "hubwire_backplane_dropped_bytes_total")
    assert kept > 0 and 0.9 * 7 / 5 < dropped / kept < 1.1 * 7 / 5, (kept, dropped)
    assert value(down, "hubwire_backplane_nodes") == 1
    await wait_scrape(
        url,
        lambda s: value(s, "hubwire_backplane_lease_failures_total") >= 1,
        10,
        "a lease refresh to fail while Redis is down",
    )
    private_redis.start()
    up = await wait_scrape(
        url,
        lambda s: (
            value(s, "hubwire_backplane_connected") == 1
            and value(s, "hubwire_backplane_buffered") == 0
            and value(s, "hubwire_backplane_reconnects_total", link="subscriber") >= 1
        ),
        15,
        "the backplane to reconnect and flush its buffer",
    )
    assert value(up, "hubwire_backplane_reconnects_total", link="publisher") >= 1
    assert unexpected_tracebacks(server.output(), ("RuntimeError: boom",)) == []  # HardHub.fail
