"""Acceptance tests: the official SignalR JS client (Node) against a real hubwire server process.

``tests/js/scenario.cjs`` runs named checks with ``@microsoft/signalr`` over WebSockets, once per hub
protocol (JSON and MessagePack), against ``tests.apps.foundation:app`` and prints one JSON line per
check. Node runs once per protocol (cached for the module); every check is its own pytest test, so a
failure names the broken behaviour.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import ROOT, ServerProcess
from tests.hwtools import unexpected_tracebacks
from tests.requirements import NODE_CLIENT, requires

SCENARIO = ROOT / "tests" / "js" / "scenario.cjs"
NODE = shutil.which("node")
NODE_TIMEOUT = 120.0
PROTOCOLS = ("json", "messagepack")

#: every check the scenario must report, per protocol (kept explicit so a check cannot silently vanish)
CHECKS = (
    # invoke with results
    "invoke_echo_ascii",
    "invoke_echo_non_ascii",
    "invoke_echo_control_chars",
    "invoke_add_ints",
    "invoke_structured_object",
    "invoke_void_returns_null",
    "invoke_method_name_case_insensitive",
    "invoke_connection_id_matches_client",
    "invoke_user_from_query",
    "invoke_concurrent_results_match_ids",
    # send and server-to-client calls
    "send_fire_and_forget",
    "send_unknown_method_is_silent",
    "server_to_client_call_before_completion",
    "server_to_client_handler_name_case_insensitive",
    # server-to-client streams
    "stream_items_in_order",
    "stream_empty",
    "stream_concurrent_on_one_connection",
    "stream_cancel_by_dispose",
    "stream_error_midway",
    "stream_error_midway_detailed",
    "stream_error_before_first_item",
    # client-to-server streams
    "upload_stream_concat",
    "upload_stream_with_leading_argument",
    "upload_stream_empty",
    "upload_stream_client_error",
    # client results
    "client_result_value",
    "client_result_handler_throws",
    "client_result_no_handler",
    "client_result_async_handler",
    # exact error texts
    "error_unknown_method",
    "error_unknown_method_detailed",
    "error_hub_method_raises",
    "error_hub_method_raises_detailed",
    "error_hub_exception",
    "error_hub_exception_detailed",
    "error_wrong_argument_count",
    "error_wrong_argument_count_detailed",
    "error_too_many_arguments_detailed",
    "error_streaming_method_with_invoke",
    "error_non_streaming_method_with_stream",
    # groups, users, client targets
    "group_send_reaches_members_only",
    "group_leave_then_not_received",
    "group_except",
    "group_others_in_group",
    "group_multiple_groups",
    "user_with_two_connections",
    "users_list",
    "clients_all",
    "clients_others",
    "clients_all_except",
    "clients_client",
    "clients_clients",
    # hub context from an HTTP handler
    "http_broadcast_reaches_all",
)

pytestmark = requires(*NODE_CLIENT)


@dataclass
class NodeRun:
    protocol: str
    returncode: int | None  # None: killed after the timeout
    stdout: str
    stderr: str
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    garbage: list[str] = field(default_factory=list)

    def diagnostics(self, server: ServerProcess) -> str:
        return (
            f"node exit code: {self.returncode}\n"
            f"--- node stderr (tail) ---\n{self.stderr[-3000:]}\n"
            f"--- server log (tail) ---\n{server.output()[-3000:]}"
        )


def run_scenario(url: str, protocol: str) -> NodeRun:
    cmd = [str(NODE), str(SCENARIO), url, protocol]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=NODE_TIMEOUT, check=False)
        returncode: int | None = proc.returncode
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:  # the child is killed; keep what it printed
        returncode = None
        out, err = exc.stdout or b"", (exc.stderr or b"") + f"\n(killed after {NODE_TIMEOUT} s)".encode()
    run = NodeRun(protocol, returncode, out.decode(errors="replace"), err.decode(errors="replace"))
    for line in run.stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            run.garbage.append(line)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("name"), str):
            run.garbage.append(line)
            continue
        run.results[record["name"]] = record
    return run


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    if not (ROOT / "node_modules" / "@microsoft" / "signalr-protocol-msgpack").is_dir():
        pytest.fail("node_modules missing: run `npm ci` in the repository root")
    proc = ServerProcess("tests.apps.foundation:app")
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def scenario(server: ServerProcess) -> Callable[[str], NodeRun]:
    runs: dict[str, NodeRun] = {}

    def get(protocol: str) -> NodeRun:
        if protocol not in runs:
            runs[protocol] = run_scenario(server.url, protocol)
        return runs[protocol]

    return get


def test_scenario_defines_exactly_the_expected_checks() -> None:
    listed = subprocess.run(
        [str(NODE), str(SCENARIO), "--list"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    assert listed == list(CHECKS)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_scenario_run_is_clean(
    protocol: str, scenario: Callable[[str], NodeRun], server: ServerProcess
) -> None:
    run = scenario(protocol)
    assert run.returncode == 0, run.diagnostics(server)
    assert run.garbage == [], f"unexpected stdout lines: {run.garbage}\n{run.diagnostics(server)}"
    assert sorted(run.results) == sorted(CHECKS), run.diagnostics(server)


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_js_client(
    protocol: str, check: str, scenario: Callable[[str], NodeRun], server: ServerProcess
) -> None:
    run = scenario(protocol)
    record = run.results.get(check)
    assert record is not None, f"check {check!r} not reported ({protocol})\n{run.diagnostics(server)}"
    assert record["ok"] is True, f"[{protocol}] {check}: {record.get('detail')}"


def test_server_log_has_no_tracebacks(scenario: Callable[[str], NodeRun], server: ServerProcess) -> None:
    """After both runs, the server logged no unexpected exceptions (a hub method raising ``Boom`` on
    purpose is logged with its traceback, and that is all)."""
    for protocol in PROTOCOLS:
        scenario(protocol)
    log = server.output()
    assert "hub method Throw failed" in log  # the scenario's failing calls are logged as errors
    assert unexpected_tracebacks(log) == [], log[-5000:]
