"""A hub with tiny keep-alive / timeout options, for tests/test_keepalive.py.

Run it: ``hubwire run tests.apps.short_timeouts:app --port N``.
"""

from __future__ import annotations

import asyncio

from hubwire import Hub, HubOptions, HubServer

OPTIONS = HubOptions(keep_alive_interval=1, client_timeout_interval=2, handshake_timeout=2)


class ShortHub(Hub):
    async def echo(self, message: str) -> str:
        return message

    async def slow(self, tag: str, delay_ms: int) -> str:
        """Record start and end in this connection's log, sleeping in between."""
        log = self.context.items.setdefault("log", [])
        log.append(f"start {tag}")
        await asyncio.sleep(delay_ms / 1000)
        log.append(f"end {tag}")
        return tag

    async def get_log(self) -> list[str]:
        return list(self.context.items.get("log", []))


server = HubServer(OPTIONS)
server.add_hub("/hub", ShortHub)
server.add_hub("/detailed", ShortHub, options=OPTIONS.copy(enable_detailed_errors=True))
app = server
