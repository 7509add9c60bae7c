"""Connection applications: the hub dispatcher (handshake, invocations, streams) and raw handlers.

A transport calls :meth:`ConnectionApplication.on_connect`, then
:meth:`~ConnectionApplication.on_receive` with every inbound chunk, then
:meth:`~ConnectionApplication.on_disconnect`. :class:`HubEndpoint` runs the
SignalR hub protocol on top of that; :class:`RawEndpoint` hands bytes to a
plain handler (e.g. an echo connection).
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import msgspec

from . import tracing
from .clients import HubCallerClients
from .connection import Connection
from .context import HubCallerContext, HubConnectionContext
from .exceptions import HubException, error_type_name
from .hub import GroupManager, Hub, HubContext, HubMethod, Policy, check_policies, discover_methods
from .lifetime import HubLifetimeManager
from .options import HubOptions
from .protocol.base import HubProtocol, MessageParser, TransferFormat
from .protocol.errors import HandshakeError, InvalidDataError
from .protocol.handshake import HANDSHAKE_CANCELED, handshake_response, parse_handshake
from .protocol.messages import (
    PING,
    CancelInvocationMessage,
    CloseMessage,
    CompletionMessage,
    HubMessage,
    InvocationMessage,
    PingMessage,
    StreamInvocationMessage,
    StreamItemMessage,
)

__all__ = [
    "RATE_LIMITED",
    "ConnectionApplication",
    "EndpointStats",
    "HubEndpoint",
    "RawEndpoint",
    "UploadStream",
    "current_connection",
]

log = logging.getLogger("hubwire.hub")

#: the connection whose hub method is running in this task (for client-result checks)
current_connection: contextvars.ContextVar[HubConnectionContext | None] = contextvars.ContextVar(
    "hubwire_current_connection", default=None
)

CONNECTION_ERROR = "Connection closed with an error."

#: completion error of a call refused by ``HubOptions.max_invocations_per_second``
RATE_LIMITED = "Failed to invoke '{target}' because the invocation rate limit was exceeded."


def _invoke_error(target: str) -> str:
    return f"An unexpected error occurred invoking '{target}' on the server."


def error_text(base: str, exc: BaseException, detailed: bool) -> str:
    """SignalR's rule: add ``<Type>: <message>`` for HubException or when detailed errors are on."""
    if isinstance(exc, HubException) or detailed:
        return f"{base} {error_type_name(exc)}: {exc}"
    return base


class ConnectionApplication(abc.ABC):
    """What runs on top of a connection's byte streams."""

    #: transports this endpoint accepts
    transports: tuple[str, ...]
    #: hub-level authorization (None = anonymous allowed)
    policies: tuple[Policy, ...] | None = None

    @abc.abstractmethod
    async def on_connect(self, conn: Connection) -> None:
        """The transport is up; bytes will follow."""

    @abc.abstractmethod
    async def on_receive(self, conn: Connection, data: bytes) -> None:
        """Inbound bytes (any chunking). Awaiting here applies back-pressure to the client."""

    @abc.abstractmethod
    async def on_disconnect(self, conn: Connection, error: BaseException | None) -> None:
        """The connection is over (called exactly once per connected connection)."""

    def tick(self, now: float) -> None:  # noqa: B027 - optional hook
        """Called about once a second by the server heartbeat."""

    def server_closing(self, conn: Connection) -> None:
        """The server is shutting down: end ``conn`` (hubs invite the client to reconnect)."""
        conn.abort("server shutting down")


class RawEndpoint(ConnectionApplication):
    """A connection without the hub protocol: ``handler(conn, data)`` gets every inbound chunk."""

    def __init__(
        self,
        handler: Callable[[Connection, bytes], Awaitable[None] | None],
        transports: Sequence[str],
        transfer_format: TransferFormat = TransferFormat.TEXT,
    ) -> None:
        self.handler = handler
        self.transports = tuple(transports)
        self.transfer_format = transfer_format

    async def on_connect(self, conn: Connection) -> None:
        conn.transfer_format = self.transfer_format

    async def on_receive(self, conn: Connection, data: bytes) -> None:
        result = self.handler(conn, data)
        if inspect.isawaitable(result):
            await result

    async def on_disconnect(self, conn: Connection, error: BaseException | None) -> None:
        return None


