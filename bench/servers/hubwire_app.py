"""The bench hub served by hubwire: one instance per command.

    python -m bench.servers.hubwire_app --port P --redis URL --prefix X

is ``hubwire run bench.servers.hubwire_app:app --port P --redis URL --channel-prefix X``
(uvicorn, uvloop, the Redis backplane). Hub at ``/hub``; ``GET /health`` answers the backplane's
health JSON (its ``received`` counter is what the ingest phase reads), as tests/apps/scaleout.py does,
plus ``connections``: the connections this instance holds (the big phase's per-instance count).

Hub methods (what the load generator calls):

- ``Broadcast(payload)``: ``clients.all.send("broadcast", payload)`` (invoked without an invocation id)
- ``BroadcastData(payload, data)``: ``clients.all.send("broadcast", payload, data)`` (the deflate phase:
  ``data`` is ~1 KB of JSON)
- ``JoinGroup(name)``: adds the caller to the group and completes
- ``GroupBroadcast(name, payload)``: ``clients.group(name).send("broadcast", payload)``
- ``ConnectionId()``: the caller's connection id (the ingest phase targets ``:connection:<id>``)

A ``user`` query parameter names the connection's user (``clients.user``), for the ingest phase.

``GET /presence/{kind}/{key}?repeat=R`` (bench/presence.py) asks cluster-wide presence R times in a
row from this instance (``hub_context(BenchHub).presence.group`` / ``.count`` / ``.user``) and
answers each call's milliseconds, measured here, and what the last call found.

``BENCH_PROFILE_DIR`` (``bench/run.py --profile DIR``): the serving process runs cProfile on its
event-loop thread between SIGUSR2 and SIGUSR1 (the runner sends them around each rooms row's send
window) and writes ``hubwire-<pid>-<n>.prof`` there; read it with ``python -m pstats``, to see where
the per-message path spends its CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hubwire import Hub, HubServer, Principal, RequestInfo

HUB_NAME = "BenchHub"
HUB_PATH = "/hub"


def _start_profile() -> None:
    """cProfile of this process's main thread (the event loop; wall-clock timer, so a function's
    time includes its system calls; a CPU-time timer costs a system call per function call and
    skews everything): SIGUSR2 starts a fresh profile, SIGUSR1 writes it (``hubwire-<pid>-<n>.prof``,
    n counting the writes) and stops."""
    directory = os.environ.get("BENCH_PROFILE_DIR")
    if not directory or __name__ == "__main__":
        return
    import cProfile
    import signal

    state: dict[str, Any] = {"profile": None, "n": 0}

    def start(*_: object) -> None:
        state["profile"] = cProfile.Profile()
        state["profile"].enable()

    def dump(*_: object) -> None:
        profile = state["profile"]
        if profile is None:
            return
        profile.disable()
        state["n"] += 1
        profile.dump_stats(os.path.join(directory, f"hubwire-{os.getpid()}-{state['n']}.prof"))
        state["profile"] = None

    signal.signal(signal.SIGUSR2, start)
    signal.signal(signal.SIGUSR1, dump)


_start_profile()


class BenchHub(Hub):
    async def broadcast(self, payload: str) -> None:
        await self.clients.all.send("broadcast", payload)

    async def broadcast_data(self, payload: str, data: Any) -> None:
        await self.clients.all.send("broadcast", payload, data)

    async def join_group(self, name: str) -> None:
        await self.groups.add(self.context.connection_id, name)

    async def group_broadcast(self, name: str, payload: str) -> None:
        await self.clients.group(name).send("broadcast", payload)

    async def connection_id(self) -> str:
        return self.context.connection_id


def authenticate(request: RequestInfo) -> Principal | None:
    user = request.query_param("user")
    return Principal(user, {"sub": user}) if user else None


hubs = HubServer(authenticator=authenticate)
hubs.add_hub(HUB_PATH, BenchHub, name=HUB_NAME)


async def health(request: Request) -> JSONResponse:
    backplane = hubs.backplane
    info = backplane.health() if hasattr(backplane, "health") else {"state": "in-memory"}
    info["pid"] = os.getpid()
    info["connections"] = len(hubs.connections)  # what the big phase reports as held per instance
    return JSONResponse(info)


async def presence(request: Request) -> JSONResponse:
    kind, key = request.path_params["kind"], request.path_params["key"]
    repeat = max(1, min(1000, int(request.query_params.get("repeat", "10"))))
    context = hubs.hub_context(BenchHub).presence
    times, found, complete = [], 0, True
    for _ in range(repeat):
        start = time.perf_counter()
        if kind == "count":
            found = await context.count(key)
        else:
            result = await (context.group(key) if kind == "group" else context.user(key))
            found, complete = len(result), result.complete
        times.append((time.perf_counter() - start) * 1000)
    return JSONResponse({"ms": times, "found": found, "complete": complete})


hubs.app = Starlette(routes=[Route("/health", health), Route("/presence/{kind}/{key}", presence)])
app = hubs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True, help="Redis URL of the backplane")
    parser.add_argument("--prefix", default="bench:", help="backplane channel prefix")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    # exec, so the pid the runner measures is the serving process and the app is imported
    # after the backplane settings are in the environment
    hubwire = os.path.join(os.path.dirname(sys.executable), "hubwire")
    os.execv(
        hubwire,
        [
            hubwire,
            "run",
            "bench.servers.hubwire_app:app",
            "--host",
            args.host,
            "--port",
            str(args.port),
            "--redis",
            args.redis,
            "--channel-prefix",
            args.prefix,
            "--log-level",
            args.log_level,
        ],
    )


if __name__ == "__main__":
    main()
