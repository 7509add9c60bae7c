"""The hub dispatcher: what a connected client sends, run against the hub.

Invocation checks in SignalR's order (rate limit, unknown method, streaming
mismatch, authorization, ids in use), argument binding from type hints,
server-to-client and client-to-server streams, cancellation, client-result
completions. It knows nothing of handshakes, keep-alive or transports: the
connection handler (:mod:`hubwire.hubs.handler`) parses messages and hands
them here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import msgspec

from ..connections.application import check_policies
from ..connections.tasks import BackgroundTasks
from ..exceptions import HubException, error_type_name
from ..options import HubOptions
from ..protocol.messages import (
    CancelInvocationMessage,
    CloseMessage,
    CompletionMessage,
    HubMessage,
    InvocationMessage,
    PingMessage,
    StreamInvocationMessage,
    StreamItemMessage,
)
from . import tracing
from .context import HubConnectionContext, current_connection
from .hub import Hub, HubMethod
from .lifetime import HubLifetimeManager
from .streams import UploadStream

__all__ = ["CONNECTION_ERROR", "RATE_LIMITED", "EndpointStats", "HubDispatcher", "error_text"]

log = logging.getLogger("hubwire.hub")

#: what a client is told when its connection ends by a server-side error
CONNECTION_ERROR = "Connection closed with an error."

#: completion error of a call refused by ``HubOptions.max_invocations_per_second``
RATE_LIMITED = "Failed to invoke '{target}' because the invocation rate limit was exceeded."

_STREAM_ERROR = "An error occurred on the server while streaming results."


def _invoke_error(target: str) -> str:
    return f"An unexpected error occurred invoking '{target}' on the server."


def error_text(base: str, exc: BaseException, detailed: bool) -> str:
    """SignalR's rule: add ``<Type>: <message>`` for HubException or when detailed errors are on."""
    if isinstance(exc, HubException) or detailed:
        return f"{base} {error_type_name(exc)}: {exc}"
    return base


class EndpointStats:
    """Counters of one hub endpoint: plain ints bumped on the hot path, exported at scrape time."""

    __slots__ = (
        "closed",
        "drain_closed",
        "forged_completions",
        "handed_over",
        "handshake_failures",
        "invocation_errors",
        "invocations",
        "messages_received",
        "migrated_in",
        "migrated_out",
        "moved_in",
        "moved_out",
        "opened",
        "rate_limited",
        "replayed",
        "resent_dropped",
        "resumed",
    )

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.handshake_failures = 0
        self.messages_received = 0
        self.invocations = 0
        self.invocation_errors = 0
        self.rate_limited = 0
        #: client-result Completions refused because another connection's call was named
        self.forged_completions = 0
        #: connections resumed on a new WebSocket (stateful reconnect)
        self.resumed = 0
        #: messages sent again on resumes (unacknowledged when the WebSocket dropped)
        self.replayed = 0
        #: messages a client sent again after a resume that had been handled before (dropped)
        self.resent_dropped = 0
        #: resumable connections taken over from another instance / handed over to one
        self.moved_in = 0
        #: connections moved between app servers by the connection service
        self.migrated_in = 0
        self.migrated_out = 0
        self.moved_out = 0
        #: draining: connections let go by dropping their WebSocket (to resume elsewhere) / closed
        #: with "reconnect allowed"
        self.handed_over = 0
        self.drain_closed = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class _Refused(Exception):
    """An invocation that must not run; the message is the completion's error text."""


class _BindError(_Refused):
    """Arguments that do not fit the method; ``detail`` says why, for the server's log."""

    def __init__(self, text: str, detail: str) -> None:
        super().__init__(text)
        self.detail = detail


def _log_failure(target: str, exc: Exception) -> None:
    """A HubException is meant for the caller (DEBUG); anything else is a bug of the hub: an
    ERROR with its traceback, as a Python developer expects (the client gets SignalR's text)."""
    if isinstance(exc, HubException):
        log.debug("hub method %s raised", target, exc_info=exc)
    else:
        log.error("hub method %s failed", target, exc_info=exc)


