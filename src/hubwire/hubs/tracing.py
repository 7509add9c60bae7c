"""Optional OpenTelemetry spans for hub invocations.

Active only when ``opentelemetry-api`` is installed *and* the application configured a tracer
provider (an SDK); otherwise every function here is a cheap no-op. A span named
``<Hub>/<method>`` (kind SERVER, ``rpc.system=signalr``) covers each invocation and stream
invocation; a W3C ``traceparent`` (and ``tracestate``) in the invocation's SignalR headers makes it
a child of the caller's span. Hub code runs inside the span, so its own spans nest under it. A
method that raises marks the span as an error with the exception recorded.
"""

from __future__ import annotations

from typing import Any

try:
    from opentelemetry import context as _context
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - the optional dependency is absent
    _trace = None  # type: ignore[assignment]

__all__ = ["activate", "end", "failed", "start_invocation_span"]

_NO_SDK: tuple[type, ...] = (
    (_trace.ProxyTracerProvider, _trace.NoOpTracerProvider) if _trace is not None else ()
)


def start_invocation_span(
    hub: str, target: str, connection_id: str, invocation_id: str | None, headers: dict[str, str] | None
) -> Any:
    """A started span for one invocation, or None when tracing is not configured."""
    if _trace is None:
        return None
    provider = _trace.get_tracer_provider()
    if isinstance(provider, _NO_SDK):
        return None
    parent = _propagate.extract(headers) if headers else None
    attributes = {
        "rpc.system": "signalr",
        "rpc.service": hub,
        "rpc.method": target,
        "signalr.connection_id": connection_id,
    }
    if invocation_id:
        attributes["signalr.invocation_id"] = invocation_id
    return provider.get_tracer("hubwire").start_span(
        f"{hub}/{target}", context=parent, kind=_trace.SpanKind.SERVER, attributes=attributes
    )


def activate(span: Any) -> None:
    """Make ``span`` current for the rest of this task (each invocation runs in its own task)."""
    if span is not None:
        _context.attach(_trace.set_span_in_context(span))


def failed(span: Any, exc: BaseException) -> None:
    if span is not None:
        span.record_exception(exc)
        span.set_status(_trace.Status(_trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def end(span: Any) -> None:
    if span is not None:
        span.end()
