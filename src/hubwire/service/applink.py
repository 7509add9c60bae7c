"""An app server's side of the connection service: links to the nodes, and the connections on them.

The app server opens one WebSocket per hub to every service node (outbound: it needs no
public endpoint). A node opens a client connection on a link (``OpenConnection``); from
then on the connection is an ordinary :class:`~hubwire.connections.connection.Connection`
to the hub, whose bytes come and go as ``ConnectionData`` frames: its outbox's sink turns
each loop iteration's writes into one frame, so no task runs per connection. Sends to many
(all, groups, users) go to a node once, pre-serialized per protocol
(:class:`ServiceLifetimeManager`), whatever the number of clients.

Draining (SIGTERM): the app server tells the nodes, then lets each connection go when none
of its calls or streams is running (``Connection.migrate``): it sends the connection's items
to the node, returns what the node had already sent it, and forgets it - without
``on_disconnected``, since for the client and for hub code it is the same connection, now run
by another app server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
from collections import deque
from collections.abc import Collection, Coroutine, Sequence
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from ..backplane.base import Backplane, UserRedirect
from ..connections.application import ConnectionApplication
from ..connections.connection import (
    Connection,
    ConnectionStatus,
    Principal,
    RequestInfo,
    TransportFeatures,
)
from ..connections.manager import ConnectionManager
from ..connections.outbox import flush_dirty
from ..exceptions import HubException
from ..hubs.context import HubConnectionContext, current_connection
from ..hubs.lifetime import (
    ClientResults,
    CompletionOutcome,
    HubLifetimeManager,
    SerializedMessage,
    await_result,
    check_group_name,
)
from ..protocol.messages import CompletionMessage, InvocationMessage
from ..protocol.service import (
    ACK_OK,
    Ack,
    BroadcastData,
    ClientCompletion,
    ClientInvocation,
    CloseConnection,
    ConnectionData,
    ErrorCompletion,
    GroupCommand,
    HandshakeRequest,
    HandshakeResponse,
    MultiConnectionData,
    MultiGroupBroadcastData,
    MultiUserData,
    OpenConnection,
    Ping,
    ServiceFrame,
    ServiceFrameParser,
    ServiceProtocolError,
    encode_frame,
)
from .outgoing import Outgoing
from .tokens import check_access_key, client_audience, client_token, client_url, link_token, require_pyjwt

__all__ = ["AppLink", "ServiceBackplane", "ServiceLifetimeManager", "ServiceLinks"]

log = logging.getLogger("hubwire.service")

#: how long a group change may wait for the node's answer
GROUP_ACK_TIMEOUT = 10.0
#: seconds without input after which an app server keeps a connection as a compact record only
PARK_AFTER = 10.0
#: most connections of one link kept awake (as objects); past it the least recently active are
#: parked, whatever their idle time: a burst of busy clients does not raise the memory high-water mark
AWAKE_MAX = 1000
#: how long after its handshake a new connection is parked (what hub code started in
#: on_connected - a client-result call, a group change - runs against it awake first)
FRESH_GRACE = 0.25
#: connections a trim pass looks at beyond the number it parks (those it cannot park now)
TRIM_SKIPS = 64
#: how long a stopping app server waits for the nodes to confirm the connections it let go of
SETTLE_TIMEOUT = 5.0
#: how long silence means the other side of a link is gone (each side pings every 5 s)
LINK_TIMEOUT = 30.0
#: largest WebSocket message taken from a node (nodes cut theirs at 64 KiB)
LINK_MAX_SIZE = 16 * 1024 * 1024
#: most bytes of one connection's input waiting for its hub here; past it the connection is closed
#: (its node reads the client without pause: the backpressure of a direct transport is lost)
INBOX_LIMIT = 1024 * 1024


class _LinkSink:
    """A linked connection's outbox sink: each loop iteration's writes become one frame."""

    __slots__ = ("conn", "link")

    def __init__(self, link: AppLink, conn: Connection) -> None:
        self.link = link
        self.conn = conn

    def flush(self, outbox: Any, memo: dict[int, tuple[bytes, bytes]] | None = None) -> None:
        chunks = outbox.take_nowait()
        if chunks:
            self.link.send(ConnectionData(self.conn.connection_id, b"".join(chunks)))

    def closed(self) -> None:
        self.link.local_close(self.conn)


class _ParkedSink:
    """The sink of a parked connection's objects, for hub code that still holds them.

    It holds the connection's id, not the connection: no reference cycle keeps the objects of
    thousands of parked connections alive until the cyclic garbage collector runs."""

    __slots__ = ("cid", "link")

    def __init__(self, link: AppLink, cid: str) -> None:
        self.link = link
        self.cid = cid

    def flush(self, outbox: Any, memo: dict[int, tuple[bytes, bytes]] | None = None) -> None:
        chunks = outbox.take_nowait()
        if chunks and self.link.holds(self.cid):  # (once it ended, nothing goes to the node)
            self.link.send(ConnectionData(self.cid, b"".join(chunks)))

    def closed(self) -> None:
        self.link.parked_closed(self.cid)


class AppLink:
    """One WebSocket from this app server to one node, for one hub; reconnects until closed."""

    def __init__(self, owner: ServiceLinks, node_url: str, hub: str, endpoint: ConnectionApplication) -> None:
        self.owner = owner
        self.node_url = node_url.rstrip("/")
        self.hub = hub
        self.endpoint = endpoint
        self.conns: dict[str, Connection] = {}
        #: connections let go of (draining) whose node has not confirmed yet: their data returns
        self.released: set[str] = set()
        #: connections let go of, until the node says they run elsewhere or ended
        self.leaving: dict[str, Connection] = {}
        #: idle connections kept as their encoded OpenConnection (with their hub state) only
        self.parked: dict[str, bytes] = {}
        #: when each connection's input last came (loop time): idle ones are parked
        self._last_input: dict[str, float] = {}
        #: new connections, parked shortly after their handshake is handled: a connect burst never
        #: has every connection awake at once (the process keeps its memory's high-water mark)
        self._fresh: set[str] = set()
        #: connections whose hub state (moved or parked) is not back yet: their end waits for it, so
        #: hub code's on_disconnected sees them whole
        self._restoring: dict[str, tuple[Connection, dict[str, Any]]] = {}
        #: connections whose restore runs now (their end comes after it)
        self._in_restore: set[str] = set()
        self._trim_soon = False
        #: what each connection has queued for the hub (handled in order, off the reader)
        self._inbox: dict[str, deque[Coroutine[Any, Any, None]]] = {}
        #: bytes of input in each connection's inbox
        self._inbox_bytes: dict[str, int] = {}
        self.ready = asyncio.Event()
        #: frames for the node; past its high mark this link's input and sends wait
        self.out = Outgoing()
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None

    # -- sending ------------------------------------------------------------------------------------

    @property
    def writable(self) -> asyncio.Event:
        return self.out.writable

    def send(self, frame: ServiceFrame) -> None:
        if self._ws is None:
            return  # not linked: the node's side of its connections is gone too
        if not isinstance(frame, ConnectionData | Ping):
            flush_dirty()  # what hub code wrote before (a Caller.send, a handshake reply) goes first
        self.out.put(encode_frame(frame))

    async def _writer(self, ws: ClientConnection) -> None:
        while True:
            data = await self.out.batch()
            try:
                async with asyncio.timeout(LINK_TIMEOUT):
                    for message in self.out.messages(data):
                        await ws.send(message)
            except TimeoutError:  # the node reads nothing: without this, every send here waits forever
                log.warning("link to %s (hub %s): the node stopped reading", self.node_url, self.hub)
                ws.transport.abort()  # the reader ends; the link is opened again
                return
            self.out.sent(len(data))

    # -- the link's life ------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"link {self.node_url}")

    async def settle(self, timeout: float) -> None:
        """Until every connection this link let go of is confirmed by the node and what is queued
        went out (bounded): closing the link sooner would look like a crash to the node."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (self.released or self.leaving or self.out.queued) and self._ws is not None:  # until sent
            if asyncio.get_running_loop().time() > deadline:
                log.warning("link to %s closing with %d moves unconfirmed", self.node_url, len(self.leaving))
                return
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = 0.1
        failures = 0
        while True:
            try:
                await self._session()
                delay, failures = 0.1, 0
            except (OSError, WebSocketException, ServiceProtocolError, TimeoutError) as exc:
                # the first failure in a row is news; the retries after it are not
                level = logging.WARNING if failures == 0 else logging.DEBUG
                log.log(level, "link to %s (hub %s) down: %s", self.node_url, self.hub, exc)
                failures += 1
            except Exception:  # a bug must not end the link for good: it is opened again
                log.exception("link to %s (hub %s) failed", self.node_url, self.hub)
                failures += 1
            finally:
                await self._lost()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)

    async def _session(self) -> None:
        url = self.node_url.replace("http", "ws", 1) + "/server/?hub=" + self.hub
        token = link_token(self.owner.access_key, self.node_url, self.hub)
        headers = {"Authorization": f"Bearer {token}"}
        async with connect(
            url, additional_headers=headers, max_size=LINK_MAX_SIZE, ping_interval=None, compression=None
        ) as ws:
            await ws.send(encode_frame(HandshakeRequest(ext={"server": self.owner.server_id})))
            parser = ServiceFrameParser()
            answer = parser.feed(await asyncio.wait_for(ws.recv(decode=False), LINK_TIMEOUT))
            if not answer or not isinstance(answer[0], HandshakeResponse) or answer[0].error:
                raise ServiceProtocolError(f"the node refused the link: {answer[:1]!r}")
            self._ws = ws
            self.ready.set()
            if self.owner.draining:
                self.send(Ping({"shutdown": "fin"}))
            writer = asyncio.get_running_loop().create_task(self._writer(ws))
            sweeper = asyncio.get_running_loop().create_task(self._sweep())
            try:
                for frame in answer[1:]:
                    await self._on_frame(frame)
                while True:
                    data = await asyncio.wait_for(ws.recv(decode=False), LINK_TIMEOUT)
                    for frame in parser.feed(data):
                        await self._on_frame(frame)
            finally:
                writer.cancel()
                sweeper.cancel()

    async def _lost(self) -> None:
        """The node is gone: so are the connections it held (``on_disconnected`` runs once each)."""
        self._ws = None
        self.ready.clear()
        self.out.clear()
        self.released.clear()
        for cid in list(self.leaving):  # the node is gone: so are they, wherever they were going
            self._left(cid, False, "the service node's link was lost")
        manager = self.owner.managers.get(self.hub)
        if manager is not None:
            manager.link_lost()
        for cid in list(self.parked):  # back to life to end (their on_disconnected runs once too)
            self._unpark(cid)
        self._inbox_bytes.clear()
        for queue in self._inbox.values():
            while queue:
                queue.popleft().close()  # their connections end now (their input is not handled)
        conns, self.conns = list(self.conns.values()), {}
        self._last_input.clear()
        self._fresh.clear()
        restoring, self._restoring = self._restoring, {}
        reason = "the service node's link was lost"
        for conn in conns:
            conn.outbox.sink = None
            conn.abort(reason)
            if conn.connection_id not in restoring and conn.connection_id not in self._in_restore:
                self.owner.connections.end_soon(conn)  # hub code's on_disconnected may wait: not here
        for conn, state in restoring.values():  # (closed by the node already, some: their end waited)
            conn.outbox.sink = None
            conn.abort(reason)
            self.owner.tasks.spawn(self._restore_then_end(conn, state), name=f"end {conn.connection_id}")

    # -- frames from the node ---------------------------------------------------------------------------

    async def _on_frame(self, frame: ServiceFrame) -> None:
        match frame:
            case ConnectionData():
                cid = frame.connection_id
                if cid in self.released:
                    self.send(ConnectionData(cid, frame.payload, {"bounced": True}))
                    return
                conn = self.conns.get(cid) or self._unpark(cid)
                if conn is not None:
                    self._touch(cid)
                    self._take_input(conn, frame.payload)
            case OpenConnection():
                self._open(frame)
            case CloseConnection():
                await self._closed_by_node(frame)
            case Ack():
                self.owner.acked(frame)
            case ClientCompletion() | ErrorCompletion():
                manager = self.owner.managers.get(self.hub)
                if manager is not None:
                    manager.remote_result(frame)
            case Ping() | HandshakeResponse():
                pass
            case _:
                log.warning("unexpected frame from node %s: %s", self.node_url, type(frame).__name__)

    def _open(self, frame: OpenConnection) -> None:
        cid = frame.connection_id
        if cid in self.conns:
            return
        claims = frame.claims
        principal = None if claims is None else Principal(_user_of(claims), claims)
        ext = frame.ext
        # keep-alive (pings, the client timeout) is the node's: an idle client costs nothing here
        features = _features(str(ext.get("transport", "WebSockets")), bool(ext.get("binary", True)))
        request = RequestInfo(str(ext.get("path", "")), frame.headers, frame.query, {})
        conn = self.owner.connections.register_linked(cid, principal)
        self.owner.connections.activate(conn, features, request, principal)
        conn.application = self.endpoint
        conn.transport_state = self
        conn.migrate = lambda: self.release(conn)
        conn.outbox.sink = _LinkSink(self, conn)
        self.conns[cid] = conn
        self._touch(cid)
        migrated = ext.get("migrated")
        if isinstance(migrated, dict):
            self._restoring[cid] = (conn, migrated)
            self._queue_work(conn, self._migrate_in(conn))
        else:
            self._fresh.add(cid)
            self._queue_work(conn, self.endpoint.on_connect(conn))

    def _take_input(self, conn: Connection, data: bytes) -> None:
        cid = conn.connection_id
        waiting = self._inbox_bytes.get(cid, 0) + len(data)
        if waiting > INBOX_LIMIT:
            log.warning("connection %s: %d bytes of input wait for the hub; closing it", cid, waiting)
            conn.abort("too much input waiting for the hub")
            return
        self._inbox_bytes[cid] = waiting
        self._queue_work(conn, self._receive(conn, data))

    async def _receive(self, conn: Connection, data: bytes) -> None:
        try:
            await self.endpoint.on_receive(conn, data)
        finally:
            cid = conn.connection_id
            if cid in self._inbox_bytes:
                self._inbox_bytes[cid] -= len(data)

    async def _migrate_in(self, conn: Connection) -> None:
        cid = conn.connection_id
        entry = self._restoring.get(cid)
        if entry is None or entry[0] is not conn:
            return  # restored elsewhere (its link was lost: see _lost)
        del self._restoring[cid]
        self._in_restore.add(cid)
        try:
            await self._restore(conn, entry[1])
        finally:
            self._in_restore.discard(cid)
            if self.conns.get(cid) is not conn:  # it ended while its state came back: now it goes
                await self.owner.connections.end(conn)

    async def _restore_then_end(self, conn: Connection, state: dict[str, Any]) -> None:
        await self._restore(conn, state)
        await self.owner.connections.end(conn)

    async def _restore(self, conn: Connection, state: dict[str, Any]) -> None:
        if conn.status in (ConnectionStatus.ENDING, ConnectionStatus.DISPOSED):
            return
        try:
            await self.endpoint.migrate_in(conn, state)
        except (ValueError, RecursionError) as exc:  # a malformed state (too deep items, say)
            log.warning("connection %s could not move here: %s", conn.connection_id, exc)
            conn.abort("could not move")

    def _queue_work(self, conn: Connection, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` after what is queued for ``conn``, in order, off the link's reader.

        Why: the hub may wait for the node (a group change waits for its Ack, which this link
        reads), and one connection's slow handling must not hold up the others'."""
        cid = conn.connection_id
        queue = self._inbox.get(cid)
        if queue is not None:
            queue.append(work)
            return
        self._inbox[cid] = deque((work,))
        self.owner.tasks.spawn(self._work_through(cid), name=f"linked {cid}")

    async def _work_through(self, cid: str) -> None:
        queue = self._inbox[cid]
        try:
            while queue:
                if not self.writable.is_set():
                    await self.writable.wait()  # the node is behind: this link's clients wait
                    if not queue:
                        break  # (the link was lost meanwhile: what was queued is dropped)
                try:
                    await queue.popleft()
                except Exception:
                    log.exception("handling data of %s failed", cid)
        finally:
            if self._inbox.get(cid) is queue:  # (not a later life's queue, after a lost link)
                del self._inbox[cid]
                self._inbox_bytes.pop(cid, None)
            loop = asyncio.get_running_loop()
            if cid in self._fresh:
                loop.call_later(FRESH_GRACE, self._park_fresh, cid)
            if len(self.conns) > self.owner.awake_max and not self._trim_soon:
                self._trim_soon = True  # once per loop pass, however many connections finish in it
                loop.call_soon(self._trim)

    async def _closed_by_node(self, frame: CloseConnection) -> None:
        cid = frame.connection_id
        if frame.ext.get("ack"):  # the node holds its input now: nothing more will come here
            if cid in self.released:
                self.released.discard(cid)
                self.send(CloseConnection(cid, None, {"released": True}))
            return
        self.released.discard(cid)  # (gone before the node saw it let go: no ack comes)
        if cid in self.leaving:  # moved ("moved"), or it ended before it could (anything else)
            self._left(cid, bool(frame.ext.get("moved")), frame.error)
            return
        if cid in self.parked:  # back to life to end: hub code's on_disconnected sees it whole
            self._unpark(cid)
        conn = self._drop(cid)
        if conn is None:
            return
        conn.outbox.sink = None  # the client is gone: nothing to tell the node
        conn.abort(frame.error or "the client disconnected")  # (its input waiting is not handled)
        self._finish(conn)

    def _finish(self, conn: Connection) -> None:
        """End ``conn`` (no longer in ``conns``), off the reader: on_disconnected may wait for a
        frame only this reader reads (an Ack). One whose hub state is not back yet (moved or
        unparked, its restore queued) is ended by its restore, after it (or by ``_lost``), so
        on_disconnected runs, and sees it whole."""
        cid = conn.connection_id
        if cid not in self._restoring and cid not in self._in_restore:
            self.owner.connections.end_soon(conn)

    def _drop(self, cid: str) -> Connection | None:
        """``cid`` no longer runs here as objects: its entries go with it."""
        self._last_input.pop(cid, None)
        self._fresh.discard(cid)
        return self.conns.pop(cid, None)

    def local_close(self, conn: Connection) -> None:
        """The hub closed ``conn`` (its outbox closed): tell the node, end it here."""
        if self._drop(conn.connection_id) is None:
            return
        self.send(CloseConnection(conn.connection_id, conn.abort_reason))
        self._finish(conn)

    def release(self, conn: Connection) -> bool:
        """Draining: let ``conn`` move to another app server (its calls and streams are done)."""
        cid = conn.connection_id
        if self._ws is None or self.conns.get(cid) is not conn or cid in self._inbox:
            return False  # (input of it not handled yet: asked again shortly)
        state = self.endpoint.export_for_migration(conn)
        if isinstance(state, str):
            log.info("connection %s cannot move: %s", cid, state)
            return False
        flush = conn.outbox.sink
        if flush is not None and conn.outbox.dirty:
            flush.flush(conn.outbox)  # what it was sent goes out before it moves
        self._drop(cid)
        self.released.add(cid)
        self.leaving[cid] = conn
        conn.outbox.sink = None
        self.send(CloseConnection(cid, None, {"migrate": state}))
        # hub code still holding it (it should not: nothing runs) writes to the client through here
        self.owner.connections.release(conn, lambda data: self.send(ConnectionData(cid, data)))
        return True

    def _left(self, cid: str, moved: bool, error: str | None = None) -> None:
        """The node's last word on a connection let go of: it runs elsewhere now (unregistered
        here, no ``on_disconnected``), or it ended before it could (``on_disconnected`` runs)."""
        conn = self.leaving.pop(cid, None)
        if conn is None:
            return
        if moved:
            self.owner.tasks.spawn(self.endpoint.release_moved(conn), name=f"release {cid}")
        else:
            failure = ConnectionError(error) if error else None
            self.owner.tasks.spawn(self.endpoint.on_disconnect(conn, failure), name=f"left {cid}")

    # -- parking idle connections -----------------------------------------------------------------

    async def _sweep(self) -> None:
        """Park the connections idle for ``park_after`` seconds and those past the awake bound
        (checked every two seconds at most)."""
        park_after = self.owner.park_after
        while True:
            await asyncio.sleep(min(2.0, max(0.5, park_after / 2)))
            if self.owner.draining:
                continue  # a drain moves every connection: none sleeps now
            if len(self.conns) > self.owner.awake_max:
                self._trim()  # (those whose calls were still running when their input was handled)
            now = asyncio.get_running_loop().time()
            for cid, conn in list(self.conns.items()):
                if cid not in self._inbox and now - self._last_input.get(cid, 0.0) >= park_after:
                    self._park(conn)

    def _touch(self, cid: str) -> None:
        """Input of ``cid`` now (it moves to the end: ``_last_input`` runs least recent first)."""
        self._last_input.pop(cid, None)
        self._last_input[cid] = asyncio.get_running_loop().time()

    def _trim(self) -> None:
        """Park the least recently active connections until a tenth fewer than the most allowed
        are awake (a batch, so this runs once per that many wakes). One that cannot be parked now
        (its call runs, its input waits) goes to the back: the next pass starts past it, so a pass
        looks at a bounded number of connections, whatever the count awake."""
        self._trim_soon = False
        if self.owner.draining or self._ws is None:
            return
        excess = len(self.conns) - self.owner.awake_max + self.owner.awake_max // 10
        if excess <= 0:
            return
        for cid in list(itertools.islice(self._last_input, excess + TRIM_SKIPS)):
            if excess <= 0:
                return
            conn = self.conns.get(cid)
            if conn is not None and cid not in self._inbox and self._park(conn):
                excess -= 1
            elif cid in self._last_input:
                self._last_input[cid] = self._last_input.pop(cid)  # to the back, its time kept

    def settled(self, cid: str) -> None:
        """What kept a new connection awake (a group change) is done: it may be parked now."""
        if cid in self._fresh:
            asyncio.get_running_loop().call_later(FRESH_GRACE, self._park_fresh, cid)

    def _park_fresh(self, cid: str) -> None:
        """A new connection, its input handled a moment ago: parked once its handshake is done
        (until then it stays fresh: its next input, when handled, brings it here again)."""
        if cid not in self._fresh:
            return
        conn = self.conns.get(cid)
        if conn is None or conn.outbox.closed:
            self._fresh.discard(cid)
        elif cid not in self._inbox and not self.owner.draining and self._ws is not None:
            self._park(conn)

    def _park(self, conn: Connection) -> bool:
        """Keep an idle connection as one encoded frame (what opens it again, with its hub state)
        instead of its objects: an idle client costs an app server a few hundred bytes."""
        cid = conn.connection_id
        manager = self.owner.managers.get(self.hub)
        request, features = conn.request, conn.features
        if request is None or features is None or (manager is not None and manager.results.owes(cid)):
            return False
        if cid in self.owner.group_changes:
            return False  # (its context's groups change when the Ack comes)
        state = self.endpoint.export_for_migration(conn)
        if isinstance(state, str):
            return False
        principal = conn.principal
        ext = {
            "transport": features.name,
            "binary": features.binary,
            "path": request.path,
            "migrated": {**state, "parked": True},
        }
        claims = principal.claims if principal is not None else None
        record = encode_frame(OpenConnection(cid, claims, request.headers, request.query, ext))
        flush = conn.outbox.sink
        if flush is not None and conn.outbox.dirty:
            flush.flush(conn.outbox)  # what it was sent (its handshake reply, say) goes out first
        if manager is not None and manager.local.get(cid) is not None:
            # from now on hub code reaches it through the node (a client-result call, a group
            # change), not through objects about to be dropped
            del manager.local[cid]
        self._drop(cid)
        # hub code may still hold these objects (a task on_connected started): what it writes
        # goes to the node, and closing them closes the connection
        conn.outbox.sink = _ParkedSink(self, cid)
        conn.migrate = None
        self.owner.connections.forget(conn)
        self.owner.tasks.spawn(self._parked(conn), name=f"park {cid}")
        self.parked[cid] = record
        return True

    async def _parked(self, conn: Connection) -> None:
        await self.endpoint.release_moved(conn, parked=True)
        # its hub state and its context point at each other: let go of the state (the context
        # stays whole for hub code holding it) so these objects go when nothing else holds them
        conn.application_state = None

    def _unpark(self, cid: str) -> Connection | None:
        """A parked connection back as objects (its hub state restored before its input)."""
        record = self.parked.pop(cid, None)
        if record is None:
            return None
        (frame,) = ServiceFrameParser().feed(record)
        assert isinstance(frame, OpenConnection)
        self._open(frame)
        return self.conns.get(cid)

    def holds(self, cid: str) -> bool:
        """``cid`` runs here (awake, parked, coming back or leaving)."""
        return cid in self.conns or cid in self.parked or cid in self._restoring or cid in self.leaving

    def parked_closed(self, cid: str) -> None:
        """Hub code closed the objects of a connection parked since (or woken since, as new
        objects): the connection closes, its on_disconnected runs here."""
        conn = self.conns.get(cid) or self._unpark(cid)
        if conn is not None:
            conn.abort("closed by the hub")

    def parked_groups(self, cid: str, join: bool, group: str) -> None:
        """A group change of a parked connection (made through the node): its record follows, so
        it wakes with the groups it is in."""
        restoring = self._restoring.get(cid)
        if restoring is not None:  # woken, its state not back yet: the state to restore follows
            _change_groups(restoring[1], join, group)
            return
        record = self.parked.get(cid)
        if record is None:
            return
        (frame,) = ServiceFrameParser().feed(record)
        assert isinstance(frame, OpenConnection)
        state = frame.ext.get("migrated")
        if isinstance(state, dict):
            _change_groups(state, join, group)
            self.parked[cid] = encode_frame(frame)

    def unpark_all(self) -> None:
        """Every parked connection back (a drain moves them; a lost node ends them)."""
        for cid in list(self.parked):
            self._unpark(cid)


def _change_groups(state: dict[str, Any], join: bool, group: str) -> None:
    """A moved or parked connection's state, with ``group`` joined or left."""
    groups = {g for g in state.get("groups", ()) if isinstance(g, str)}
    (groups.add if join else groups.discard)(group)
    state["groups"] = sorted(groups)


_FEATURES: dict[tuple[str, bool], TransportFeatures] = {}


def _features(transport: str, binary: bool) -> TransportFeatures:
    """What a linked connection's transport can do (one shared object per kind: they are many)."""
    key = (transport[:32], binary)
    found = _FEATURES.get(key)
    if found is None and len(_FEATURES) < 16:
        found = _FEATURES[key] = TransportFeatures(key[0], inherent_keep_alive=True, binary=binary)
    return found or TransportFeatures(key[0], inherent_keep_alive=True, binary=binary)


def _user_of(claims: dict[str, Any]) -> str | None:
    for key in ("sub", "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier", "nameid"):
        value = claims.get(key)
        if value is not None:
            return str(value)
    return None


class ServiceLinks:
    """All links of one app server: one per hub and node; group changes and their answers."""

    def __init__(
        self,
        node_urls: Sequence[str],
        access_key: str,
        server_id: str | None = None,
        client_urls: Sequence[str] | None = None,
    ) -> None:
        if not node_urls:
            raise ValueError("the connection service needs at least one node URL")
        if client_urls and len(client_urls) != len(node_urls):
            raise ValueError("give one client URL per node URL, in the same order")
        require_pyjwt()
        self.node_urls = [u.rstrip("/") for u in node_urls]
        #: where clients reach each node, when not where this app server links to it (an
        #: ingress, a proxy): negotiate sends them there
        self.client_urls = dict(
            zip(self.node_urls, [u.rstrip("/") for u in client_urls or self.node_urls], strict=True)
        )
        self.access_key = check_access_key(access_key)
        self.server_id = server_id or "app-" + secrets.token_hex(6)
        self.links: dict[str, list[AppLink]] = {}
        #: each hub's lifetime manager (client results come back through the links)
        self.managers: dict[str, ServiceLifetimeManager] = {}
        self.draining = False
        #: seconds without input after which a connection is parked (``HUBWIRE_SERVICE_PARK_AFTER``)
        self.park_after = float(os.environ.get("HUBWIRE_SERVICE_PARK_AFTER") or PARK_AFTER)
        #: most connections of a link awake at once (``HUBWIRE_SERVICE_AWAKE_MAX``)
        self.awake_max = max(1, int(os.environ.get("HUBWIRE_SERVICE_AWAKE_MAX") or AWAKE_MAX))
        self.connections: ConnectionManager = ConnectionManager()
        self.tasks: Any = None
        self._acks: dict[int, asyncio.Future[Ack]] = {}
        #: group changes waiting for the node's Ack, per connection (none is parked meanwhile)
        self.group_changes: dict[str, int] = {}
        self._ack_ids = itertools.count(1)
        self._rr = itertools.count()

    def bind(self, connections: ConnectionManager) -> None:
        """Use the server's connection manager (linked connections live beside the others)."""
        self.connections = connections
        self.tasks = connections.tasks

    def add_hub(self, hub: str, endpoint: ConnectionApplication) -> None:
        self.links[hub] = [AppLink(self, url, hub, endpoint) for url in self.node_urls]

    def start_hub(self, hub: str) -> None:
        for link in self.links.get(hub, ()):
            link.start()

    async def stop_hub(self, hub: str) -> None:
        for link in self.links.get(hub, ()):
            await link.settle(SETTLE_TIMEOUT)
            await link.stop()

    def begin_drain(self) -> None:
        """Tell every node this app server is draining: no new connections come here."""
        self.draining = True
        for links in self.links.values():
            for link in links:
                link.send(Ping({"shutdown": "fin"}))
                link.unpark_all()  # the drain moves them like the others

    def client_url(self, hub: str) -> str:
        """Where a negotiating client is sent: the nodes this app server is linked to, in turn
        (a node that went away is skipped until it is back), else any."""
        up = [link.node_url for link in self.links.get(hub, ()) if link.ready.is_set()]
        choices = up or self.node_urls
        return self.client_urls[choices[next(self._rr) % len(choices)]]

    def link_for(self, hub: str, connection: Connection | None = None) -> AppLink:
        """The link to send on: the connection's own (its frames keep their order), else any."""
        if connection is not None and isinstance(connection.transport_state, AppLink):
            link: AppLink = connection.transport_state
            if link.ready.is_set():
                return link
        for link in self.links.get(hub, ()):
            if link.ready.is_set():
                return link
        raise HubException("No connection service node is reachable.")

    async def group_command(self, link: AppLink, join: bool, connection_id: str, group: str) -> None:
        ack_id = next(self._ack_ids)
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._acks[ack_id] = future
        link.send(GroupCommand(join, connection_id, group, ack_id))
        changes = self.group_changes
        changes[connection_id] = changes.get(connection_id, 0) + 1
        try:
            ack = await asyncio.wait_for(future, GROUP_ACK_TIMEOUT)
        except TimeoutError:
            raise HubException("The connection service did not confirm the group change.") from None
        finally:
            self._acks.pop(ack_id, None)
            if changes[connection_id] == 1:
                del changes[connection_id]
                link.settled(connection_id)
            else:
                changes[connection_id] -= 1
        if ack.status != ACK_OK:
            raise HubException(ack.message or "The group change failed.")

    def acked(self, ack: Ack) -> None:
        future = self._acks.get(ack.ack_id)
        if future is not None and not future.done():
            future.set_result(ack)


class ServiceLifetimeManager(HubLifetimeManager):
    """Delivery through the connection service: one frame per send, whatever the client count.

    Group membership lives on the nodes (a connection keeps its groups when it moves);
    ``ctx.groups`` mirrors it here for the connections this app server runs. Client results
    reach the connections this app server runs.
    """

    def __init__(self, links: ServiceLinks, hub_name: str) -> None:
        self.links = links
        self.hub_name = hub_name
        self.local: dict[str, HubConnectionContext] = {}
        self.results = ClientResults("v")
        #: client results asked of the nodes: how many have not said "not here" yet
        self._asked: dict[str, int] = {}
        links.managers[hub_name] = self

    async def start(self) -> None:
        self.links.start_hub(self.hub_name)

    async def close(self) -> None:
        await self.links.stop_hub(self.hub_name)

    async def _link(self, connection_id: str | None = None) -> AppLink:
        """The link to send on, once it has room (a send waits while the node is behind)."""
        ctx = self.local.get(connection_id) if connection_id else current_connection.get()
        link = self.links.link_for(self.hub_name, ctx.connection if ctx is not None else None)
        if not link.writable.is_set():
            await link.writable.wait()
        return link

    def _payloads(self, method: str, args: Sequence[Any]) -> dict[str, bytes]:
        return SerializedMessage(InvocationMessage(method, list(args))).serialize_all(self.protocols)

    async def on_connected(self, connection: HubConnectionContext) -> None:
        self.local[connection.connection_id] = connection

    async def on_disconnected(self, connection: HubConnectionContext) -> None:
        if self.local.get(connection.connection_id) is connection:  # (not its next life, unparked)
            del self.local[connection.connection_id]
            self.results.fail_connection(connection.connection_id)

    async def send_all(self, method: str, args: Sequence[Any], exclude: Collection[str] = ()) -> None:
        (await self._link()).send(BroadcastData(list(exclude), self._payloads(method, args)))

    async def send_connections(
        self, connection_ids: Collection[str], method: str, args: Sequence[Any]
    ) -> None:
        ids = list(dict.fromkeys(connection_ids))
        if ids:
            (await self._link()).send(MultiConnectionData(ids, self._payloads(method, args)))

    async def send_groups(
        self, groups: Collection[str], method: str, args: Sequence[Any], exclude: Collection[str] = ()
    ) -> None:
        names = [g for g in dict.fromkeys(groups) if g]
        if names:
            payloads = self._payloads(method, args)
            (await self._link()).send(MultiGroupBroadcastData(names, payloads, list(exclude)))

    async def send_users(self, user_ids: Collection[str], method: str, args: Sequence[Any]) -> None:
        users = list(dict.fromkeys(user_ids))
        if users:
            (await self._link()).send(MultiUserData(users, self._payloads(method, args)))

    async def add_to_group(self, connection_id: str, group: str) -> None:
        await self._group(True, connection_id, group)

    async def remove_from_group(self, connection_id: str, group: str) -> None:
        await self._group(False, connection_id, group)

    async def _group(self, join: bool, connection_id: str, group: str) -> None:
        ctx = self.local.get(connection_id)
        if ctx is not None:
            check_group_name(group, ctx.max_group_name_length)
            limit = ctx.max_groups
            if join and limit is not None and group not in ctx.groups and len(ctx.groups) >= limit:
                raise HubException(f"The connection is already in {limit} groups, the most allowed.")
        await self.links.group_command(await self._link(connection_id), join, connection_id, group)
        ctx = self.local.get(connection_id)  # (woken meanwhile, maybe: not parked while it waits)
        if ctx is not None:
            (ctx.groups.add if join else ctx.groups.discard)(group)
        else:  # run elsewhere, or parked here (then its record follows)
            for link in self.links.links.get(self.hub_name, ()):
                link.parked_groups(connection_id, join, group)

    async def invoke_connection(
        self, connection_id: str, method: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any:
        ctx = self.local.get(connection_id)
        if ctx is not None:
            return await self.results.invoke_local(ctx, method, args, timeout)
        # run by another app server: every node is asked, the one holding the client answers
        links = [link for link in self.links.links.get(self.hub_name, ()) if link.ready.is_set()]
        if not links:
            raise HubException("No connection service node is reachable.")
        invocation_id = self.results.new_id()
        future = self.results.add(invocation_id, connection_id)
        self._asked[invocation_id] = len(links)
        message = InvocationMessage(method, list(args), invocation_id=invocation_id)
        payloads = SerializedMessage(message).serialize_all(self.protocols)
        frame = ClientInvocation(invocation_id, connection_id, self.links.server_id, payloads)
        for link in links:
            link.send(frame)
        try:
            return await await_result(future, timeout)
        finally:
            self.results.discard(invocation_id)
            self._asked.pop(invocation_id, None)

    def link_lost(self) -> None:
        """A node's link dropped: the results asked of other app servers' clients may have gone
        with it, so they fail now rather than wait forever (a call without a timeout would)."""
        for invocation_id in list(self._asked):
            error = "The node holding the client was lost; the result is unknown."
            self.results.complete(CompletionMessage.with_error(invocation_id, error), None)
            self._asked.pop(invocation_id, None)

    def remote_result(self, frame: ClientCompletion | ErrorCompletion) -> None:
        """A node's answer to a :class:`ClientInvocation` of this app server."""
        if frame.invocation_id not in self._asked:
            return  # late, or not ours
        if isinstance(frame, ErrorCompletion):
            if frame.ext.get("absent"):  # that node does not hold it; the others may
                self._asked[frame.invocation_id] -= 1
                if self._asked[frame.invocation_id] > 0:
                    return
            completion = CompletionMessage.with_error(frame.invocation_id, frame.error)
        else:
            protocol = next((p for p in self.protocols if p.name == frame.protocol), None)
            try:
                parsed = protocol.parse_all(frame.payload) if protocol is not None else []
            except ValueError:
                parsed = []
            if len(parsed) != 1 or not isinstance(parsed[0], CompletionMessage):
                return
            completion = parsed[0]
            if completion.invocation_id != frame.invocation_id:
                return
        self.results.complete(completion, frame.connection_id)

    def set_connection_result(
        self, connection: HubConnectionContext, completion: CompletionMessage
    ) -> CompletionOutcome:
        return self.results.complete(completion, connection.connection_id)


#: query parameters of a negotiate that are not the app's (the client adds them again)
_NOT_FORWARDED = frozenset({"negotiateversion", "access_token", "hub", "id"})


class ServiceBackplane(Backplane):
    """What an app server in service mode uses as its backplane: the nodes deliver and fan out,
    negotiates are sent to a node, and a drain moves connections to the other app servers."""

    def __init__(self, links: ServiceLinks) -> None:
        self.links = links

    def create_manager(self, hub_name: str) -> HubLifetimeManager:
        return ServiceLifetimeManager(self.links, hub_name)

    def bind(self, connections: ConnectionManager) -> None:
        self.links.bind(connections)

    def serve_hub(self, hub_name: str, endpoint: ConnectionApplication) -> UserRedirect | None:
        self.links.add_hub(hub_name, endpoint)
        key = self.links.access_key

        def redirect(request: RequestInfo, principal: Principal | None) -> tuple[str, str | None]:
            node = self.links.client_url(hub_name)
            # the client's own query goes along: hub code reads it (context.query) on the node's request
            extra = [(k, v) for k, v in request.query.items() if k.lower() not in _NOT_FORWARDED]
            url = client_url(node, hub_name, endpoint.transports) + ("&" + urlencode(extra) if extra else "")
            return url, client_token(key, client_audience(node, hub_name), principal)

        return redirect

    def begin_drain(self) -> None:
        self.links.begin_drain()

    def describe(self) -> str:
        return f"connection service ({', '.join(self.links.node_urls)}) as app server {self.links.server_id}"

    def health(self) -> dict[str, Any] | None:
        links = [link for group in self.links.links.values() for link in group]
        return {
            "links": len(links),
            "links_up": sum(1 for link in links if link.ready.is_set()),
            "connections": sum(len(link.conns) + len(link.parked) for link in links),
            "parked": sum(len(link.parked) for link in links),
        }


def service_from_env() -> ServiceBackplane | None:
    """``HUBWIRE_SERVICE_URLS`` (comma-separated node URLs) and ``HUBWIRE_SERVICE_ACCESS_KEY``
    (what ``hubwire run --service ... --access-key ...`` sets): run hubs for a connection service.
    ``HUBWIRE_SERVICE_CLIENT_URLS``: where clients reach the same nodes, in the same order, when
    that is not where app servers link to them."""
    urls = [u.strip() for u in os.environ.get("HUBWIRE_SERVICE_URLS", "").split(",") if u.strip()]
    if not urls:
        return None
    key = os.environ.get("HUBWIRE_SERVICE_ACCESS_KEY", "")
    if not key:
        raise ValueError("HUBWIRE_SERVICE_URLS needs HUBWIRE_SERVICE_ACCESS_KEY (the nodes' access key)")
    clients = [u.strip() for u in os.environ.get("HUBWIRE_SERVICE_CLIENT_URLS", "").split(",") if u.strip()]
    server_id = os.environ.get("HUBWIRE_SERVICE_SERVER_ID")
    return ServiceBackplane(ServiceLinks(urls, key, server_id, clients or None))