def _not_running(ctx: HubConnectionContext) -> None:
    ctx.running -= 1


class HubDispatcher:
    """Runs one hub class's methods for the connections of one path."""

    def __init__(
        self,
        hub_cls: type[Hub],
        methods: dict[str, HubMethod],
        manager: HubLifetimeManager,
        options: HubOptions,
        stats: EndpointStats,
        tasks: BackgroundTasks,
        make_hub: Callable[[HubConnectionContext], Hub],
    ) -> None:
        self.hub_cls = hub_cls
        self.methods = methods
        self.manager = manager
        self.options = options
        self.stats = stats
        self.tasks = tasks
        self.make_hub = make_hub
        rate = options.max_invocations_per_second
        self._rate = rate if rate is not None and rate > 0 else None
        self.burst = float(options.invocation_burst or max(1, math.ceil(rate or 1)))

    async def dispatch(self, ctx: HubConnectionContext, message: HubMessage) -> None:
        """Act on one parsed message of a connected client."""
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
            else:
                self._client_result(ctx, message)
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
            ctx.connection.write_control(ctx.protocol.write_message(CloseMessage()))
            ctx.connection.abort(message.error or "client closed")
        # Ack / Sequence: handled by the connection handler (stateful reconnect), else ignored

    def _client_result(self, ctx: HubConnectionContext, message: CompletionMessage) -> None:
        outcome = self.manager.set_connection_result(ctx, message)
        if outcome == "unknown":
            log.debug("completion for unknown invocation %r", message.invocation_id)
        elif outcome == "forged":
            self.stats.forged_completions += 1
            if not ctx.forged_logged:  # once per connection: a client must not flood the log
                ctx.forged_logged = True
                log.warning(
                    "connection %s completed a client-result call sent to another connection; ignored",
                    ctx.connection_id,
                    extra={"connection_id": ctx.connection_id, "event": "forged_completion"},
                )

    def connection_ended(self, ctx: HubConnectionContext) -> None:
        """Stop the connection's streams; no call of it starts from now on."""
        ctx.disconnected = True
        for stream_task in list(ctx.active_streams.values()):
            stream_task.cancel()
        for upload in list(ctx.upload_streams.values()):
            upload.complete("Connection terminated while reading a stream.")
        ctx.upload_streams.clear()

    # -- invocations -------------------------------------------------------------------------------

    def _complete_error(self, ctx: HubConnectionContext, invocation_id: str | None, text: str) -> None:
        self.stats.invocation_errors += 1
        if invocation_id:
            ctx.write_message(CompletionMessage.with_error(invocation_id, text))

    async def _invoke(
        self, ctx: HubConnectionContext, msg: InvocationMessage | StreamInvocationMessage
    ) -> None:
        self.stats.invocations += 1
        method = self.methods.get(msg.target.lower())
        try:
            method = await self._check(ctx, msg, method)
            args = self._arguments(ctx, method, msg)
        except _Refused as refused:
            self._complete_error(ctx, msg.invocation_id, str(refused))
            return
        if isinstance(msg, StreamInvocationMessage):
            self._start_stream(ctx, method, args, msg)
            return
        await ctx.invocation_slots.acquire()
        if ctx.disconnected:  # the connection ended while this call waited for its slot
            ctx.invocation_slots.release()
            self._finish(ctx, msg.stream_ids or [])
            return
        ctx.running += 1
        task = self.tasks.spawn(self._run_invocation(ctx, method, args, msg), name=f"invoke {msg.target}")
        task.add_done_callback(lambda _: _not_running(ctx))  # also when cancelled before it started

    async def _check(
        self,
        ctx: HubConnectionContext,
        msg: InvocationMessage | StreamInvocationMessage,
        method: HubMethod | None,
    ) -> HubMethod:
        """The method to run, or :class:`_Refused` with SignalR's text for why not."""
        target = msg.target
        if self._rate is not None and not self._take_token(ctx, self._rate):
            self.stats.rate_limited += 1
            log.debug(
                "rate limit: %s called %r too often",
                ctx.connection_id,
                target,
                extra={"connection_id": ctx.connection_id, "event": "rate_limited"},
            )
            raise _Refused(RATE_LIMITED.format(target=target))
        if method is None:
            log.debug("unknown hub method %r", target)
            raise _Refused(f"Unknown hub method '{target}'")
        streaming_call = isinstance(msg, StreamInvocationMessage)
        if method.is_streaming != streaming_call:
            kind, call = (
                ("streaming", "non-streaming") if method.is_streaming else ("non-streaming", "streaming")
            )
            raise _Refused(
                f"The client attempted to invoke the {kind} '{target}' method with a {call} invocation."
            )
        if method.policies is not None and not await check_policies(
            ctx.connection.principal, method.policies
        ):
            raise _Refused(f"Failed to invoke '{target}' because user is unauthorized")
        if streaming_call and msg.invocation_id in ctx.active_streams:
            raise _Refused(f"Invocation ID '{msg.invocation_id}' is already in use.")
        if streaming_call and ctx.max_streams is not None and len(ctx.active_streams) >= ctx.max_streams:
            raise _Refused(
                f"Failed to invoke '{target}' because the connection already runs {ctx.max_streams} "
                "streams, the most allowed."
            )
        return method

    def _arguments(
        self, ctx: HubConnectionContext, method: HubMethod, msg: InvocationMessage | StreamInvocationMessage
    ) -> list[Any]:
        """Bound arguments with upload streams in place (registered on ``ctx``)."""
        detailed = self.options.enable_detailed_errors
        try:
            args = _bind(method, msg.arguments)
        except _BindError as exc:
            # the first per connection at INFO, so a developer sees why a call failed without
            # debug logging; later ones at DEBUG, so a misbehaving client cannot flood the log
            level = logging.DEBUG if ctx.binding_logged else logging.INFO
            ctx.binding_logged = True
            log.log(
                level,
                "cannot bind the arguments of %r (method %s) from %s: %s",
                msg.target,
                method.name,
                ctx.connection_id,
                exc.detail,
                extra={"connection_id": ctx.connection_id, "event": "binding_failed"},
            )
            text = f"Failed to invoke '{msg.target}' due to an error on the server."
            raise _Refused(f"{text} InvalidDataException: {exc}" if detailed else text) from None
        stream_params = method.stream_params
        stream_ids = msg.stream_ids or []
        if len(stream_ids) != len(stream_params):
            mismatch = HubException(
                f"Client sent {len(stream_ids)} stream(s), Hub method expects {len(stream_params)}."
            )
            raise _Refused(error_text(_invoke_error(msg.target), mismatch, detailed))
        if not stream_params:
            return args
        # a stream id already streaming here (or twice in one call) would orphan the first
        # stream: its hub method would wait for items forever, holding the invocation slot
        for i, sid in enumerate(stream_ids):
            if sid in ctx.upload_streams or sid in stream_ids[:i]:
                raise _Refused(f"Stream ID '{sid}' is already in use.")
        capacity = self.options.stream_buffer_capacity
        uploads = {
            sid: UploadStream(capacity, param.convert)
            for sid, param in zip(stream_ids, stream_params, strict=True)
        }
        ctx.upload_streams.update(uploads)
        return _merge_streams(method, args, list(uploads.values()))

    def _take_token(self, ctx: HubConnectionContext, rate: float) -> bool:
        """Token bucket of one connection: refill at ``rate`` per second up to the burst size."""
        now = time.monotonic()
        tokens = min(self.burst, ctx.rate_tokens + (now - ctx.rate_stamp) * rate)
        ctx.rate_stamp = now
        if tokens < 1.0:
            ctx.rate_tokens = tokens
            return False
        ctx.rate_tokens = tokens - 1.0
        return True

    def _finish(self, ctx: HubConnectionContext, stream_ids: list[str]) -> None:
        for sid in stream_ids:
            ctx.upload_streams.pop(sid, None)

    def _begin(self, ctx: HubConnectionContext, msg: InvocationMessage | StreamInvocationMessage) -> Any:
        """In the task of a hub method: whose call it is (client-result checks), and its span."""
        current_connection.set(ctx)
        span = tracing.start_invocation_span(
            self.hub_cls.__name__, msg.target, ctx.connection_id, msg.invocation_id, msg.headers
        )
        tracing.activate(span)
        return span

    async def _run_invocation(
        self, ctx: HubConnectionContext, method: HubMethod, args: list[Any], msg: InvocationMessage
    ) -> None:
        span = self._begin(ctx, msg)
        target, invocation_id = msg.target, msg.invocation_id
        detailed = self.options.enable_detailed_errors
        try:
            result = await method.func(self.make_hub(ctx), *args)
            if invocation_id:
                try:
                    ctx.write_message(CompletionMessage.with_result(invocation_id, result))
                except (TypeError, ValueError, msgspec.EncodeError) as exc:
                    log.error("cannot serialize the result of %s: %s", target, exc)
                    self._complete_error(ctx, invocation_id, error_text(_invoke_error(target), exc, detailed))
        except Exception as exc:
            _log_failure(target, exc)
            tracing.failed(span, exc)
            self._complete_error(ctx, invocation_id, error_text(_invoke_error(target), exc, detailed))
        finally:
            ctx.invocation_slots.release()
            self._finish(ctx, msg.stream_ids or [])
            tracing.end(span)

    def _start_stream(
        self, ctx: HubConnectionContext, method: HubMethod, args: list[Any], msg: StreamInvocationMessage
    ) -> None:
        invocation_id = msg.invocation_id
        assert invocation_id is not None
        task = self.tasks.spawn(self._run_stream(ctx, method, args, msg), name=f"stream {msg.target}")
        ctx.active_streams[invocation_id] = task

    async def _run_stream(
        self, ctx: HubConnectionContext, method: HubMethod, args: list[Any], msg: StreamInvocationMessage
    ) -> None:
        span = self._begin(ctx, msg)
        target, invocation_id = msg.target, msg.invocation_id
        assert invocation_id is not None
        produced = False
        iterator: Any = None
        try:
            source = method.func(self.make_hub(ctx), *args)
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
            _log_failure(target, exc)
            base = _STREAM_ERROR if produced else _invoke_error(target)
            detailed = self.options.enable_detailed_errors
            ctx.write_message(CompletionMessage.with_error(invocation_id, error_text(base, exc, detailed)))
        finally:
            ctx.active_streams.pop(invocation_id, None)
            self._finish(ctx, msg.stream_ids or [])
            tracing.end(span)
            await _aclose(iterator, target)