class UploadStream:
    """A client-to-server stream handed to a hub method as an async iterator.

    Holds at most ``capacity`` items; when full, the connection's reader waits
    (back-pressure on the whole connection, as in SignalR).
    """

    _END = object()

    def __init__(self, capacity: int, convert: Callable[[Any], Any] | None) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=max(1, capacity))
        self._convert = convert
        self._error: BaseException | None = None
        self._end_pending = False

    async def put(self, item: Any) -> None:
        await self._queue.put(item)

    def complete(self, error: str | None = None) -> None:
        if error is not None:
            self._error = HubException(error)
        try:
            self._queue.put_nowait(self._END)
        except asyncio.QueueFull:  # reader is behind: queue the end once it has taken an item
            self._end_pending = True

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if self._end_pending:  # the get made room for the end marker (never drop buffered items)
            self._end_pending = False
            self._queue.put_nowait(self._END)
        if item is self._END:
            self._queue.put_nowait(self._END)  # stay ended for further reads
            if self._error is not None:
                raise self._error
            raise StopAsyncIteration
        if self._convert is not None:
            try:
                return self._convert(item)
            except msgspec.ValidationError as exc:
                raise HubException(f"Error binding stream item: {exc}") from None
        return item


class _HubConnectionState:
    """Per-connection state of the hub application before and after the handshake."""

    __slots__ = ("buffer", "ctx", "parser", "started")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.ctx: HubConnectionContext | None = None
        self.parser: MessageParser | None = None
        self.started = time.monotonic()


class _BindError(Exception):
    pass


