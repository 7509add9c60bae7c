"""Runs an emitter plan with the blocking ``Emitter`` in a plain Python process (tests/test_emitter.py).

Usage: python tests/emitter/plan.py REDIS_URL PREFIX HUB < plan.json

The plan is a JSON list of steps: ``{"op": "send", "target": [kind, *args], "args": [...]}`` (kind:
all, all_except, client, clients, group, groups, group_except, user, users) or ``{"op": "add" |
"remove", "connection": id, "group": g}`` (with ``"ack_timeout"``: seconds, 10 by default). One JSON
line per step on stdout, ``{"receivers": n}``, ``{"ok": true}`` or ``{"error": type name, "message":
...}``; then one ``{"done": ...}`` line saying what ran in the process.

What "no event loop" means here: redis-py imports asyncio itself (``redis/__init__.py`` imports
``redis.asyncio``), so asyncio being in ``sys.modules`` proves nothing either way. What this checks
is stronger: no event loop was ever created in the process (every asyncio loop is a
``BaseEventLoop``, whose constructor is watched from the start) and no thread other than the main one
was ever running (no loop hidden in a thread).
"""

from __future__ import annotations

import asyncio.base_events
import json
import sys
import threading
from typing import Any

loops_made: list[str] = []
_init = asyncio.base_events.BaseEventLoop.__init__


def _watched_init(self: Any, *args: Any, **kwargs: Any) -> None:
    loops_made.append(type(self).__name__)
    _init(self, *args, **kwargs)


asyncio.base_events.BaseEventLoop.__init__ = _watched_init  # type: ignore[method-assign]
threads_seen: set[str] = set()
_start = threading.Thread.start


def _watched_start(self: threading.Thread) -> None:
    threads_seen.add(self.name)
    _start(self)


threading.Thread.start = _watched_start  # type: ignore[method-assign]

from hubwire.emitter import Emitter  # noqa: E402 - after the watches


def target(emitter: Emitter, spec: list[Any]) -> Any:
    kind, *args = spec
    if kind == "all":
        return emitter.all
    if kind == "groups":
        return emitter.groups(*args)
    return getattr(emitter, kind)(*args)


def main() -> None:
    url, prefix, hub = sys.argv[1:4]
    plan = json.load(sys.stdin)
    with Emitter(url, prefix, hub=hub) as emitter:
        for step in plan:
            emitter.ack_timeout = step.get("ack_timeout", 10.0)
            try:
                if step["op"] == "send":
                    out: dict[str, Any] = {"receivers": target(emitter, step["target"]).send(*step["args"])}
                else:
                    getattr(emitter.groups, step["op"])(step["connection"], step["group"])
                    out = {"ok": True}
            except Exception as exc:
                out = {"error": type(exc).__name__, "message": str(exc)}
            print(json.dumps(out), flush=True)
        name = emitter.name
    done = {
        "done": True,
        "name": name,
        "loops_made": loops_made,
        "threads_started": sorted(threads_seen),
        "threads_alive": threading.active_count(),
        "uvloop": "uvloop" in sys.modules,
    }
    print(json.dumps(done), flush=True)


if __name__ == "__main__":
    main()
