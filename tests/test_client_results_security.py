"""Client results answer only from the connection the call was sent to, on one instance and across two.

A Completion naming a call that was sent to another connection is refused (the call keeps waiting for
its own client), counted and logged once per connection; call ids are unguessable.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import RedisServer, ServerProcess
from tests.hwtools import stats
from tests.rawhub import RawHub

APP = "tests.apps.structure:app"
WARNING = "completed a client-result call sent to another connection"


def _start(request: pytest.FixtureRequest, *args: str) -> ServerProcess:
    proc = ServerProcess(APP, args=list(args))
    request.addfinalizer(proc.close)
    return proc


async def _question(victim: RawHub) -> str:
    """The client-result Invocation the victim received; its id."""
    message: dict[str, Any] = await victim.next_message()
    assert message["type"] == 1 and message["target"] == "Question", message
    invocation_id: str = message["invocationId"]
    return invocation_id


async def _forge(attacker: RawHub, invocation_id: str) -> None:
    await attacker.send({"type": 3, "invocationId": invocation_id, "result": "FORGED"})
    await attacker.send({"type": 3, "invocationId": invocation_id, "result": "FORGED AGAIN"})
    assert await attacker.invoke("echo", "barrier") == "barrier"  # both were handled before this


async def test_a_completion_from_another_connection_is_refused(request: pytest.FixtureRequest) -> None:
    server = _start(request)
    victim, attacker, asker = [await RawHub.open(server.url) for _ in range(3)]
    victim_id = await victim.invoke("whoami")
    pending = asyncio.create_task(asker.invoke("ask_client", victim_id))
    invocation_id = await _question(victim)
    assert len(invocation_id) >= 16  # unguessable, not a counter
    await _forge(attacker, invocation_id)
    assert not pending.done()
    await victim.send({"type": 3, "invocationId": invocation_id, "result": "REAL"})
    assert await asyncio.wait_for(pending, 10) == "REAL"
    assert (await stats(server.url))["hubs"]["/hub"]["forged_completions"] == 2
    assert server.output().count(WARNING) == 1  # logged once per connection
    await asyncio.gather(victim.close(), attacker.close(), asker.close())


async def test_across_instances_only_the_called_connection_answers(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> None:
    args = ["--redis", redis_server.url, "--channel-prefix", "client-results:"]
    a, b = _start(request, *args), _start(request, *args)
    victim = await RawHub.open(b.url)
    near = await RawHub.open(b.url)  # on the victim's instance
    far = await RawHub.open(a.url)  # on the asking instance
    asker = await RawHub.open(a.url)
    victim_id = await victim.invoke("whoami")
    pending = asyncio.create_task(asker.invoke("ask_client", victim_id))
    invocation_id = await _question(victim)
    await _forge(near, invocation_id)
    await _forge(far, invocation_id)
    assert not pending.done()
    await victim.send({"type": 3, "invocationId": invocation_id, "result": "REAL"})
    assert await asyncio.wait_for(pending, 10) == "REAL"
    assert (await stats(a.url))["hubs"]["/hub"]["forged_completions"] == 2
    assert (await stats(b.url))["hubs"]["/hub"]["forged_completions"] == 2
    await asyncio.gather(victim.close(), near.close(), far.close(), asker.close())
