"""A service node: it holds client connections and hands their bytes to app servers over links.

Each client connection is pinned to one app-server link (the least loaded that is not
draining) for as long as it stays there, so every frame of it reaches one hub process in
order. The node forwards the client's bytes untouched; it reads only what it must:

* the handshake (to know the client's protocol for fan-out, and to replay it on a move),
* the app server's handshake answer (a client is registered for broadcasts only after it,
  so no broadcast can overtake the handshake reply),
* invocation ids and upload streams going in and completions coming out (what is in flight
  decides when a connection may move, and what gets an error when its app server dies).

Fan-out frames (to all, groups, users, connections) go through this node's hub lifetime
manager with the app server's pre-serialized payloads: the backplane carries them to the
other nodes, nothing is serialized per recipient.

Moves: a draining app server releases a connection when nothing of it runs there
(``CloseConnection`` with ``ext["migrate"]``), returns what reached it afterwards
(``ConnectionData`` with ``ext["bounced"]``) and ends with ``ext["released"]``; the node holds
the client's new bytes meanwhile, then opens the connection on another app server with its
state and feeds it the returned and held bytes in order. When a link dies, every call in
flight on it is answered with an error at once and its connections move the same way
(their items are lost with the process).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from ..connections.application import ConnectionApplication
from ..connections.connection import Connection
from ..connections.replay import TRACKABLE, SequenceError
from ..exceptions import HubException
from ..hubs.context import HubConnectionContext
from ..hubs.dispatcher import CONNECTION_ERROR
from ..hubs.lifetime import HubLifetimeManager, PreframedMessage
from ..options import HubOptions
from ..protocol.base import HubProtocol
from ..protocol.errors import HandshakeError, InvalidDataError
from ..protocol.handshake import parse_handshake
from ..protocol.messages import (
    PING,
    CloseMessage,
    CompletionMessage,
    HubMessage,
    InvocationMessage,
    PingMessage,
    StreamInvocationMessage,
)
from ..protocol.service import (
    ACK_ERROR,
    ACK_OK,
    Ack,
    BroadcastData,
    ClientCompletion,
    ClientInvocation,
    CloseConnection,
    ConnectionData,
    ErrorCompletion,
    GroupBroadcastData,
    GroupCommand,
    MultiConnectionData,
    MultiGroupBroadcastData,
    MultiUserData,
    OpenConnection,
    Ping,
    ServiceFrame,
    UserData,
    encode_frame,
)
from .outgoing import Outgoing
from .tokens import CLAIMS

__all__ = ["ClientRoute", "NodeLink", "ServiceClients", "ServiceNodeStats"]

log = logging.getLogger("hubwire.service")

#: the error a client's pending call gets when the app server running it is gone
APP_SERVER_LOST = "The app server running this call stopped; the call's outcome is unknown."
#: most bytes a client may send while its connection moves (then it is closed, reconnect allowed)
HOLD_LIMIT = 1024 * 1024
#: most calls and upload streams of one client in flight at once (a node reads its clients without
#: pause while the link has room, so nothing else bounds what a client piles up behind a slow call)
MAX_IN_FLIGHT = 1000
#: how long a connection may stay between two app servers (the old one never said "released")
MOVE_TIMEOUT = 30.0


class ServiceNodeStats:
    """Counters of one node (metrics and the acceptance tests read them)."""

    def __init__(self) -> None:
        self.opened = 0
        self.migrations = 0
        self.migrations_after_crash = 0
        self.synthesized_errors = 0
        self.closed_no_app_server = 0
        #: stateful reconnect: transports resumed here, and messages sent again on them
        self.resumed = 0
        self.replayed = 0


class NodeLink:
    """The node's side of one app server's link for one hub.

    ``send`` queues an encoded frame; the link's writer sends what is queued as one
    WebSocket message per loop iteration. ``routes``: the client connections pinned here.
    """

    def __init__(self, server_id: str, hub: str, write: Callable[[bytes], Awaitable[None]]) -> None:
        self.server_id = server_id
        self.hub = hub
        self.routes: dict[str, ClientRoute] = {}
        self.draining = False
        self.closed = False
        #: stands for the node itself (a hub no app server runs)
        self.serverless = False
        self._write = write
        self.out = Outgoing()

    @property
    def writable(self) -> asyncio.Event:
        """Set while the app server keeps up (its clients' input waits while it is clear)."""
        return self.out.writable

    def send(self, frame: ServiceFrame) -> None:
        if not self.closed:
            self.out.put(encode_frame(frame))

    async def writer(self) -> None:
        """Send queued frames until the link closes (a slow app server slows only its link)."""
        while not self.closed:
            data = await self.out.batch()
            for message in self.out.messages(data):
                await self._write(message)
            self.out.sent(len(data))

    def close(self) -> None:
        self.closed = True
        self.out.clear()


class ClientRoute:
    """One client connection held by this node, and where its bytes go."""

    __slots__ = (
        "bounced",
        "conn",
        "ctx",
        "flusher",
        "handshake",
        "held",
        "held_bytes",
        "hub",
        "inbound",
        "last_write",
        "link",
        "moving",
        "pending",
        "ping",
        "pinged",
        "protocol",
        "received",
        "registering",
        "replied",
        "results",
        "tracking",
        "uploads",
        "version",
        "waiting",
        "waiting_bytes",
    )

    def __init__(self, conn: Connection, hub: ServiceHub, link: NodeLink) -> None:
        self.conn = conn
        self.hub = hub
        self.link = link
        self.inbound = bytearray()  # the handshake until it is complete
        self.handshake: bytes | None = None
        self.protocol: HubProtocol | None = None
        self.version = 1
        self.ctx: HubConnectionContext | None = None
        self.replied = False
        self.tracking: Any = None  # the client's message parser (None: not tracking)
        self.pending: dict[str, bool] = {}  # invocation id -> is a stream invocation
        self.uploads: set[str] = set()
        self.moving = False
        self.last_write = 0.0
        self.received = time.monotonic()
        self.ping = b""  # the client's protocol's Ping record, once the handshake said which
        self.pinged = False  # the client sent a Ping (from then on the client timeout applies)
        #: client results asked of this client by app servers that do not run it: id -> their link
        self.results: dict[str, NodeLink] | None = None
        self.bounced: list[bytes] = []
        self.held: list[bytes] = []
        self.held_bytes = 0
        #: the node manager's on_connected of it (its on_disconnected waits for it)
        self.registering: asyncio.Task[None] | None = None
        #: a stateful client's input waiting for its app server to have room (and its size), and
        #: the task passing it on
        self.waiting: deque[tuple[bytes, list[tuple[HubMessage, bytes]]]] = deque()
        self.waiting_bytes = 0
        self.flusher: asyncio.Future[None] | None = None

    @property
    def busy(self) -> bool:
        """A call or a stream of this connection is in flight (not a safe point to move it)."""
        return bool(self.pending or self.uploads) or self.tracking is None

    def track_inbound(self, data: bytes) -> None:
        parser = self.tracking
        if parser is None:
            return
        try:
            messages = parser.feed(data)
        except InvalidDataError:
            self.tracking = None  # the app server closes it; it is never a safe point again
            return
        for msg in messages:
            self.track(msg)

    def track(self, msg: HubMessage) -> None:
        """One message of the client on its way to the app server: calls in flight, uploads,
        client results for other app servers, pings."""
        if isinstance(msg, InvocationMessage | StreamInvocationMessage):
            if msg.invocation_id is not None:
                self.pending[msg.invocation_id] = isinstance(msg, StreamInvocationMessage)
            if msg.stream_ids:
                self.uploads.update(msg.stream_ids)
        elif isinstance(msg, CompletionMessage):
            self.uploads.discard(msg.invocation_id)  # an upload stream's end
            if self.results and msg.invocation_id in self.results:
                self._result_to_caller(msg)
        elif isinstance(msg, PingMessage):
            self.pinged = True

    def stateful_inbound(self, data: bytes) -> list[tuple[HubMessage, bytes]] | None:
        """Stateful reconnect, the node's half (it holds the client's transport and numbering;
        the app server behind it sees a plain stream): Acks trim what is kept for the client,
        its Sequence rewinds, duplicates it resends after a resume are dropped; the rest, in the
        client's own bytes, is for :meth:`forward`. None: a protocol error (a Sequence naming
        messages it never sent, a malformed or too large message), which closes it."""
        parser, out = self.tracking, self.conn.outbox
        replay = out.replay
        if parser is None or replay is None:
            return None
        try:
            framed = parser.feed_framed(data)
        except InvalidDataError:
            return None  # (the numbering cannot go on past a message it cannot read)
        kept: list[tuple[HubMessage, bytes]] = []
        for msg, frame in framed:
            if msg is None or not replay.accept(msg.type):
                continue  # (a resent one handled before, or what came before its Sequence)
            try:
                if out.peer_control(msg):  # an Ack or its Sequence
                    continue
            except SequenceError:
                return None
            kept.append((msg, frame))
        return kept

    def forward(self, framed: list[tuple[HubMessage, bytes]]) -> bytes:
        """Messages :meth:`stateful_inbound` let through, on their way to the app server now:
        tracked, and counted for the client's next Ack."""
        replay = self.conn.outbox.replay
        for msg, _ in framed:
            self.track(msg)
            if replay is not None and msg.type in TRACKABLE:
                replay.processed()
        return b"".join(frame for _, frame in framed)

    def to_client(self, data: bytes) -> None:
        """What the app server sent: with stateful reconnect each message is numbered and kept
        (calls, results, items) or sent as is (pings, closes), as a hub server writes them."""
        out = self.conn.outbox
        if out.replay is None or self.protocol is None:
            self.conn.write(data)
            return
        try:
            framed = self.protocol.parser(None).feed_framed(data)
        except InvalidDataError:
            out.write_control(data)  # (unnumbered, as it came: the client's parser says what is wrong)
            return
        for msg, frame in framed:
            if msg is not None and msg.type in TRACKABLE:
                out.write(frame)
            else:
                out.write_control(frame)

    def _result_to_caller(self, msg: CompletionMessage) -> None:
        """The client answered an app server that does not run it: that one gets the Completion
        (the one running the client gets it too, and finds no such call of its own)."""
        assert self.results is not None and self.protocol is not None
        caller = self.results.pop(msg.invocation_id)
        frame = ClientCompletion(
            msg.invocation_id,
            self.conn.connection_id,
            caller.server_id,
            self.protocol.name,
            self.protocol.write_message(msg),
        )
        caller.send(frame)

    def fail_results(self) -> None:
        """The client is gone: every app server waiting for a result of it hears so now."""
        if not self.results:
            return
        cid = self.conn.connection_id
        for invocation_id, caller in self.results.items():
            error = f"Connection '{cid}' disconnected."
            caller.send(ErrorCompletion(invocation_id, cid, caller.server_id, error))
        self.results = None

    def track_outbound(self, data: bytes) -> None:
        """Completions going out end pending calls (payloads are whole messages)."""
        if not self.pending or self.protocol is None:
            return
        try:
            messages = self.protocol.parse_all(data)
        except InvalidDataError:
            return
        for msg in messages:
            if isinstance(msg, CompletionMessage):
                self.pending.pop(msg.invocation_id, None)

    def fail_pending(self, error: str, keep: set[str] | frozenset[str] = frozenset()) -> int:
        """Answer every call in flight with ``error`` (their app server is gone), but those in
        ``keep`` (the next app server gets them: they never ran)."""
        protocol = self.protocol
        if protocol is None or not self.pending:
            return 0
        failed = [i for i in self.pending if i not in keep]
        for invocation_id in failed:
            self.conn.write(protocol.write_message(CompletionMessage.with_error(invocation_id, error)))
        self.pending = {i: v for i, v in self.pending.items() if i in keep}
        self.uploads.clear()
        return len(failed)

    def carried(self) -> set[str]:
        """Ids of the calls in the input held or returned during a move (they will run on the next
        app server, not on the one that let go)."""
        if self.protocol is None or not (self.bounced or self.held):
            return set()
        parser = self.protocol.parser(None)
        ids: set[str] = set()
        for data in (*self.bounced, *self.held):
            try:
                messages = parser.feed(data)
            except InvalidDataError:
                break
            ids.update(
                m.invocation_id
                for m in messages
                if isinstance(m, InvocationMessage | StreamInvocationMessage) and m.invocation_id
            )
        return ids


def _handshake_accepted(data: bytes) -> tuple[bool, int]:
    """Whether the app server's handshake answer at the start of ``data`` accepted the client,
    and its length (0: not complete)."""
    end = data.find(b"\x1e")
    if end < 0:
        return False, 0
    try:
        answer = msgspec.json.decode(data[:end])
    except msgspec.DecodeError:
        return False, end + 1
    return isinstance(answer, dict) and "error" not in answer, end + 1


class ServiceHub:
    """One hub as a node sees it: its app-server links and its lifetime manager (fan-out)."""

    def __init__(self, name: str, manager: HubLifetimeManager) -> None:
        self.name = name
        self.manager = manager
        self.links: list[NodeLink] = []
        #: serves clients while no app server is linked (serverless nodes only)
        self.serverless: NodeLink | None = None
        #: set once the manager started (subscribed)
        self.started = asyncio.Event()

    def pick(self) -> NodeLink | None:
        """The least loaded link that is not draining."""
        live = [link for link in self.links if not link.draining and not link.closed]
        return min(live, key=lambda link: len(link.routes)) if live else None


class ServiceClients(ConnectionApplication):
    """The node's endpoint for clients of every hub (``/client/?hub=H``): forwards, never runs hubs."""

    def __init__(
        self,
        options: HubOptions,
        protocols: dict[str, HubProtocol],
        create_manager: Callable[[str], tuple[HubLifetimeManager, Awaitable[None]]],
    ) -> None:
        self.options = options
        self.transports = tuple(options.transports)
        self.policies = ()  # only clients with a token from an app server's negotiate
        self.protocols = protocols
        self.hubs: dict[str, ServiceHub] = {}
        self._create_manager = create_manager
        #: makes the stand-in link of a hub no app server runs (None: such clients are refused)
        self.serverless: Callable[[ServiceHub, Callable[[ClientRoute], None]], NodeLink] | None = None
        self.stats = ServiceNodeStats()
        self.tasks: set[asyncio.Task[Any]] = set()
        #: the endpoint its variants were made from (the heartbeat's tick runs once, here)
        self.primary = True
        #: every client connection held here (shared with the variants)
        self.routes: dict[str, ClientRoute] = {}

    def variant(self, transports: Sequence[str]) -> ServiceClients:
        """The same clients endpoint offering only ``transports`` (a hub path that narrows them):
        it shares every hub, link and counter with this one."""
        view = copy.copy(self)
        view.transports = tuple(transports)
        view.primary = False
        return view

    # -- hubs and links --------------------------------------------------------------------------

    async def hub(self, name: str) -> ServiceHub:
        """The hub ``name``, created when its first app server links, once its manager started."""
        hub = self.hub_now(name, create=True)
        assert hub is not None
        await hub.started.wait()
        return hub

    def hub_now(self, name: str, create: bool = False) -> ServiceHub | None:
        """The hub ``name`` (hub names are case-insensitive, as REST paths are); made now when
        ``create`` or on a serverless node - its manager starts in the background, and what is sent
        meanwhile waits in the backplane's buffer."""
        hub = self.hubs.get(name.lower())
        if hub is None and (create or self.serverless is not None):
            # its backplane name is lower-case on every node, whoever named it first (an app
            # server's link, a client, a REST path), so that all nodes meet on the same channels
            manager, start = self._create_manager(name.lower())
            hub = self.hubs[name.lower()] = ServiceHub(name, manager)
            self._spawn(self._start(hub, start))
        return hub

    @staticmethod
    async def _start(hub: ServiceHub, start: Awaitable[None]) -> None:
        try:
            await start
        finally:
            hub.started.set()

    def link_closed(self, link: NodeLink) -> None:
        """An app server's link is gone: fail what ran there, move its connections."""
        link.close()
        hub = self.hubs.get(link.hub.lower())
        if hub is not None and link in hub.links:
            hub.links.remove(link)
        for route in list(link.routes.values()):
            if route.moving and route.link is not link:
                continue
            state, carried = None, set()
            if route.moving:  # it had let go of it (items sent): only the crash is new
                state = route.conn.items.pop("hubwire.service.state", None)
                carried = route.carried()
            self.stats.synthesized_errors += route.fail_pending(APP_SERVER_LOST, carried)
            self.stats.migrations_after_crash += 1
            self._move(route, link, state if isinstance(state, dict) else None, crashed=state is None)
        link.routes.clear()

    # -- client connections ------------------------------------------------------------------------

    async def on_connect(self, conn: Connection) -> None:
        request = conn.request
        name = (request.query_param("hub") if request is not None else None) or ""
        hub = self.hubs.get(name.lower())
        if hub is None and self.serverless is not None and name:
            hub = await self.hub(name)
        link = hub.pick() if hub is not None else None
        if link is None and hub is not None and self.serverless is not None:
            if hub.serverless is None:
                hub.serverless = self.serverless(hub, self._register)
            link = hub.serverless
        if hub is None or link is None:
            self.stats.closed_no_app_server += 1
            conn.abort("no app server is linked for this hub")
            return
        route = ClientRoute(conn, hub, link)
        conn.application_state = route
        link.routes[conn.connection_id] = route
        self.routes[conn.connection_id] = route
        self.stats.opened += 1
        link.send(self._open_frame(route, None))

    def _open_frame(self, route: ClientRoute, migrated: dict[str, Any] | None) -> OpenConnection:
        conn = route.conn
        request = conn.request
        principal = conn.principal
        claims = principal.claims.get(CLAIMS) if principal is not None else None
        features = conn.features
        ext: dict[str, Any] = {
            "transport": features.name if features else "WebSockets",
            "binary": bool(features.binary) if features else True,
            "keepalive": bool(features.inherent_keep_alive) if features else False,
            "path": request.path if request else "",
        }
        if migrated is not None:
            ext["migrated"] = migrated
        return OpenConnection(
            conn.connection_id,
            claims if isinstance(claims, dict) else None,
            dict(request.headers) if request else {},
            dict(request.query) if request else {},
            ext,
        )

    async def on_receive(self, conn: Connection, data: bytes) -> None:
        route: ClientRoute | None = conn.application_state
        if route is None:
            return
        route.received = time.monotonic()
        if data == route.ping:
            route.pinged = True
            return  # keep-alive is the node's business (tick): a Ping alone goes no further
        prefix = b""
        if route.handshake is None:
            route.inbound += data
            if not self._read_handshake(route):
                return
            data = bytes(route.inbound)
            route.inbound = bytearray()
            assert route.handshake is not None
            prefix, data = route.handshake, data[len(route.handshake) :]
        framed = None
        if route.conn.outbox.replay is not None:
            # Acks and a Sequence take effect now, even while its app server is behind: what the
            # client acknowledged must not pile up here until it counts as a slow consumer
            framed = route.stateful_inbound(data)
            if framed is None:  # a protocol error (as a hub server, closed)
                self._close_client(route, CONNECTION_ERROR)
                return
            if not framed and not prefix:
                return  # (only Acks, a Sequence or resent duplicates: nothing for the app server)
            if route.waiting or not route.link.writable.is_set():
                await self._wait_for_app_server(route, prefix, framed)
                return
            # counted (so acknowledged) only now: one that never went on is resent after a resume
            self._pass_on(route, prefix + route.forward(framed))
            return
        if not route.link.writable.is_set():
            await route.link.writable.wait()  # back-pressure: this client's app server is behind
        route.track_inbound(data)
        self._pass_on(route, prefix + data)

    async def _wait_for_app_server(
        self, route: ClientRoute, prefix: bytes, framed: list[tuple[HubMessage, bytes]]
    ) -> None:
        """A stateful client's input while its app server is behind: held (bounded) instead of
        waiting, so the client's next Acks are read meanwhile - the messages it acknowledged
        must not pile up here until it counts as a slow consumer. Past the bound it waits."""
        route.waiting.append((prefix, framed))
        route.waiting_bytes += len(prefix) + sum(len(frame) for _, frame in framed)
        if route.flusher is None:
            route.flusher = asyncio.ensure_future(self._flush_waiting(route))
        flusher = route.flusher
        if route.waiting_bytes > HOLD_LIMIT:
            await asyncio.shield(flusher)  # back-pressure: the client waits as a plain one would

    async def _flush_waiting(self, route: ClientRoute) -> None:
        try:
            while route.waiting:
                if not route.link.writable.is_set():
                    await route.link.writable.wait()
                prefix, framed = route.waiting.popleft()
                route.waiting_bytes -= len(prefix) + sum(len(frame) for _, frame in framed)
                self._pass_on(route, prefix + route.forward(framed))
        finally:
            if route.flusher is asyncio.current_task():
                route.flusher = None

    def _pass_on(self, route: ClientRoute, data: bytes) -> None:
        """The client's input, tracked, to its app server (or held while it moves)."""
        if len(route.pending) + len(route.uploads) > MAX_IN_FLIGHT:
            self._close_client(route, f"more than {MAX_IN_FLIGHT} calls in flight")
            return
        if route.moving:
            route.held.append(data)
            route.held_bytes += len(data)
            if route.held_bytes > HOLD_LIMIT:
                self._close_client(route, "too much input while the connection moved")
            return
        route.link.send(ConnectionData(route.conn.connection_id, data))

    async def on_resume(self, conn: Connection) -> None:
        """Stateful reconnect: the client's new WebSocket (to this node) carries ``conn``: the
        Sequence and what it has not acknowledged go out, then its own Sequence is awaited."""
        route: ClientRoute | None = conn.application_state
        replay = conn.outbox.replay
        if route is None or route.protocol is None or replay is None:
            conn.abort("not resumable")
            return
        self.stats.resumed += 1
        if route.flusher is not None:  # never passed on, so never acknowledged: the client resends it
            route.flusher.cancel()
            route.flusher = None
        route.waiting.clear()
        route.waiting_bytes = 0
        self.stats.replayed += conn.outbox.resume(route.protocol)
        route.tracking = route.protocol.parser(self.options.maximum_receive_message_size)
        route.received = time.monotonic()

    def _read_handshake(self, route: ClientRoute) -> bool:
        """True once the client's handshake is complete (it is forwarded either way)."""
        try:
            parsed = parse_handshake(route.inbound, self.options.maximum_receive_message_size)
        except HandshakeError:
            route.handshake = bytes(route.inbound)  # the app server answers with the error
            return True
        if parsed is None:
            return False
        request, used = parsed
        route.handshake = bytes(route.inbound[:used])
        protocol = self.protocols.get(request.protocol)
        if protocol is not None:
            route.protocol = protocol
            route.version = request.version
            route.conn.transfer_format = protocol.transfer_format  # binary frames for MessagePack
            route.ping = protocol.write_message(PING)
            route.tracking = protocol.parser(self.options.maximum_receive_message_size)
            features = route.conn.features
            stateful = route.conn.stateful and features is not None and features.resumable
            if request.version >= 2 and stateful and self.options.stateful_reconnect_buffer_size > 0:
                # numbered from the first message after the handshake, as the client numbers
                route.conn.outbox.enable_replay(*self.options.replay_limits)
        return True

    async def on_disconnect(self, conn: Connection, error: BaseException | None) -> None:
        route: ClientRoute | None = conn.application_state
        if route is None:
            return
        route.fail_results()
        if route.flusher is not None:
            route.flusher.cancel()  # its input goes nowhere now
            route.flusher = None
            route.waiting.clear()
        if self.routes.get(conn.connection_id) is route:
            del self.routes[conn.connection_id]
        if route.link.routes.get(conn.connection_id) is route:
            del route.link.routes[conn.connection_id]
            route.link.send(CloseConnection(conn.connection_id, None if error is None else str(error)))
        if route.ctx is not None:
            if route.registering is not None:  # not before it is registered: it would stay for good
                with contextlib.suppress(Exception):
                    await asyncio.shield(route.registering)
            await route.hub.manager.on_disconnected(route.ctx)

    def drain(self, conn: Connection, hand_over: Any, final: bool) -> bool:
        route: ClientRoute | None = conn.application_state
        if route is not None:
            self._close_client(route, None)
        else:
            conn.abort("server shutting down")
        return True

    def server_closing(self, conn: Connection) -> None:
        self.drain(conn, None, True)

    def _close_client(self, route: ClientRoute, error: str | None) -> None:
        """Close with "reconnect allowed" (the client's own automatic reconnect comes back)."""
        if route.protocol is not None and route.replied:
            route.conn.write_control(route.protocol.write_message(CloseMessage(error, allow_reconnect=True)))
        route.conn.abort(error or "closed")

    # -- frames from app servers -------------------------------------------------------------------

    def on_frame(self, link: NodeLink, frame: ServiceFrame) -> None:
        """A frame from ``link`` (the link reader calls this in order)."""
        match frame:
            case ConnectionData():
                self._from_app(link, frame)
            case CloseConnection():
                self._closed_by_app(link, frame)
            case Ping():
                if frame.values.get("shutdown"):
                    link.draining = True
            case GroupCommand():
                self._spawn(self._group_command(link, frame))
            case ClientInvocation():
                self._client_invocation(link, frame)
            case _:
                self._fan_out(link, frame)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _from_app(self, link: NodeLink, frame: ConnectionData) -> None:
        route = link.routes.get(frame.connection_id)
        if route is None:
            moved = self.routes.get(frame.connection_id)
            if moved is not None and moved.replied and not frame.ext.get("bounced"):
                moved.to_client(frame.payload)  # a late write of the app server it moved off
            return  # else the client is gone
        if frame.ext.get("bounced"):
            route.bounced.append(frame.payload)  # reached the old app server after it let go
            return
        data = frame.payload
        if not route.replied:
            accepted, used = _handshake_accepted(data)
            if used == 0:
                return
            route.replied = True
            if accepted and route.protocol is not None:
                self._register(route)
            route.conn.write_control(data[:used])  # (never numbered: stateful reconnect)
            data = data[used:]
        route.track_outbound(data)
        if data:
            route.to_client(data)

    def _register(self, route: ClientRoute) -> None:
        assert route.protocol is not None
        ctx = HubConnectionContext(route.conn, route.protocol, route.version, 1)
        route.ctx = ctx
        task: asyncio.Task[None] = asyncio.ensure_future(route.hub.manager.on_connected(ctx))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        route.registering = task

    def tick(self, now: float) -> None:
        """Keep-alive of every client held here, as a hub server does it: a Ping after 15 s without
        a write, a Close (reconnect allowed) after 30 s without a word from the client (long polls
        are their own keep-alive). The node does it, not the app servers: an idle client costs an
        app server nothing. Serverless clients also time out when their handshake does not come."""
        if not self.primary:
            return
        opts = self.options
        for route in list(self.routes.values()):
            protocol = route.protocol
            if not route.replied or protocol is None:
                if route.link.serverless and now - route.conn.created > opts.handshake_timeout:
                    route.conn.abort("handshake timed out")
                continue
            features = route.conn.features
            if features is not None and features.inherent_keep_alive:
                continue
            out = route.conn.outbox
            if out.replay is not None:
                if out.detached:
                    continue  # waiting for its resume: the disconnect timeout decides
                out.ack_due(protocol)
            if out.wrote:
                out.wrote = False
                route.last_write = now
            elif now - route.last_write >= opts.keep_alive_interval:
                out.write_control(protocol.write_message(PING))
                out.wrote = False
                route.last_write = now
            # as a hub server: the client timeout runs once the client has shown it pings (some
            # clients never do; they end when their transport does)
            if route.pinged and now - route.received > opts.client_timeout_interval:
                self._close_client(route, CONNECTION_ERROR)

    def _client_invocation(self, link: NodeLink, frame: ClientInvocation) -> None:
        """Ask a client held here for a result on behalf of an app server that does not run it
        (it asks every node; the ones without the client say so)."""
        cid = frame.connection_id
        route = self.routes.get(cid)
        protocol = route.protocol if route is not None else None
        if (
            route is None
            or protocol is None
            or not route.replied
            or route.conn.outbox.closed
            or route.hub.name.lower() != link.hub.lower()
        ):
            error = f"Connection '{cid}' does not exist."
            link.send(ErrorCompletion(frame.invocation_id, cid, link.server_id, error, {"absent": True}))
            return
        data = frame.payloads.get(protocol.name)
        results = route.results if route.results is not None else {}
        if data is None or len(results) >= MAX_IN_FLIGHT or route.tracking is None:
            error = "The client cannot be asked for a result now."
            link.send(ErrorCompletion(frame.invocation_id, cid, link.server_id, error))
            return
        results[frame.invocation_id] = link
        route.results = results
        route.conn.write(data)

    def _closed_by_app(self, link: NodeLink, frame: CloseConnection) -> None:
        route = link.routes.get(frame.connection_id)
        if route is None or route.link is not link:
            return
        ext = frame.ext
        if "migrate" in ext:  # the app server let go of it: hold the client's input
            route.moving = True
            asyncio.get_running_loop().call_later(MOVE_TIMEOUT, self._move_overdue, route, link)
            state = ext["migrate"]
            route.conn.items["hubwire.service.state"] = state if isinstance(state, dict) else {}
            link.send(CloseConnection(frame.connection_id, None, {"ack": True}))
        elif ext.get("released"):  # everything that reached the old app server came back
            del link.routes[frame.connection_id]
            state = route.conn.items.pop("hubwire.service.state", {})
            self.stats.migrations += 1
            self._move(route, link, state, crashed=False)
        else:  # the hub closed it (its Close message went out as data before this)
            del link.routes[frame.connection_id]
            route.conn.abort(frame.error or "closed by the app server")

    def _move_overdue(self, route: ClientRoute, link: NodeLink) -> None:
        """The old app server never gave the connection back: close it (the client reconnects)."""
        if route.moving and route.link is link and link.routes.get(route.conn.connection_id) is route:
            log.warning(
                "connection %s: app server %s never released it", route.conn.connection_id, link.server_id
            )
            self._close_client(route, None)

    def _move(self, route: ClientRoute, old: NodeLink, state: dict[str, Any] | None, crashed: bool) -> None:
        """Open ``route``'s connection on another app server; what it sent meanwhile follows."""
        new = route.hub.pick()
        cid = route.conn.connection_id
        if new is None or route.protocol is None or not route.replied or route.conn.outbox.closed:
            self.stats.closed_no_app_server += 1
            old.send(CloseConnection(cid, None, {"gone": True}))  # its hub's on_disconnected runs there
            self._close_client(route, None)
            return
        old.send(CloseConnection(cid, None, {"moved": True}))  # it runs elsewhere: forgotten there
        migrated: dict[str, Any] = {
            "from": old.server_id,
            "protocol": route.protocol.name,
            "version": route.version,
            "groups": sorted(route.ctx.groups) if route.ctx is not None else [],
            "crashed": crashed,
        }
        items = (state or {}).get("items")
        if isinstance(items, bytes):
            migrated["items"] = items
        route.link = new
        new.routes[route.conn.connection_id] = route
        new.send(self._open_frame(route, migrated))
        for data in (*route.bounced, *route.held):
            new.send(ConnectionData(cid, data))
        route.bounced.clear()
        route.held.clear()
        route.held_bytes = 0
        route.moving = False

    async def _group_command(self, link: NodeLink, frame: GroupCommand) -> None:
        manager = self.hubs[link.hub.lower()].manager
        route = self.routes.get(frame.connection_id)
        if route is not None and route.registering is not None:  # its registration goes first
            with contextlib.suppress(Exception):
                await asyncio.shield(route.registering)
        try:
            if frame.join:
                await manager.add_to_group(frame.connection_id, frame.group)
            else:
                await manager.remove_from_group(frame.connection_id, frame.group)
        except HubException as exc:
            link.send(Ack(frame.ack_id, ACK_ERROR, str(exc)))
            return
        except Exception as exc:  # the backplane's ack timed out, Redis is down
            log.warning("group command for %s failed: %s", frame.connection_id, exc)
            link.send(Ack(frame.ack_id, ACK_ERROR, "The group change could not be made."))
            return
        link.send(Ack(frame.ack_id, ACK_OK))

    def _fan_out(self, link: NodeLink, frame: ServiceFrame) -> None:
        """Deliver through this node's manager (and the backplane to the other nodes), in order."""
        send = self.hubs[link.hub.lower()].manager.send_serialized
        match frame:
            case BroadcastData():
                send("all", (), _message(frame.payloads), frame.excluded)
            case GroupBroadcastData():
                send("groups", (frame.group,), _message(frame.payloads), frame.excluded)
            case MultiGroupBroadcastData():
                send("groups", frame.groups, _message(frame.payloads), frame.excluded)
            case UserData():
                send("users", (frame.user_id,), _message(frame.payloads))
            case MultiUserData():
                send("users", frame.user_ids, _message(frame.payloads))
            case MultiConnectionData():
                send("connections", frame.connection_ids, _message(frame.payloads))
            case _:
                log.warning("unexpected frame from app server %s: %s", link.server_id, type(frame).__name__)


def _message(payloads: dict[str, bytes]) -> PreframedMessage:
    """A message already framed for each protocol (the app server framed it once)."""
    return PreframedMessage(_UNFRAMED, dict(payloads))


#: what a pre-framed message stands for; never framed itself (PreframedMessage)
_UNFRAMED = InvocationMessage("", [])
