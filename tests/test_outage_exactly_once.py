"""Every client gets every send exactly once, in the sender's order, through Redis outages.

Three real ``hubwire run`` instances on one private redis-server, clients over raw WebSockets
(``RawHub``). Sends are made on instance 1; its own clients get them at once (even with Redis down),
the other instances' clients when Redis carries them, and nobody twice: the sender drops its own
copy when it comes back, and receivers drop repeats of a batch the bus published again.

Delivery times are printed (``-s`` shows them) and bounded by the assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import redis

from tests.conftest import RedisServer
from tests.test_scaleout import Cluster, RawHub, negotiate, new_prefix, open_hub

Got = tuple[str, str]  # (kind, value) of a "Message"


class Inbox:
    """Reads one client's messages in the background: what arrived, and when."""

    def __init__(self, tag: str, hub: RawHub) -> None:
        self.tag = tag
        self.hub = hub
        self.got: list[Got] = []
        self.at: dict[Got, float] = {}
        self.task = asyncio.get_running_loop().create_task(self._read(), name=f"inbox {tag}")

    async def _read(self) -> None:
        while True:
            message = await self.hub.next(timeout=3600)
            if message.get("type") == 1 and message.get("target") == "Message":
                item = (str(message["arguments"][0]), str(message["arguments"][1]))
                self.got.append(item)
                self.at.setdefault(item, time.monotonic())

    def values(self, prefix: str) -> list[Got]:
        return [g for g in self.got if g[1].startswith(prefix)]