class EndpointStats:
    """Counters of one hub endpoint: plain ints bumped on the hot path, exported at scrape time."""

    __slots__ = (
        "closed",
        "handshake_failures",
        "invocation_errors",
        "invocations",
        "messages_received",
        "opened",
        "rate_limited",
    )

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.handshake_failures = 0
        self.messages_received = 0
        self.invocations = 0
        self.invocation_errors = 0
        self.rate_limited = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class HubEndpoint(ConnectionApplication):
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
        self.methods: dict[str, HubMethod] = discover_methods(hub_cls)
        self.manager = manager
        self.protocols = {p.name: p for p in protocols}
        manager.protocols = tuple(protocols)
        self.options = options
        self.transports = tuple(transports)
        self.policies = hub_cls.__dict__.get("__hub_authorization__")
        self.context = HubContext(manager)
        self.groups = GroupManager(manager)
        self.pending: dict[str, Connection] = {}
        self.connected: dict[str, HubConnectionContext] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ping_cache: dict[str, bytes] = {p.name: p.write_message(PING) for p in protocols}
        self.stats = EndpointStats()
        rate = options.max_invocations_per_second
        self._rate = rate if rate is not None and rate > 0 else None
        self._burst = float(options.invocation_burst or max(1, math.ceil(rate or 1)))

    # -- connection lifecycle --------------------------------------------------------------------

    async def on_connect(self, conn: Connection) -> None:
        conn.application_state = _HubConnectionState()
        self.pending[conn.connection_id] = conn

    async def on_receive(self, conn: Connection, data: bytes) -> None:
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
            text = (
                str(exc)
                if str(exc) == HANDSHAKE_CANCELED
                else error_text(
                    "An unexpected error occurred during connection handshake.",
                    exc,
                    self.options.enable_detailed_errors,
                )
            )
            self._fail_handshake(conn, text)
            return
        if parsed is None:
            return
        request, used = parsed
        protocol = self.protocols.get(request.protocol)
        error: str | None = None
        if protocol is None:
            error = f"The protocol '{request.protocol}' is not supported."
        elif request.version > protocol.version:
            error = (
                f"The server does not support version {request.version} of the '{protocol.name}' protocol."
            )
        elif protocol.transfer_format is TransferFormat.BINARY and conn.transport_name == "ServerSentEvents":
            error = (
                f"Cannot use the '{protocol.name}' protocol on the current transport. "
                "The transport does not support 'Binary' transfer format."
            )
        if error is not None or protocol is None:
            self._fail_handshake(conn, error or "")
            return
        rest = bytes(state.buffer[used:])
        state.buffer.clear()
        ctx = HubConnectionContext(
            conn, protocol, request.version, self.options.maximum_parallel_invocations_per_client
        )
        ctx.received = ctx.rate_stamp = time.monotonic()
        ctx.rate_tokens = self._burst
        state.ctx = ctx
        state.parser = protocol.parser(limit)
        conn.transfer_format = protocol.transfer_format
        conn.write(handshake_response())
        self.pending.pop(conn.connection_id, None)
        self.connected[conn.connection_id] = ctx
        self.stats.opened += 1
        await self.manager.on_connected(ctx)
        try:
            hub = self._hub(ctx)
            await hub.on_connected()
        except Exception as exc:
            log.exception("on_connected failed for %s", conn.connection_id)
            ctx.close(
                error_text(CONNECTION_ERROR, exc, self.options.enable_detailed_errors), allow_reconnect=False
            )
            return
        if rest:
            await self._receive(ctx, state, rest)

    def _fail_handshake(self, conn: Connection, text: str) -> None:
        log.debug("handshake failed for %s: %s", conn.connection_id, text)
        self.stats.handshake_failures += 1
        self.pending.pop(conn.connection_id, None)
        conn.write(handshake_response(text))
        conn.abort(text)

    async def on_disconnect(self, conn: Connection, error: BaseException | None) -> None:
        self.pending.pop(conn.connection_id, None)
        state: _HubConnectionState | None = conn.application_state
        ctx = state.ctx if state else None
        if ctx is None or self.connected.pop(conn.connection_id, None) is None:
            return
        self.stats.closed += 1
        for stream_task in list(ctx.active_streams.values()):
            stream_task.cancel()
        for upload in list(ctx.upload_streams.values()):
            upload.complete("Connection terminated while reading a stream.")
        ctx.upload_streams.clear()
        try:
            hub = self._hub(ctx)
            await hub.on_disconnected(error)
        except Exception:
            log.exception("on_disconnected failed for %s", conn.connection_id)
        finally:
            await self.manager.on_disconnected(ctx)

    def server_closing(self, conn: Connection) -> None:
        ctx = self.connected.get(conn.connection_id)
        if ctx is not None and ctx.connection is conn:
            ctx.close(None, allow_reconnect=True)
        else:
            conn.abort("server shutting down")

    def tick(self, now: float) -> None:
        opts = self.options
        for conn in list(self.pending.values()):
            state: _HubConnectionState = conn.application_state
            if now - state.started > opts.handshake_timeout:
                self._fail_handshake(conn, HANDSHAKE_CANCELED)
        for ctx in list(self.connected.values()):
            conn = ctx.connection
            if conn.transport_name == "LongPolling":
                continue  # long polling is its own keep-alive
            out = conn.outbox
            if out.wrote:
                out.wrote = False
                ctx.last_write = now
            elif now - ctx.last_write >= opts.keep_alive_interval:
                out.write(self._ping_cache[ctx.protocol.name])
                out.wrote = False
                ctx.last_write = now
            if ctx.received_since_tick:
                ctx.received_since_tick = False
                ctx.received = now
            elif ctx.first_ping_seen and now - ctx.received > opts.client_timeout_interval:
                detail = (
                    " OperationCanceledException: Client hasn't sent a message/ping within the configured "
                    "ClientTimeoutInterval."
                    if opts.enable_detailed_errors
                    else ""
                )
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
            ctx.close(
                error_text(CONNECTION_ERROR, exc, self.options.enable_detailed_errors), allow_reconnect=True
            )
            return
        self.stats.messages_received += len(messages)
        for message in messages:
            if ctx.connection.outbox.closed:
                return
            await self._dispatch(ctx, message)

    async def _dispatch(self, ctx: HubConnectionContext, message: HubMessage) -> None:
        if isinstance(message, InvocationMessage | StreamInvocationMessage):
            await self._invoke(ctx, message)
        elif isinstance(message, StreamItemMessage):
            upload = ctx.upload_streams.get(message.invocation_id)
            if upload is not None:
                await upload.put(message.item)
            else:
                log.debug("stream item for unknown stream %r", message.invocation_id)
        elif isinstance(message, CompletionMessage):
            upload = ctx.upload_streams.pop(message.invocation_id, None)
            if upload is not None:
                upload.complete(message.error)
            elif not self.manager.set_connection_result(ctx, message):
                log.debug("completion for unknown invocation %r", message.invocation_id)
        elif isinstance(message, CancelInvocationMessage):
            stream_task = ctx.active_streams.get(message.invocation_id)
            if stream_task is not None:
                # one loop step later: a cancel right behind its StreamInvocation (same frame or
                # POST) would otherwise cancel the task before it ever ran, so the method would
                # never see the cancellation and no Completion would be sent
                asyncio.get_running_loop().call_soon(stream_task.cancel)
        elif isinstance(message, PingMessage):
            ctx.first_ping_seen = True
        elif isinstance(message, CloseMessage):
            ctx.connection.write(ctx.protocol.write_message(CloseMessage()))
            ctx.connection.abort(message.error or "client closed")
        # Ack / Sequence: stateful reconnect is not enabled; ignore

    def _hub(self, ctx: HubConnectionContext) -> Hub:
        hub = self.hub_cls()
        hub.context = HubCallerContext(ctx)
        hub.clients = HubCallerClients(self.manager, ctx)
        hub.groups = self.groups
        return hub

    def _complete_error(self, ctx: HubConnectionContext, invocation_id: str | None, text: str) -> None:
        self.stats.invocation_errors += 1
        if invocation_id:
            ctx.write_message(CompletionMessage.with_error(invocation_id, text))

    async def _invoke(
        self, ctx: HubConnectionContext, msg: InvocationMessage | StreamInvocationMessage
    ) -> None:
        detailed = self.options.enable_detailed_errors
        target = msg.target
        invocation_id = msg.invocation_id
        self.stats.invocations += 1
        if self._rate is not None and not self._take_token(ctx, self._rate):
            self.stats.rate_limited += 1
            log.debug(
                "rate limit: %s called %r too often",
                ctx.connection_id,
                target,
                extra={"connection_id": ctx.connection_id, "event": "rate_limited"},
            )
            self._complete_error(ctx, invocation_id, RATE_LIMITED.format(target=target))
            return
        method = self.methods.get(target.lower())
        streaming_call = isinstance(msg, StreamInvocationMessage)
        if method is None:
            log.debug("unknown hub method %r", target)
            self._complete_error(ctx, invocation_id, f"Unknown hub method '{target}'")
            return
        if method.is_streaming and not streaming_call:
            self._complete_error(
                ctx,
                invocation_id,
                f"The client attempted to invoke the streaming '{target}' method "
                "with a non-streaming invocation.",
            )
            return
        if streaming_call and not method.is_streaming:
            self._complete_error(
                ctx,
                invocation_id,
                f"The client attempted to invoke the non-streaming '{target}' method "
                "with a streaming invocation.",
            )
            return
        if method.policies is not None and not await check_policies(
            ctx.connection.principal, method.policies
        ):
            self._complete_error(
                ctx, invocation_id, f"Failed to invoke '{target}' because user is unauthorized"
            )
            return
        if streaming_call and invocation_id in ctx.active_streams:
            self._complete_error(ctx, invocation_id, f"Invocation ID '{invocation_id}' is already in use.")
            return
        try:
            args = self._bind(method, msg.arguments)
        except _BindError as exc:
            text = f"Failed to invoke '{target}' due to an error on the server."
            if detailed:
                text += f" InvalidDataException: {exc}"
            self._complete_error(ctx, invocation_id, text)
            return
        stream_params = method.stream_params
        stream_ids = msg.stream_ids or []
        if len(stream_ids) != len(stream_params):
            mismatch = HubException(
                f"Client sent {len(stream_ids)} stream(s), Hub method expects {len(stream_params)}."
            )
            self._complete_error(
                ctx,
                invocation_id,
                error_text(_invoke_error(target), mismatch, detailed),
            )
            return
        if stream_params:
            # a stream id already streaming here (or twice in one call) would orphan the first
            # stream: its hub method would wait for items forever, holding the invocation slot
            taken = next(
                (
                    sid
                    for i, sid in enumerate(stream_ids)
                    if sid in ctx.upload_streams or sid in stream_ids[:i]
                ),
                None,
            )
            if taken is not None:
                self._complete_error(ctx, invocation_id, f"Stream ID '{taken}' is already in use.")
                return
            uploads = {}
            for sid, param in zip(stream_ids, stream_params, strict=True):
                uploads[sid] = UploadStream(self.options.stream_buffer_capacity, param.convert)
            ctx.upload_streams.update(uploads)
            args = self._merge_streams(method, args, list(uploads.values()))
        hub = self._hub(ctx)
        span = tracing.start_invocation_span(
            self.hub_cls.__name__, target, ctx.connection_id, invocation_id, msg.headers
        )
        if streaming_call:
            assert invocation_id is not None
            stream_task = asyncio.get_running_loop().create_task(
                self._run_stream(ctx, method, hub, args, target, invocation_id, stream_ids, span)
            )
            ctx.active_streams[invocation_id] = stream_task
            self._track(stream_task)
            return
        await ctx.invocation_slots.acquire()
        self._track(
            asyncio.get_running_loop().create_task(
                self._run_invocation(ctx, method, hub, args, target, invocation_id, stream_ids, span)
            )
        )

    def _take_token(self, ctx: HubConnectionContext, rate: float) -> bool:
        """Token bucket of one connection: refill at ``rate`` per second up to the burst size."""
        now = time.monotonic()
        tokens = min(self._burst, ctx.rate_tokens + (now - ctx.rate_stamp) * rate)
        ctx.rate_stamp = now
        if tokens < 1.0:
            ctx.rate_tokens = tokens
            return False
        ctx.rate_tokens = tokens - 1.0
        return True

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _bind(method: HubMethod, arguments: list[Any]) -> list[Any]:
        params = method.arg_params
        required = sum(1 for p in params if not p.has_default)
        if not required <= len(arguments) <= len(params):
            expected = len(params) if required == len(params) else f"{required} to {len(params)}"
            raise _BindError(
                f"Invocation provides {len(arguments)} argument(s) but target expects {expected}."
            )
        out = []
        for value, param in zip(arguments, params, strict=False):
            if param.convert is None:
                out.append(value)
                continue
            try:
                out.append(param.convert(value))
            except (msgspec.ValidationError, TypeError, ValueError):
                raise _BindError(
                    "Error binding arguments. Make sure that the types of the provided values match "
                    "the types of the hub method being invoked."
                ) from None
        return out

    @staticmethod
    def _merge_streams(method: HubMethod, args: list[Any], uploads: list[UploadStream]) -> list[Any]:
        merged: list[Any] = []
        values = iter(args)
        streams = iter(uploads)
        for param in method.params:
            if param.is_stream:
                merged.append(next(streams))
            else:
                try:
                    merged.append(next(values))
                except StopIteration:
                    break
        return merged

    def _finish(self, ctx: HubConnectionContext, stream_ids: list[str]) -> None:
        for sid in stream_ids:
            ctx.upload_streams.pop(sid, None)

    async def _run_invocation(
        self,
        ctx: HubConnectionContext,
        method: HubMethod,
        hub: Hub,
        args: list[Any],
        target: str,
        invocation_id: str | None,
        stream_ids: list[str],
        span: Any = None,
    ) -> None:
        current_connection.set(ctx)
        tracing.activate(span)
        try:
            result = await method.func(hub, *args)
        except Exception as exc:
            log.debug("hub method %s raised", target, exc_info=True)
            tracing.failed(span, exc)
            self._complete_error(
                ctx,
                invocation_id,
                error_text(
                    f"An unexpected error occurred invoking '{target}' on the server.",
                    exc,
                    self.options.enable_detailed_errors,
                ),
            )
        else:
            if invocation_id:
                try:
                    ctx.write_message(CompletionMessage.with_result(invocation_id, result))
                except (TypeError, ValueError, msgspec.EncodeError) as exc:
                    log.error("cannot serialize the result of %s: %s", target, exc)
                    self._complete_error(
                        ctx,
                        invocation_id,
                        error_text(
                            f"An unexpected error occurred invoking '{target}' on the server.",
                            exc,
                            self.options.enable_detailed_errors,
                        ),
                    )
        finally:
            ctx.invocation_slots.release()
            self._finish(ctx, stream_ids)
            tracing.end(span)

    async def _run_stream(
        self,
        ctx: HubConnectionContext,
        method: HubMethod,
        hub: Hub,
        args: list[Any],
        target: str,
        invocation_id: str,
        stream_ids: list[str],
        span: Any = None,
    ) -> None:
        current_connection.set(ctx)
        tracing.activate(span)
        detailed = self.options.enable_detailed_errors
        produced = False
        iterator: Any = None
        try:
            source = method.func(hub, *args)
            if inspect.isawaitable(source):
                source = await source
            if source is None or not hasattr(source, "__aiter__"):
                ctx.write_message(
                    CompletionMessage.with_error(
                        invocation_id,
                        f"The value returned by the streaming method '{target}' is not a ChannelReader<> "
                        "or IAsyncEnumerable<>.",
                    )
                )
                return
            iterator = source.__aiter__()
            while True:
                try:
                    item = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                produced = True
                ctx.write_message(StreamItemMessage(invocation_id, item))
            ctx.write_message(CompletionMessage.empty(invocation_id))
        except asyncio.CancelledError:
            ctx.write_message(CompletionMessage.empty(invocation_id))
        except Exception as exc:
            self.stats.invocation_errors += 1
            tracing.failed(span, exc)
            base = (
                "An error occurred on the server while streaming results."
                if produced
                else f"An unexpected error occurred invoking '{target}' on the server."
            )
            ctx.write_message(CompletionMessage.with_error(invocation_id, error_text(base, exc, detailed)))
        finally:
            ctx.active_streams.pop(invocation_id, None)
            self._finish(ctx, stream_ids)
            tracing.end(span)
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    log.debug("closing stream %s failed", target, exc_info=True)

    async def close(self) -> None:
        """Cancel whatever hub work is still running (server shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
