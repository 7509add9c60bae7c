"""The official @microsoft/signalr client (Node 20) against the interop app, one test per behaviour.

``tests/interop/hub-checks.cjs`` runs once per transport x hub protocol (MessagePack is not
possible over SSE, which is text-only) and ``tests/interop/once-checks.cjs`` runs the
transport-independent rows of interop-contract.md. All Node processes run in parallel against
one ``hubwire run examples.interop.app:app`` process (short poll timeout, so idling past it is
cheap) and print one JSON line per check; every check is its own pytest test here, so a failure
names what broke. Each Node run is bounded by a timeout and killed if it hangs.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.conftest import ROOT, ServerProcess
from tests.requirements import NODE_CLIENT, requires

NODE = shutil.which("node")
INTEROP = ROOT / "tests" / "interop"
NODE_TIMEOUT = 150.0
POLL_TIMEOUT = "1.5"

COMBOS = (
    ("WebSockets", "json"),
    ("WebSockets", "messagepack"),
    ("ServerSentEvents", "json"),
    ("LongPolling", "json"),
    ("LongPolling", "messagepack"),
)

#: what hub-checks.cjs must report for every combination (explicit, so a check cannot vanish)
HUB_CHECKS = (
    "connection_id_matches_server",
    "active_transport_name",
    "invoke_echo",
    "send_fire_and_forget_then_invoke",
    "server_calls_client_method_any_case",
    "custom_object_pascal_case",
    "stream_items",
    "stream_empty",
    "stream_cancel_reaches_server",
    "error_hub_method_threw",
    "error_stream_threw_before_streaming",
    "error_unknown_method",
    "error_streaming_method_invoked",
    "error_non_streaming_method_streamed",
    "upload_stream_concat",
    "upload_stream_client_error",
    "client_result_value",
    "client_result_handler_throws",
    "client_result_no_handler",
    "request_user_agent_header",
    "request_custom_header",
    "different_types_round_trip",
    "restart_after_stop",
    "stop_closes_without_error",
    "on_disconnected_runs_once",
    "message_too_large_closes_then_reconnects",
    "reconnect_after_server_timeout",
    "jwt_token_from_server_sync_factory",
    "jwt_token_from_server_async_factory",
    "unauthorized_negotiate_401",
    "expired_token_negotiate_401",
    "wrongly_signed_token_negotiate_401",
)
#: transport-specific token checks: HTTP transports authorize every request, WebSockets the upgrade
TRANSPORT_CHECKS = {
    "WebSockets": ("expired_token_refused_at_upgrade",),
    "ServerSentEvents": ("expired_token_refused_mid_connection",),
    "LongPolling": ("expired_token_refused_mid_connection",),
}

ONCE_CHECKS = (
    "redirect_negotiate_then_reconnect",
    "skip_negotiation_websockets",
    "skip_negotiation_reconnects",
    "nowebsockets_json_falls_back_to_sse",
    "nowebsockets_messagepack_falls_back_to_longpolling",
    "nowebsockets_refuses_websockets_only_client",
    "longpolling_stop_sends_delete_and_poll_ends",
    "longpolling_survives_idle_longer_than_poll_timeout",
    "raw_echo_websockets",
    "raw_echo_server_sent_events",
    "raw_echo_long_polling",
    "raw_websocket_echo_without_negotiate",
    "bad_negotiate_error_text",
    "route_and_method_case_insensitive",
)

pytestmark = requires(*NODE_CLIENT)


@dataclass
class NodeRun:
    """One Node process: its parsed check results and its stderr (shown when a check fails)."""

    label: str
    results: dict[str, dict[str, object]] = field(default_factory=dict)
    stderr: str = ""
    returncode: int | None = None


def _launch(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(NODE), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _collect(label: str, proc: subprocess.Popen[str], deadline: float) -> NodeRun:
    run = NodeRun(label)
    try:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        err += f"\n[killed after {NODE_TIMEOUT} s]"
    run.returncode = proc.returncode
    run.stderr = err
    for line in out.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            run.results[str(result["name"])] = result
    return run


@pytest.fixture(scope="module")
def node_runs() -> Iterator[dict[str, NodeRun]]:
    server = ServerProcess("examples.interop.app:app", env={"INTEROP_LONG_POLL_TIMEOUT": POLL_TIMEOUT})
    env = dict(os.environ, INTEROP_LONG_POLL_TIMEOUT=POLL_TIMEOUT)
    try:
        procs = {
            f"{transport}/{protocol}": _launch(
                [str(INTEROP / "hub-checks.cjs"), server.url, transport, protocol], env
            )
            for transport, protocol in COMBOS
        }
        procs["once"] = _launch([str(INTEROP / "once-checks.cjs"), server.url], env)
        deadline = time.monotonic() + NODE_TIMEOUT
        runs = {label: _collect(label, proc, deadline) for label, proc in procs.items()}
        runs["server"] = NodeRun("server", stderr=server.output())
        yield runs
    finally:
        for proc in locals().get("procs", {}).values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        server.close()


def _check(runs: dict[str, NodeRun], label: str, name: str) -> None:
    run = runs[label]
    result = run.results.get(name)
    if result is None:
        pytest.fail(f"{label}: check {name} did not report (exit {run.returncode})\n{run.stderr[-3000:]}")
    if not result["ok"]:
        pytest.fail(f"{label}: {result['detail']}\n--- node stderr ---\n{run.stderr[-2000:]}")


@pytest.mark.parametrize(
    ("transport", "protocol", "name"),
    [
        (transport, protocol, name)
        for transport, protocol in COMBOS
        for name in (*HUB_CHECKS, *TRANSPORT_CHECKS[transport])
    ],
)
def test_hub(node_runs: dict[str, NodeRun], transport: str, protocol: str, name: str) -> None:
    _check(node_runs, f"{transport}/{protocol}", name)


@pytest.mark.parametrize("name", ONCE_CHECKS)
def test_once(node_runs: dict[str, NodeRun], name: str) -> None:
    _check(node_runs, "once", name)


def test_every_reported_check_is_known(node_runs: dict[str, NodeRun]) -> None:
    """A check added to a script must be listed here too (otherwise nobody would see it fail)."""
    for label, run in node_runs.items():
        if label == "server":
            continue
        known = (
            set(ONCE_CHECKS)
            if label == "once"
            else set(HUB_CHECKS) | set(TRANSPORT_CHECKS[label.split("/")[0]])
        )
        assert set(run.results) <= known, (label, set(run.results) - known)


@pytest.mark.parametrize("transport", ["LongPolling", "ServerSentEvents", "WebSockets"])
def test_vanished_client_is_disconnected_once(start_server, transport: str) -> None:  # type: ignore[no-untyped-def]
    """The official client killed mid-connection (no stop, no DELETE): the server disposes it.

    Long polling has nobody waiting between polls, so it takes the disconnect timeout (2 s here)
    and the heartbeat's sweep; SSE and WebSockets notice the closed socket at once, which the test
    tells apart from the sweep by giving them a disconnect timeout (30 s) far beyond its bound.
    Either way ``on_disconnected`` runs exactly once.
    """
    long_polling = transport == "LongPolling"
    disconnect_timeout = 2.0 if long_polling else 30.0
    server = start_server(
        "examples.interop.app:app", env={"INTEROP_DISCONNECT_TIMEOUT": str(disconnect_timeout)}
    )
    proc = subprocess.Popen(
        [str(NODE), str(INTEROP / "vanishing-client.cjs"), server.url, transport],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "the client did not connect within 20 s"
        ids = json.loads(proc.stdout.readline())
        assert ids["connectionId"] == ids["serverId"]
    finally:
        killed = time.monotonic()  # before the kill: the server cannot have noticed anything earlier
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
    bound = 2.0 + 8.0 if long_polling else 10.0
    with httpx.Client(base_url=server.url, timeout=5) as http:

        def count() -> str:
            return http.get(f"/disconnected/{ids['connectionId']}").text

        while count() == "0":
            assert time.monotonic() - killed < bound, f"not disconnected within {bound} s"
            time.sleep(0.1)
        took = time.monotonic() - killed
        time.sleep(1.2)  # another sweep or two: still once
        assert count() == "1"
    if long_polling:
        assert took >= disconnect_timeout, took  # never before the disconnect timeout
    else:
        assert took < disconnect_timeout, took  # the closed socket, not the sweep