async def _aclose(iterator: Any, target: str) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            log.debug("closing stream %s failed", target, exc_info=True)


def _bind(method: HubMethod, arguments: list[Any]) -> list[Any]:
    params = method.arg_params
    required = sum(1 for p in params if not p.has_default)
    if not required <= len(arguments) <= len(params):
        expected = len(params) if required == len(params) else f"{required} to {len(params)}"
        names = ", ".join(f"{p.name}: {p.type_name}" for p in params)
        raise _BindError(
            f"Invocation provides {len(arguments)} argument(s) but target expects {expected}.",
            f"expected {expected} argument(s) ({names}), got {len(arguments)}",
        )
    out = []
    for value, param in zip(arguments, params, strict=False):
        if param.convert is None:
            out.append(value)
            continue
        try:
            out.append(param.convert(value))
        except (msgspec.ValidationError, TypeError, ValueError) as exc:
            why = str(exc)  # may quote what the client sent (an enum value): bounded for the log
            why = why if len(why) <= 200 else f"{why[:200]}..."
            reason = f"Parameter '{param.name}' ({param.type_name}): {why}"
            raise _BindError(
                "Error binding arguments. Make sure that the types of the provided values match "
                f"the types of the hub method being invoked. {reason}",
                f"parameter {param.name!r} expects {param.type_name}, got {type(value).__name__}: {why}",
            ) from None
    return out


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
