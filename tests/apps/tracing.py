"""A recording OpenTelemetry tracer provider for tests (opentelemetry-api only, no SDK needed).

``install()`` makes it the global provider; finished spans are kept in ``FINISHED`` as dicts.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.util.types import Attributes

FINISHED: list[dict[str, Any]] = []


class RecordingSpan(trace.Span):
    def __init__(
        self,
        name: str,
        context: trace.SpanContext,
        parent: trace.SpanContext | None,
        kind: trace.SpanKind,
        attributes: Attributes,
    ) -> None:
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.attributes: dict[str, Any] = dict(attributes or {})
        self.status = "UNSET"
        self.exceptions: list[str] = []

    def end(self, end_time: int | None = None) -> None:
        FINISHED.append(
            {
                "name": self.name,
                "trace_id": f"{self.context.trace_id:032x}",
                "span_id": f"{self.context.span_id:016x}",
                "parent_span_id": f"{self.parent.span_id:016x}" if self.parent else None,
                "kind": self.kind.name,
                "attributes": self.attributes,
                "status": self.status,
                "exceptions": self.exceptions,
            }
        )

    def get_span_context(self) -> trace.SpanContext:
        return self.context

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self.attributes.update(attributes)

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def add_event(self, name: str, attributes: Attributes = None, timestamp: int | None = None) -> None:
        pass

    def update_name(self, name: str) -> None:
        self.name = name

    def is_recording(self) -> bool:
        return True

    def set_status(self, status: Any, description: str | None = None) -> None:
        self.status = status.status_code.name if isinstance(status, trace.Status) else str(status)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self.exceptions.append(f"{type(exception).__name__}: {exception}")


class RecordingTracer(trace.Tracer):
    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: trace.SpanKind = trace.SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        trace_id = parent.trace_id if parent.is_valid else random.getrandbits(128)
        span_context = trace.SpanContext(
            trace_id, random.getrandbits(64), is_remote=False, trace_flags=trace.TraceFlags(1)
        )
        return RecordingSpan(name, span_context, parent if parent.is_valid else None, kind, attributes)

    @contextmanager  # type: ignore[override]
    def start_as_current_span(
        self, name: str, context: Context | None = None, **kwargs: Any
    ) -> Iterator[trace.Span]:
        span = self.start_span(name, context)
        with trace.use_span(span, end_on_exit=True):
            yield span


class RecordingProvider(trace.TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return RecordingTracer()


def install() -> None:
    trace.set_tracer_provider(RecordingProvider())
