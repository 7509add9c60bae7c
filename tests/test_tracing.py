"""OpenTelemetry spans for hub invocations (opentelemetry-api with a recording provider in the app).

A ``traceparent`` in the invocation's headers makes the span a child of the caller's; an error
marks the span; streams get spans too; without a configured provider nothing is traced (covered
by every other test's servers, which install none).
"""

from __future__ import annotations

from typing import Any

import httpx

from .conftest import ServerProcess
from .hwtools import APP
from .rawhub import RawHub

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


async def test_invocation_spans(start_server: Any) -> None:
    server: ServerProcess = start_server(APP, env={"HW_TRACING": "1"})
    hub = await RawHub.open(server.url)
    traced = {
        "type": 1,
        "invocationId": "t1",
        "target": "echo",
        "arguments": ["x"],
        "headers": {"traceparent": f"00-{TRACE}-{PARENT}-01"},
    }
    await hub.send(traced)
    assert await hub.next_message() == {"type": 3, "invocationId": "t1", "result": "x"}
    assert "error" in await hub.invoke_raw("fail")
    await hub.send({"type": 4, "invocationId": "s1", "target": "counter", "arguments": [2]})
    while (await hub.next_message()).get("type") != 3:
        pass
    await hub.close()
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        spans = {span["name"]: span for span in (await client.get("/debug/spans")).json()}
    echo = spans["HardHub/echo"]
    assert (echo["trace_id"], echo["parent_span_id"]) == (TRACE, PARENT)
    assert echo["kind"] == "SERVER"
    assert echo["attributes"]["rpc.system"] == "signalr"
    assert echo["attributes"]["rpc.method"] == "echo"
    assert echo["attributes"]["signalr.invocation_id"] == "t1"
    assert echo["status"] == "UNSET"
    fail = spans["HardHub/fail"]
    assert fail["status"] == "ERROR"
    assert fail["exceptions"] == ["RuntimeError: boom"]
    assert fail["parent_span_id"] is None and fail["trace_id"] != TRACE
    assert spans["HardHub/counter"]["attributes"]["signalr.invocation_id"] == "s1"
