"""The bench server on python-socketio + AsyncRedisManager, ASGI under uvicorn (uvloop).

    python -m bench.servers.socketio_py_app --port P --redis URL --prefix X

Socket.IO at ``/socket.io/``. Events (client -> server):

- ``broadcast(payload)``: ``emit("broadcast", payload)`` to every client of every instance
- ``join(name)``: enters the room and acknowledges
- ``group_broadcast(name, payload)``: ``emit("broadcast", payload, room=name)``
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import socketio

_mgr = socketio.AsyncRedisManager(
    os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    channel=os.environ.get("BENCH_PREFIX", "bench:") + "socketio",
)
sio = socketio.AsyncServer(
    async_mode="asgi",
    client_manager=_mgr,
    cors_allowed_origins=[],
    logger=False,
    engineio_logger=False,
)


@sio.on("broadcast")
async def broadcast(sid: str, payload: Any) -> None:
    await sio.emit("broadcast", payload)


@sio.on("join")
async def join(sid: str, name: str) -> bool:
    await sio.enter_room(sid, name)
    return True


@sio.on("group_broadcast")
async def group_broadcast(sid: str, name: str, payload: Any) -> None:
    await sio.emit("broadcast", payload, room=name)


app = socketio.ASGIApp(sio)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--prefix", default="bench:")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    os.environ["BENCH_REDIS_URL"] = args.redis
    os.environ["BENCH_PREFIX"] = args.prefix
    import uvicorn

    uvicorn.run(
        "bench.servers.socketio_py_app:app",
        host=args.host,
        port=args.port,
        loop="uvloop",
        log_level=args.log_level,
        ws_per_message_deflate=False,
        lifespan="off",
    )


if __name__ == "__main__":
    main()
