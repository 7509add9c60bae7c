"""The hub connection handler: a connection's hub life from handshake to disconnect.

It is the :class:`~hubwire.connections.application.ConnectionApplication` of
a hub path: it runs the handshake (protocol choice, version, transfer format
against what the transport declares it can carry), keeps the connection alive
(pings, client timeout, handshake timeout), tells the lifetime manager and
the hub about connects and disconnects, and hands every parsed message to the
:class:`~hubwire.hubs.dispatcher.HubDispatcher`.

Stateful reconnect (handshake version 2 on a connection negotiate granted it,
over a resumable transport): the outbox numbers and keeps what is sent, this
handler acknowledges what was received (at most once a second, from the
heartbeat), drops what the client resends after a reconnect, and on a resume
sends the Sequence and the replay (:meth:`HubConnectionHandler.on_resume`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import msgspec

from ..connections.application import ConnectionApplication
from ..connections.connection import Connection
from ..connections.replay import TRACKABLE, SequenceError
from ..connections.tasks import BackgroundTasks
from ..exceptions import HubException
from ..options import HubOptions
from ..protocol.base import HubProtocol, MessageParser, TransferFormat
from ..protocol.errors import HandshakeError, InvalidDataError
from ..protocol.handshake import HANDSHAKE_CANCELED, handshake_response, parse_handshake
from ..protocol.messages import PING, HubMessage
from .clients import HubCallerClients
from .context import HubCallerContext, HubConnectionContext
from .dispatcher import CONNECTION_ERROR, EndpointStats, HubDispatcher, error_text
from .hub import GroupManager, Hub, HubContext, HubMethod, discover_methods
from .lifetime import HubLifetimeManager

__all__ = ["HubConnectionHandler"]

log = logging.getLogger("hubwire.hub")

_items_encoder = msgspec.msgpack.Encoder()
_items_decoder = msgspec.msgpack.Decoder()

_CLIENT_TIMEOUT_DETAIL = (
    " OperationCanceledException: Client hasn't sent a message/ping within the configured "
    "ClientTimeoutInterval."
)


class _HubConnectionState:
    """Per-connection state of the hub application before and after the handshake."""

    __slots__ = ("buffer", "ctx", "parser", "started")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.ctx: HubConnectionContext | None = None
        self.parser: MessageParser | None = None
        self.started = time.monotonic()


class HubConnectionHandler(ConnectionApplication):
    """Runs one hub class for the connections of one path."""

    def __init__(
        self,
        hub_cls: type[Hub],
        manager: HubLifetimeManager,
        protocols: Sequence[HubProtocol],
        options: HubOptions,
        transports: Sequence[str],
    ) -> None:
        self.hub_cls = hub_cls
        custom_results = any(p.encodes_custom_types for p in protocols)
        self.methods: dict[str, HubMethod] = discover_methods(hub_cls, custom_results=custom_results)
        self.manager = manager
        self.protocols = {p.name: p for p in protocols}
        self.options = options
        self.transports = tuple(transports)
        self.policies = hub_cls.__dict__.get("__hub_authorization__")
        self.context = HubContext(manager, options.max_group_name_length)
        self.backplane_name: str | None = getattr(manager, "hub_name", None)
        self.groups = GroupManager(manager, options.max_group_name_length)
        self.pending: dict[str, Connection] = {}
        self.connected: dict[str, HubConnectionContext] = {}
        #: hub methods and streams running for this path's connections
        self.tasks = BackgroundTasks(f"hub {hub_cls.__name__}")
        self._ping_cache: dict[str, bytes] = {p.name: p.write_message(PING) for p in protocols}
        self.stats = EndpointStats()
        self.dispatcher = HubDispatcher(
            hub_cls, self.methods, manager, options, self.stats, self.tasks, self._hub
        )

    # -- connection lifecycle --------------------------------------------------------------------

    async def on_connect(self, conn: Connection) -> None:
        conn.application_state = _HubConnectionState()
        self.pending[conn.connection_id] = conn

    async def on_receive(self, conn: Connection, data: bytes) -> None:
        if conn.outbox.closed:
            return  # failed or closing (a refused handshake, a bad message): no more input is taken
        state: _HubConnectionState = conn.application_state
        if state.ctx is None:
            state.buffer += data
            await self._handshake(conn, state)
            return
        await self._receive(state.ctx, state, data)

    async def _handshake(self, conn: Connection, state: _HubConnectionState) -> None:
        limit = self.options.maximum_receive_message_size
        try:
            parsed = parse_handshake(state.buffer, limit)
        except HandshakeError as exc:
            text = str(exc)
            if text != HANDSHAKE_CANCELED:
                base = "An unexpected error occurred during connection handshake."
                text = error_text(base, exc, self.options.enable_detailed_errors)
            self._fail_handshake(conn, text)
            return
        if parsed is None:
            return
        request, used = parsed
        protocol = self.protocols.get(request.protocol)
        error = self._refusal(conn, protocol, request.protocol, request.version)
        if error is not None or protocol is None:
            self._fail_handshake(conn, error or "")
            return
        rest = bytes(state.buffer[used:])
        state.buffer.clear()
        ctx = self._context(conn, protocol, request.version)
        state.ctx = ctx
        state.parser = protocol.parser(limit)
        conn.transfer_format = protocol.transfer_format
        conn.write_control(handshake_response())
        if request.version >= 2 and self._resumable(conn):
            conn.outbox.enable_replay(*self.options.replay_limits)
        self.pending.pop(conn.connection_id, None)
        self.connected[conn.connection_id] = ctx
        self.stats.opened += 1
        await self.manager.on_connected(ctx)
        try:
            await self._hub(ctx).on_connected()
        except Exception as exc:
            log.exception("on_connected failed for %s", conn.connection_id)
            detailed = self.options.enable_detailed_errors
            ctx.close(error_text(CONNECTION_ERROR, exc, detailed), allow_reconnect=False)
            return
        if rest:
            await self._receive(ctx, state, rest)

    def _context(self, conn: Connection, protocol: HubProtocol, version: int) -> HubConnectionContext:
        """The hub context of a connection whose handshake chose ``protocol`` / ``version``."""
        opts = self.options
        ctx = HubConnectionContext(conn, protocol, version, opts.maximum_parallel_invocations_per_client)
        ctx.max_groups = opts.max_groups_per_connection
        ctx.max_group_name_length = opts.max_group_name_length
        ctx.max_streams = opts.max_streams_per_connection
        ctx.received = ctx.rate_stamp = time.monotonic()
        ctx.rate_tokens = self.dispatcher.burst
        return ctx

    def _resumable(self, conn: Connection) -> bool:
        """Negotiate granted stateful reconnect, the hub allows it and the transport can resume."""
        features = conn.features
        return (
            conn.stateful
            and self.options.allow_stateful_reconnect
            and self.options.stateful_reconnect_buffer_size > 0
            and features is not None
            and features.resumable
        )

    @staticmethod
    def _refusal(conn: Connection, protocol: HubProtocol | None, name: str, version: int) -> str | None:
        """Why a handshake asking for ``name`` / ``version`` cannot be accepted, or None."""
        if protocol is None:
            return f"The protocol '{name}' is not supported."
        if version > protocol.version:
            return f"The server does not support version {version} of the '{protocol.name}' protocol."
        binary_ok = conn.features is None or conn.features.binary
        if protocol.transfer_format is TransferFormat.BINARY and not binary_ok:
            return (
                f"Cannot use the '{protocol.name}' protocol on the current transport. "
                "The transport does not support 'Binary' transfer format."
            )
        return None

    def _fail_handshake(self, conn: Connection, text: str) -> None:
        log.debug("handshake failed for %s: %s", conn.connection_id, text)
        self.stats.handshake_failures += 1
        self.pending.pop(conn.connection_id, None)
        state = conn.application_state
        if isinstance(state, _HubConnectionState):
            state.buffer = bytearray()  # what was received is dropped, not kept or searched again
        conn.write_control(handshake_response(text))
        conn.abort(text)

    async def on_disconnect(self, conn: Connection, error: BaseException | None) -> None:
        self.pending.pop(conn.connection_id, None)
        state: _HubConnectionState | None = conn.application_state
        ctx = state.ctx if state else None
        if ctx is None or self.connected.pop(conn.connection_id, None) is None:
            return
        self.stats.closed += 1
        self.dispatcher.connection_ended(ctx)
        try:
            await self._hub(ctx).on_disconnected(error)
        except Exception:
            log.exception("on_disconnected failed for %s", conn.connection_id)
        finally:
            await self.manager.on_disconnected(ctx)

    async def on_resume(self, conn: Connection) -> None:
        """Stateful reconnect: a new WebSocket carries ``conn``: Sequence, replay, fresh parser.

        What arrives on the new transport is ignored until the client's own
        Sequence, then duplicates of what was handled before are dropped.
        """
        state: _HubConnectionState | None = conn.application_state
        ctx = state.ctx if state is not None else None
        replay = conn.outbox.replay
        if state is None or ctx is None or replay is None:
            conn.abort("not resumable")
            return
        self.stats.resumed += 1
        self.stats.replayed += conn.outbox.resume(ctx.protocol)
        state.parser = ctx.protocol.parser(self.options.maximum_receive_message_size)
        ctx.received = time.monotonic()
        ctx.received_since_tick = True

    # -- moving a connection between instances --------------------------------------------------

    def export_for_move(self, conn: Connection) -> dict[str, Any] | str:
        """Protocol, user, groups and items of a resumable connection, for the instance taking it.

        Items must be MessagePack-able to move (anything else cannot cross a
        process boundary); upload streams in progress cannot follow either.
        Both refusals make the client start a new connection instead.
        """
        state: _HubConnectionState | None = conn.application_state
        ctx = state.ctx if state is not None else None
        if ctx is None or self.connected.get(conn.connection_id) is not ctx:
            return "no hub connection"
        if ctx.upload_streams or ctx.active_streams:
            return "streams are in progress (their cancels and items could not follow)"
        try:
            items = _items_encoder.encode(conn.items)
        except (TypeError, ValueError, OverflowError) as exc:
            return f"its items cannot be serialized ({exc})"
        return {
            "protocol": ctx.protocol.name,
            "version": ctx.handshake_version,
            "user": ctx.user_identifier,
            "groups": sorted(ctx.groups),
            "items": items,
        }

    def _moved_state(
        self, conn: Connection, state: dict[str, Any], lowest_version: int
    ) -> tuple[HubProtocol, int, list[str]]:
        """Protocol, handshake version and groups of a connection moved here (checked: the state
        came from another process), and its items put on ``conn``. Raises ``ValueError``."""
        protocol = self.protocols.get(state.get("protocol"))  # type: ignore[arg-type]
        version, groups, items = state.get("version"), state.get("groups"), state.get("items")
        if (
            protocol is None
            or not isinstance(version, int)
            or not lowest_version <= version <= protocol.version
            or not isinstance(groups, list)
            or not all(isinstance(g, str) for g in groups)
            or not isinstance(items, bytes)
        ):
            raise ValueError("malformed state of a moved connection")
        decoded = _items_decoder.decode(items)
        if not isinstance(decoded, dict):
            raise ValueError("malformed items of a moved connection")
        conn.items = decoded
        return protocol, version, groups

    def _adopt(self, conn: Connection, protocol: HubProtocol, version: int) -> HubConnectionContext:
        """The hub state of a connection moved here, its handshake done elsewhere."""
        ctx = self._context(conn, protocol, version)
        hub_state = _HubConnectionState()
        hub_state.ctx = ctx
        hub_state.parser = protocol.parser(self.options.maximum_receive_message_size)
        conn.application_state = hub_state
        conn.transfer_format = protocol.transfer_format
        return ctx

    async def import_moved(self, conn: Connection, state: dict[str, Any]) -> None:
        """Register a connection moved here (its context, user and groups) before its replay.

        It is suspended (no transport yet): what is sent to it from now on is kept.
        ``on_connected`` does not run again: for hub code this is the same connection.
        """
        protocol, version, groups = self._moved_state(conn, state, lowest_version=2)
        user = state.get("user")
        if not (user is None or isinstance(user, str)):
            raise ValueError("malformed state of a moved connection")
        owner = conn.principal.identifier if conn.principal is not None else None
        if user != owner:
            raise ValueError("the moved connection belongs to another user")
        ctx = self._adopt(conn, protocol, version)
        conn.application = self
        conn.outbox.enable_replay(*self.options.replay_limits)
        conn.outbox.detach()
        conn.outbox.tags = []  # told apart from the old owner's copies when its replay arrives
        self.connected[conn.connection_id] = ctx
        self.stats.moved_in += 1
        await self.manager.on_connected(ctx)
        for group in groups:
            try:
                await self.manager.add_to_group(conn.connection_id, group)
            except HubException as exc:  # this instance's limits: it stays out of that group
                log.warning("moved connection %s not put back in a group: %s", conn.connection_id, exc)

    def export_for_migration(self, conn: Connection) -> dict[str, Any] | str:
        """The items of a connection moving to another app server, once nothing of it runs here."""
        state: _HubConnectionState | None = conn.application_state
        ctx = state.ctx if state is not None else None
        if ctx is None or self.connected.get(conn.connection_id) is not ctx:
            return "no hub connection"
        if ctx.busy:
            return "a call or a stream of it is running"
        if state is not None and state.parser is not None and state.parser.buffered:
            return "a message of it is half received"
        try:
            items = _items_encoder.encode(conn.items)
        except (TypeError, ValueError, OverflowError) as exc:
            return f"its items cannot be serialized ({exc})"
        # the protocol, groups and origin matter when it is parked and comes back here
        return {
            "items": items,
            "protocol": ctx.protocol.name,
            "version": ctx.handshake_version,
            "groups": sorted(ctx.groups),
            "from": ctx.migrated_from,
        }

    async def migrate_in(self, conn: Connection, state: dict[str, Any]) -> None:
        """Run a connection another app server ran (the service replays no handshake: the client
        did it once). Its groups are the service's; ``on_connected`` runs again only when its
        old app server died (its items died with it)."""
        protocol, version, groups = self._moved_state(conn, {"items": b"\x80", **state}, lowest_version=0)
        ctx = self._adopt(conn, protocol, version)
        ctx.groups = set(groups)
        origin = state.get("from")
        parked = bool(state.get("parked"))  # it comes back from being parked here: not a move
        ctx.migrated_from = origin if isinstance(origin, str) else (None if parked else "?")
        self.connected[conn.connection_id] = ctx
        if not parked:
            self.stats.migrated_in += 1
        await self.manager.on_connected(ctx)
        if state.get("crashed"):
            try:
                await self._hub(ctx).on_connected()
            except Exception as exc:
                log.exception("on_connected failed for %s", conn.connection_id)
                ctx.close(error_text(CONNECTION_ERROR, exc, self.options.enable_detailed_errors))

    async def refresh_moved(self, conn: Connection, state: dict[str, Any]) -> None:
        """Groups and items as the old holder had them when it let go (changed since its offer)."""
        hub_state: _HubConnectionState | None = conn.application_state
        ctx = hub_state.ctx if hub_state is not None else None
        groups = state.get("groups")
        items = state.get("items")
        if ctx is None or not isinstance(groups, list) or not isinstance(items, bytes):
            raise ValueError("malformed state of a moved connection")
        decoded = _items_decoder.decode(items)
        if not isinstance(decoded, dict):
            raise ValueError("malformed items of a moved connection")
        conn.items = decoded
        wanted = {g for g in groups if isinstance(g, str)}
        for group in sorted(ctx.groups - wanted):
            await self.manager.remove_from_group(conn.connection_id, group)
        for group in sorted(wanted - ctx.groups):
            try:
                await self.manager.add_to_group(conn.connection_id, group)
            except HubException as exc:  # this instance's limits: it stays out of that group
                log.warning("moved connection %s not put back in a group: %s", conn.connection_id, exc)

    async def release_moved(self, conn: Connection, parked: bool = False) -> None:
        """``conn`` moved away (or, ``parked``, sleeps as a record here): unregister it here; hub
        methods still running keep running (what they send is forwarded to the new owner)."""
        state: _HubConnectionState | None = conn.application_state
        ctx = state.ctx if state is not None else None
        if ctx is None or self.connected.get(conn.connection_id) is not ctx:
            return
        del self.connected[conn.connection_id]
        if not parked:
            self.stats.moved_out += 1
        ctx.disconnected = True  # nothing new starts here for it
        await self.manager.on_disconnected(ctx)

    async def finish_moved_in(self, conn: Connection, delivered: Collection[tuple[str, int, str]]) -> None:
        state: _HubConnectionState | None = conn.application_state
        if state is not None and state.ctx is not None:
            await self.manager.on_moved_in(state.ctx, delivered)

    def channels_of(self, connection_id: str, user: str | None, groups: Collection[str]) -> list[str]:
        return self.manager.channels_of(connection_id, user, groups)

    async def abandon_moved(self, conn: Connection) -> None:
        state: _HubConnectionState | None = conn.application_state
        ctx = state.ctx if state is not None else None
        if ctx is None or self.connected.get(conn.connection_id) is not ctx:
            return
        del self.connected[conn.connection_id]
        ctx.disconnected = True
        await self.manager.on_disconnected(ctx)

    def server_closing(self, conn: Connection) -> None:
        ctx = self.connected.get(conn.connection_id)
        if ctx is not None and ctx.connection is conn:
            ctx.close(None, allow_reconnect=True)
        else:
            conn.abort("server shutting down")

    def drain(self, conn: Connection, hand_over: Callable[[Connection], bool] | None, final: bool) -> bool:
        """Let ``conn`` go without losing what it is owed.

        A stateful-reconnect connection (when another instance can take it) has its WebSocket
        dropped without a Close: the client resumes wherever the load balancer sends it, and
        that instance takes the connection over with its unacknowledged messages and running
        calls - the client sees nothing. Streams cannot follow a move, so they finish first.
        Any other connection is closed with "reconnect allowed" once no hub method or stream
        of it is running (its results reach the client), or at the deadline.
        """
        ctx = self.connected.get(conn.connection_id)
        if ctx is None and conn.migrate is not None and not final:
            return False  # a linked connection that has not started here yet: it moves once it has
        if ctx is None or ctx.connection is not conn:
            conn.abort("server shutting down")
            return True
        if conn.migrate is not None:  # the connection service moves it to another app server
            if ctx.busy and not final:
                return False  # a call or stream of it runs: it moves once that is over
            if not ctx.busy and conn.migrate():
                self.stats.migrated_out += 1
                return True
            if not final:
                return False  # (input of it queued, a message half received): asked again shortly
        streaming = bool(ctx.active_streams or ctx.upload_streams)
        if hand_over is not None and conn.outbox.replay is not None and not streaming:
            if conn.outbox.detached:
                return True  # already without a transport: it resumes elsewhere, or times out
            if hand_over(conn):
                self.stats.handed_over += 1
                return True
        if ctx.busy and not final:
            return False
        self.stats.drain_closed += 1
        ctx.close(None, allow_reconnect=True)
        return True

    def tick(self, now: float) -> None:
        """Handshake timeouts, keep-alive pings and client timeouts (about once a second)."""
        opts = self.options
        for conn in list(self.pending.values()):
            state: _HubConnectionState = conn.application_state
            if now - state.started > opts.handshake_timeout:
                self._fail_handshake(conn, HANDSHAKE_CANCELED)
        for ctx in list(self.connected.values()):
            features = ctx.connection.features
            if features is not None and features.inherent_keep_alive:
                continue  # e.g. long polling: the polls are the keep-alive
            out = ctx.outbox
            replay = out.replay
            if replay is not None:
                if out.detached:
                    continue  # suspended: the disconnect timeout decides, not pings or the client timeout
                if out.ack_due(ctx.protocol) and out.journal is not None:
                    out.journal.touch()  # the handled count is part of the durable record
            if out.wrote:
                out.wrote = False
                ctx.last_write = now
            elif now - ctx.last_write >= opts.keep_alive_interval:
                out.write_control(self._ping_cache[ctx.protocol.name])
                out.wrote = False
                ctx.last_write = now
            if ctx.received_since_tick:
                ctx.received_since_tick = False
                ctx.received = now
            elif ctx.first_ping_seen and now - ctx.received > opts.client_timeout_interval:
                detail = _CLIENT_TIMEOUT_DETAIL if opts.enable_detailed_errors else ""
                ctx.close(CONNECTION_ERROR + detail, allow_reconnect=True)

    # -- inbound messages ------------------------------------------------------------------------

    async def _receive(self, ctx: HubConnectionContext, state: _HubConnectionState, data: bytes) -> None:
        ctx.received_since_tick = True
        assert state.parser is not None
        try:
            messages = state.parser.feed(data)
        except InvalidDataError as exc:
            log.info(
                "closing %s: bad message: %s",
                ctx.connection_id,
                exc,
                extra={"connection_id": ctx.connection_id, "event": "bad_message"},
            )
            detailed = self.options.enable_detailed_errors
            ctx.close(error_text(CONNECTION_ERROR, exc, detailed), allow_reconnect=True)
            return
        self.stats.messages_received += len(messages)
        replay = ctx.outbox.replay
        for message in messages:
            if ctx.connection.outbox.closed:
                return
            if replay is None:
                await self.dispatcher.dispatch(ctx, message)
            elif not replay.accept(message.type):
                if message.type in TRACKABLE and not replay.waiting_for_sequence:
                    self.stats.resent_dropped += 1
            elif not self._stateful_message(ctx, message):
                await self.dispatcher.dispatch(ctx, message)
                replay.processed()  # counted (and acknowledged) only once handled

    def _stateful_message(self, ctx: HubConnectionContext, message: HubMessage) -> bool:
        """Act on an Ack or Sequence (True), or leave ``message`` to the dispatcher (False)."""
        try:
            return ctx.outbox.peer_control(message)
        except SequenceError as exc:
            log.info("closing %s: %s", ctx.connection_id, exc, extra={"connection_id": ctx.connection_id})
            detailed = self.options.enable_detailed_errors
            ctx.close(error_text(CONNECTION_ERROR, exc, detailed), allow_reconnect=True)
            return True

    def _hub(self, ctx: HubConnectionContext) -> Hub:
        hub = self.hub_cls()
        hub.context = HubCallerContext(ctx)
        hub.clients = HubCallerClients(self.manager, ctx)
        hub.groups = self.groups
        return hub

    async def close(self) -> None:
        """Cancel whatever hub work is still running (server shutdown)."""
        await self.tasks.cancel_all()
