"""Hub app of the stateful reconnect tests (``tests/test_stateful_reconnect.py``).

Run it: ``hubwire run tests.apps.stateful:app --port N``. ``HW_OPTIONS`` (a JSON object of
:class:`~hubwire.HubOptions` fields) sets the options, e.g. a short ``disconnect_timeout``. Users
come from the ``user`` query parameter (a test authenticator, not for production); a ``group``
query parameter makes ``on_connected`` join that group.

What the tests read back: ``GET /debug/lifecycle`` (``on_connected`` / ``on_disconnected`` runs per
connection id), ``GET /debug/calls`` (how often each ``CountCall`` key ran), ``POST /pump`` (send
numbered messages to one connection, cycling direct / its group / everyone, or the ``kinds``
given, numbered from ``first``).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hubwire import Hub, HubOptions, HubServer, Principal, RequestInfo

#: connection id -> {"connected": n, "disconnected": n, "error": repr of the last error}
LIFECYCLE: dict[str, dict[str, Any]] = {}
#: CountCall key -> times the method body ran
CALLS: Counter[str] = Counter()
#: pumps started (kept referenced until done)
PUMPS: set[asyncio.Task[None]] = set()


def _options() -> HubOptions:
    raw: dict[str, Any] = json.loads(os.environ.get("HW_OPTIONS") or "{}")
    return HubOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


class StatefulHub(Hub):
    async def on_connected(self) -> None:
        entry = LIFECYCLE.setdefault(self.context.connection_id, {"connected": 0, "disconnected": 0})
        entry["connected"] += 1
        group = self.context.query.get("group")
        if group:
            await self.groups.add(self.context.connection_id, group)

    async def on_disconnected(self, exception: BaseException | None) -> None:
        entry = LIFECYCLE.setdefault(self.context.connection_id, {"connected": 0, "disconnected": 0})
        entry["disconnected"] += 1
        entry["error"] = repr(exception)

    async def whoami(self) -> dict[str, Any]:
        return {"connectionId": self.context.connection_id, "user": self.context.user_identifier}

    async def count_call(self, key: str, delay_ms: int) -> int:
        """Count a run of ``key``, then take ``delay_ms`` (a call in flight while the socket is cut)."""
        CALLS[key] += 1
        await asyncio.sleep(min(max(delay_ms, 0), 5000) / 1000)
        return CALLS[key]

    async def echo(self, value: Any) -> Any:
        return value

    async def whereami(self) -> dict[str, Any]:
        """The request as hub code sees it (proxy headers, TLS, root path)."""
        request = self.context.request
        assert request is not None
        return {
            "client": list(request.client) if request.client else None,
            "scheme": request.scheme,
            "path": request.path,
            "pid": os.getpid(),
        }


def authenticate(request: RequestInfo) -> Principal | None:
    user = request.query_param("user")
    return Principal(user, {"sub": user}) if user else None


server = HubServer(_options(), authenticator=authenticate, stats_path="/debug/stats")
server.add_hub("/hub", StatefulHub)


async def _pump(
    connection_id: str,
    group: str,
    count: int,
    interval: float,
    size: int,
    kinds: list[str],
    first: int,
    user: str,
) -> None:
    hub = server.hub_context(StatefulHub)
    pad = "x" * size
    targets = {
        "direct": hub.clients.client(connection_id),
        "group": hub.clients.group(group),
        "all": hub.clients.all,
        "user": hub.clients.user(user),
    }
    for i in range(first, first + count):
        await targets[kinds[i % len(kinds)]].send("Num", i, pad)
        if interval:
            await asyncio.sleep(interval)


async def pump(request: Request) -> JSONResponse:
    body = await request.json()
    task = asyncio.get_running_loop().create_task(
        _pump(
            body["connectionId"],
            body["group"],
            int(body["count"]),
            float(body.get("intervalMs", 0)) / 1000,
            int(body.get("size", 0)),
            list(body.get("kinds") or ["direct", "group", "all"]),
            int(body.get("first", 0)),
            str(body.get("user", "alice")),
        )
    )
    PUMPS.add(task)
    task.add_done_callback(PUMPS.discard)
    return JSONResponse({"started": True}, status_code=202)


#: the running ticker (POST /tick starts it, DELETE /tick stops it) and the last number it sent
TICKER: dict[str, Any] = {"task": None, "sent": -1}


async def _tick(interval: float) -> None:
    hub = server.hub_context(StatefulHub)
    n = 0
    while True:
        await hub.clients.all.send("Tick", n)
        TICKER["sent"] = n
        n += 1
        await asyncio.sleep(interval)


async def tick(request: Request) -> JSONResponse:
    """POST: broadcast ``Tick(n)`` to every client every ``intervalMs``; DELETE: stop, say the last n."""
    if request.method == "POST":
        body = await request.json()
        TICKER["task"] = asyncio.get_running_loop().create_task(_tick(float(body["intervalMs"]) / 1000))
        return JSONResponse({"started": True}, status_code=202)
    task = TICKER["task"]
    if task is not None:
        task.cancel()
    return JSONResponse({"sent": TICKER["sent"]})


async def pid(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid()})


async def lifecycle(request: Request) -> JSONResponse:
    return JSONResponse(LIFECYCLE)


async def calls(request: Request) -> JSONResponse:
    return JSONResponse(dict(CALLS))


web = Starlette(
    routes=[
        Route("/pump", pump, methods=["POST"]),
        Route("/tick", tick, methods=["POST", "DELETE"]),
        Route("/debug/pid", pid),
        Route("/debug/lifecycle", lifecycle),
        Route("/debug/calls", calls),
    ]
)
server.app = web
app = server