async def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, state: Callable[[], Any]
) -> float:
    """Polls ``predicate`` (bounded); returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {state()}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@contextlib.asynccontextmanager
async def clients(group: Cluster, per_instance: int, join: str | None) -> AsyncIterator[list[list[Inbox]]]:
    """``per_instance`` clients on each instance; the first of each joins ``join``."""
    inboxes: list[list[Inbox]] = []
    async with contextlib.AsyncExitStack() as stack:
        try:
            for i, url in enumerate(group.urls, 1):
                row = []
                for k in range(per_instance):
                    token = (await negotiate(url, 1))["connectionToken"]
                    hub = await stack.enter_async_context(open_hub(url, token))
                    await hub.invoke("Whoami")
                    if join is not None and k == 0:
                        await hub.invoke("JoinGroup", join)
                    inbox = Inbox(f"i{i}c{k}", hub)
                    row.append(inbox)
                inboxes.append(row)
            yield inboxes
        finally:
            for inbox in (x for row in inboxes for x in row):
                inbox.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await inbox.task


async def barrier(http: httpx.AsyncClient, url: str, everyone: list[Inbox]) -> None:
    """A last send from the sender: once it arrived, nothing it sent before can still be on its way
    (one sender's messages arrive in order); then a short quiet wait for strays."""
    await http.post(f"{url}/publish/barrier", timeout=5)
    await wait_until(
        lambda: all(("http", "barrier") in x.got for x in everyone),
        15.0,
        "the barrier on every client",
        lambda: {x.tag: x.got[-3:] for x in everyone},
    )
    await asyncio.sleep(0.3)


def health(group: Cluster) -> list[dict[str, Any]]:
    return [httpx.get(f"{url}/health", timeout=5).json() for url in group.urls]


async def test_sends_during_a_redis_outage_local_at_once_remote_after_each_once(
    private_redis: RedisServer,
) -> None:
    """redis-server SIGKILLed; instance 1 sends 20 to all and 20 to a group (interleaved): its own
    clients have them within 1 s each; after Redis restarts on the same port every client on every
    instance has exactly its 20 (or 40) in order within 15 s, and nothing more."""
    group = Cluster(private_redis.url, new_prefix("once"), 3)
    try:
        async with clients(group, 2, join="room") as rows, httpx.AsyncClient() as http:
            everyone = [x for row in rows for x in row]
            sender = group.urls[0]
            await http.post(f"{sender}/publish/warmup", timeout=5)
            await wait_until(
                lambda: all(("http", "warmup") in x.got for x in everyone), 10.0, "the warm-up", lambda: None
            )
            private_redis.kill()
            await wait_until(
                lambda: all(
                    not h["publisher_connected"] and not h["subscriber_connected"] for h in health(group)
                ),
                10.0,
                "every instance to notice the outage",
                lambda: health(group),
            )
            sent: dict[Got, float] = {}
            for i in range(20):
                sent[("http", f"s-all-{i}")] = time.monotonic()
                assert (await http.post(f"{sender}/publish/s-all-{i}", timeout=2)).status_code == 200
                sent[("group", f"s-grp-{i}")] = time.monotonic()
                assert (await http.post(f"{sender}/group/room/s-grp-{i}", timeout=2)).status_code == 200
            member = list(sent)
            others = [g for g in member if g[0] == "http"]
            want = {x.tag: member if x is row[0] else others for row in rows for x in row}
            local = rows[0]
            await wait_until(
                lambda: all(x.values("s-") == want[x.tag] for x in local),
                1.0 + (time.monotonic() - min(sent.values())),
                "instance 1's clients to have its sends while Redis is down",
                lambda: {x.tag: x.values("s-") for x in local},
            )
            latencies = [x.at[g] - sent[g] for x in local for g in want[x.tag]]
            assert max(latencies) < 1.0, latencies
            assert all(x.values("s-") == [] for row in rows[1:] for x in row), "delivered while Redis is down"
            print(
                f"\nlocal delivery while Redis is down: median {statistics.median(latencies) * 1000:.1f} ms,"
                f" max {max(latencies) * 1000:.1f} ms after each send"
            )

            private_redis.start()
            restarted = time.monotonic()
            took = await wait_until(
                lambda: all(len(x.values("s-")) >= len(want[x.tag]) for x in everyone),
                15.0,
                "every client to have its sends after Redis restarted",
                lambda: {x.tag: len(x.values("s-")) for x in everyone},
            )
            remote_last = max(max(x.at[g] for g in want[x.tag]) for row in rows[1:] for x in row)
            print(
                f"remote clients had all their sends {remote_last - restarted:.2f} s after redis-server "
                f"restarted (every client checked within {took:.2f} s)"
            )
            await barrier(http, sender, everyone)
            for x in everyone:
                assert x.values("s-") == want[x.tag], f"{x.tag}: {x.values('s-')}"
                assert x.got[-1] == ("http", "barrier") and x.got.count(("http", "barrier")) == 1, x.got
        states = health(group)
        assert all(h["state"] == "connected" and h["buffered"] == 0 and h["dropped"] == 0 for h in states), (
            states
        )
        print(f"duplicates dropped per instance: {[h['duplicates_dropped'] for h in states]}")
    except BaseException:
        print(group.logs())
        raise
    finally:
        group.close()


async def test_debug_sleep_in_a_stream_of_1000_sends_no_duplicate_no_loss() -> None:
    """``DEBUG SLEEP 4`` on redis-server while instance 1 sends 1,000 messages to all (paced, so some
    are sent before, during and after the sleep): every client on the three instances gets the 1,000
    exactly once, in order.

    A slow Redis causes no re-publishing: the bus's watchdog notices the silence (3 s) but a fresh
    connection is not answered either, so the connections are kept and what was written on them is
    answered when Redis wakes up: nothing is published twice (no repeat reaches any instance) and
    nothing fails."""
    server = RedisServer(options=("--enable-debug-command", "yes"))
    group: Cluster | None = None
    try:
        group = Cluster(server.url, new_prefix("sleep"), 3)
        async with clients(group, 2, join=None) as rows, httpx.AsyncClient() as http:
            everyone = [x for row in rows for x in row]
            sender = group.urls[0]
            want = [("http", f"n-{i}") for i in range(1000)]
            asleep: asyncio.Future[Any] | None = None
            sent: dict[Got, float] = {}
            started = time.monotonic()
            for i in range(1000):
                if i == 300:
                    asleep = asyncio.ensure_future(asyncio.to_thread(_debug_sleep, server.url, 4))
                sent[want[i]] = time.monotonic()
                assert (await http.post(f"{sender}/publish/n-{i}", timeout=2)).status_code == 200
                await asyncio.sleep(0.004)  # pacing: the stream spans the sleep
            sent_in = time.monotonic() - started
            assert asleep is not None
            await asyncio.wait_for(asleep, 15)
            took = await wait_until(
                lambda: all(len(x.values("n-")) >= 1000 for x in everyone),
                30.0,
                "every client to have the 1,000",
                lambda: {x.tag: _diff(x.values("n-"), want) for x in everyone},
            )
            await barrier(http, sender, everyone)
            problems = {x.tag: _diff(x.values("n-"), want) for x in everyone if x.values("n-") != want}
            states = health(group)
            summary = [
                {k: h[k] for k in ("duplicates_dropped", "stalls_detected", "publish_errors", "published")}
                for h in states
            ]
            print(
                f"\n1,000 sends in {sent_in:.2f} s; every client had them {took:.2f} s later; "
                f"instances: {summary}"
            )
            assert not problems, f"{problems}\ninstances: {summary}"
            assert all(h["stalls_detected"] >= 1 for h in states), summary  # the sleep was noticed
            assert all(h["duplicates_dropped"] == 0 and h["publish_errors"] == 0 for h in states), summary
            for label, row in (("instance 1's clients", rows[0]), ("the others'", rows[1] + rows[2])):
                delays = sorted(x.at[g] - sent[g] for x in row for g in want)
                print(
                    f"{label}: send -> client median {statistics.median(delays) * 1000:.1f} ms, "
                    f"max {delays[-1]:.2f} s"
                )
            local_delays = [x.at[g] - sent[g] for x in rows[0] for g in want]
            assert max(local_delays) < 1.0, "instance 1's own clients waited for Redis"
    except BaseException:
        if group is not None:
            print(group.logs())
        raise
    finally:
        if group is not None:
            group.close()
        server.close()


def _debug_sleep(url: str, seconds: int) -> Any:
    client = redis.Redis.from_url(url, socket_timeout=seconds + 10)
    try:
        return client.execute_command("DEBUG", "SLEEP", str(seconds))
    finally:
        client.close()


def _diff(got: list[Got], want: list[Got]) -> dict[str, Any]:
    """What is wrong with a client's list: missing, repeated, out of order (a few of each)."""
    values = [g[1] for g in got]
    seen: set[str] = set()
    repeated = [v for v in values if v in seen or seen.add(v)]  # type: ignore[func-returns-value]
    missing = [w[1] for w in want if w[1] not in seen]
    unique = list(dict.fromkeys(values))
    order = [w[1] for w in want if w[1] in seen]
    return {
        "count": len(values),
        "missing": missing[:10],
        "missing_count": len(missing),
        "repeated": repeated[:10],
        "repeated_count": len(repeated),
        "in_order": unique == order,
    }


class MutingProxy:
    """A TCP proxy to Redis that can lose everything Redis says to its clients (not what they say).

    While muted, Redis still executes the PUBLISHes it is sent and fans them out to the other
    instances' subscribers, but their answers never reach the publisher: exactly the case where the
    bus cannot know what was delivered and publishes the batch again. A connection muted once stays
    muted until its client drops it (unmuting mid-stream would hand the client answers to the wrong
    commands); connections opened after :meth:`unmute` are clean.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.muted = False
        self._links: list[dict[str, Any]] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def mute(self) -> None:
        self.muted = True
        for link in self._links:
            link["muted"] = True

    def unmute(self) -> None:
        self.muted = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        link: dict[str, Any] = {"muted": self.muted, "writers": (writer, up_writer)}
        self._links.append(link)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_redis: bool) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    if not (from_redis and link["muted"]):
                        dst.write(data)
                        await dst.drain()
            for w in link["writers"]:
                w.close()

        link["tasks"] = [
            asyncio.ensure_future(pump(reader, up_writer, False)),
            asyncio.ensure_future(pump(up_reader, writer, True)),
        ]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self._links:
            for w in link["writers"]:
                w.close()
            for task in link.get("tasks", ()):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


async def test_a_batch_published_twice_is_delivered_once(private_redis: RedisServer) -> None:
    """Instance 1 reaches Redis through a proxy that loses Redis's answers: its batch of 20 sends
    reaches the other instances, but instance 1 cannot know, so after it gives up on the silent link
    it publishes the batch again. Every client has each exactly once; instances 2 and 3 count the repeats
    they dropped."""
    proxy = MutingProxy(private_redis.port)
    await proxy.start()
    prefix = new_prefix("twice")
    first = others = None
    try:
        # started from a thread: the proxy runs on this event loop, which must keep forwarding meanwhile
        first = await asyncio.to_thread(Cluster, f"redis://127.0.0.1:{proxy.port}/0", prefix, 1)
        others = await asyncio.to_thread(Cluster, private_redis.url, prefix, 2)
        group = Cluster.__new__(Cluster)
        group.instances, group.urls = first.instances + others.instances, first.urls + others.urls
        async with clients(group, 2, join=None) as rows, httpx.AsyncClient() as http:
            everyone = [x for row in rows for x in row]
            sender = group.urls[0]
            await http.post(f"{sender}/publish/warmup", timeout=5)
            await wait_until(
                lambda: all(("http", "warmup") in x.got for x in everyone), 10.0, "the warm-up", lambda: None
            )
            proxy.mute()
            want = [("http", f"t-{i}") for i in range(20)]
            # one pipelined batch of 20 (a send per request would leave only the first in flight)
            assert (await http.post(f"{sender}/burst/20/t", timeout=2)).status_code == 200
            # Redis carried them to instances 2 and 3; instance 1 is left without any answer
            await wait_until(
                lambda: all(x.values("t-") == want for x in everyone),
                5.0,
                "every client to have the 20 once",
                lambda: {x.tag: len(x.values("t-")) for x in everyone},
            )
            gave_up = await wait_until(
                lambda: (h := health(group)[0])["stalls_detected"] + h["publish_errors"] >= 1,
                15.0,
                "instance 1 to give up on its silent link",
                lambda: health(group)[0],
            )
            proxy.unmute()
            recovered = await wait_until(
                lambda: (h := health(group)[0])["state"] == "connected" and h["buffered"] == 0,
                15.0,
                "instance 1 to reconnect and publish its buffer again",
                lambda: health(group)[0],
            )
            await barrier(http, sender, everyone)
            for x in everyone:
                assert x.values("t-") == want, f"{x.tag}: {_diff(x.values('t-'), want)}"
            states = health(group)
            dropped = [h["duplicates_dropped"] for h in states]
            print(
                f"\ninstance 1 gave up on the muted link after {gave_up:.2f} s, republished within "
                f"{recovered:.2f} s; duplicates dropped per instance: {dropped}"
            )
            assert dropped[0] == 0 and all(d >= len(want) for d in dropped[1:]), dropped
    except BaseException:
        for part in (first, others):
            if part is not None:
                print(part.logs())
        raise
    finally:
        for part in (first, others):
            if part is not None:
                part.close()
        await proxy.close()
