"""The emitter: processes that run no server send to a hub's clients through the servers' Redis.

Real processes: three ``hubwire run`` instances of ``tests.apps.scaleout`` on the session's
redis-server, fifteen official JS clients (Node) spread over them, one per instance for each
transport and protocol (WebSockets JSON / MessagePack, Server-Sent Events JSON, long polling JSON /
MessagePack), some of them users ``alice`` / ``bob`` and members of ``room-a`` / ``room-b``. Each
emitter (the blocking ``Emitter`` in a separate plain Python process, ``hubwire emit``, the
``AsyncEmitter``, the ``Emitter`` from several threads) sends to every target kind, each send with
a value of its own; then a last send to everyone (one sender's messages arrive in order on one
Redis: once every client has it, nothing sent before is still on its way) and every client's
messages are compared with what each target names: the right clients, once each, nobody else.
One test runs against a real Redis Cluster (sharded pub/sub).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis.exceptions

from hubwire.emitter import AsyncEmitter, Emitter
from hubwire.protocol import InvocationMessage, JsonHubProtocol, MessagePackHubProtocol
from hubwire.protocol.backplane import GROUP_ADD, decode_group_command, decode_invocation

from .conftest import PYTHON, ROOT, RedisServer, free_port
from .rawhub import RawHub
from .redisdeploy import AclUser, RedisClusterDeployment, SentinelDeployment, TlsRedis, UnixRedis
from .requirements import NODE_CLIENT, requires
from .test_backplane_deployments import README_COMMANDS
from .test_scaleout import HUB, Cluster, new_prefix

SCRIPT = ROOT / "tests" / "emitter" / "clients.cjs"
PLAN = ROOT / "tests" / "emitter" / "plan.py"
MODES = ["ws_json", "ws_messagepack", "sse_json", "lp_json", "lp_messagepack"]
WAIT = 15.0
#: for group changes that are acknowledged (a plan's step may say less: one that is not)
ACK_TIMEOUT = 10.0
#: after every expected delivery: how long extras (a duplicate) are waited for
QUIET = 0.2
#: structured arguments every protocol must carry alike
PAYLOAD = {"n": 7, "text": "café ☕", "list": [1, 2.5, None, True], "nested": {"k": ["v"]}}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


# -- the clients -------------------------------------------------------------------------------------


class NodeClients:
    """The Node process (tests/emitter/clients.cjs): JSON lines out, commands in, reads bounded."""

    def __init__(self, spec: list[dict[str, Any]]) -> None:
        node = shutil.which("node")
        assert node is not None
        self.proc = subprocess.Popen(
            [node, str(SCRIPT), json.dumps(spec)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, kind: str, timeout: float = WAIT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {kind!r} from the Node clients within {timeout}s") from None
            if line is None:
                raise AssertionError(f"the Node clients exited ({self.proc.poll()}) before {kind!r}")
            event: dict[str, Any] = json.loads(line)
            assert event["event"] not in ("error", "closed"), event
            if event["event"] == kind:
                return event

    def command(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.command(cmd="stop")
            self.wait_for("stopped", 10)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.reader.join(5)


class World:
    """Instances, clients and who is who: what each target should reach."""

    def __init__(self, cluster: Cluster, clients: NodeClients, members: dict[str, dict[str, Any]]) -> None:
        self.cluster = cluster
        self.clients = clients
        self.members = members  # tag -> {"id", "instance", "user", "groups"}
        self.url = cluster.redis_url
        self.prefix = cluster.prefix

    def id(self, tag: str) -> str:
        return str(self.members[tag]["id"])

    def tags(self, **where: Any) -> list[str]:
        return [t for t, m in self.members.items() if all(m.get(k) == v for k, v in where.items())]

    def in_group(self, group: str) -> list[str]:
        return [t for t, m in self.members.items() if group in m["groups"]]

    def expected(self, spec: list[Any]) -> Counter[str]:
        """How many copies each client gets from a send to ``spec`` ([kind, *args]), as on the server."""
        kind, *args = spec
        by_id = {m["id"]: t for t, m in self.members.items()}
        everyone = list(self.members)
        if kind == "all":
            return Counter(everyone)
        if kind == "all_except":
            return Counter(t for t in everyone if self.members[t]["id"] not in args[0])
        if kind == "client":
            return Counter([by_id[args[0]]] if args[0] in by_id else [])
        if kind == "clients":
            return Counter(by_id[i] for i in dict.fromkeys(args[0]) if i in by_id)
        if kind == "group":
            return Counter(self.in_group(args[0]))
        if kind == "groups":
            return Counter(t for g in dict.fromkeys(args[0]) for t in self.in_group(g))
        if kind == "group_except":
            return Counter(t for t in self.in_group(args[0]) if self.members[t]["id"] not in args[1])
        if kind == "user":
            return Counter(self.tags(user=args[0]))
        if kind == "users":
            return Counter(t for u in dict.fromkeys(args[0]) for t in self.tags(user=u))
        raise AssertionError(kind)

    def got(self) -> dict[str, list[list[Any]]]:
        self.clients.command(cmd="report")
        report: dict[str, list[list[Any]]] = self.clients.wait_for("report")["got"]
        return report

    def check(self, label: str, expected: dict[str, Counter[str]], barrier: Emitter) -> dict[str, list[Any]]:
        """Each value of ``expected`` reached exactly its clients, once each, and nothing else did.

        Waits (bounded) for a last send to everyone and for every expected delivery, then QUIET
        more for late extras. (On one Redis the last send alone would do: one sender's messages
        reach an instance in order. On a cluster, messages on two shards reach an instance on two
        connections, with no order between them.)
        """
        end = f"{label}-end"
        barrier.all.send("Message", "end", end)

        def counts(got: dict[str, list[list[Any]]], value: str) -> Counter[str]:
            return Counter(t for t, msgs in got.items() for m in msgs if m[1] == value)

        wanted = {**expected, end: Counter(list(self.members))}
        deadline = time.monotonic() + WAIT
        while True:
            got = self.got()
            short = [v for v, want in wanted.items() if not counts(got, v) >= want]
            if not short:
                break
            if time.monotonic() > deadline:
                missing = {v: dict(wanted[v] - counts(got, v)) for v in short}
                raise AssertionError(f"never delivered: {missing}\n{self.cluster.logs()}")
            time.sleep(0.05)
        time.sleep(QUIET)
        got = self.got()
        problems = [
            f"{value}: expected {dict(want)}, got {dict(counts(got, value))}"
            for value, want in expected.items()
            if counts(got, value) != want
        ]
        mine = {
            t: [m for m in msgs if str(m[1]).startswith(label) and m[1] != end] for t, msgs in got.items()
        }
        strays = {t: [m for m in msgs if m[1] not in expected] for t, msgs in mine.items()}
        assert not problems and not any(strays.values()), "\n".join(problems) + f"\nstrays: {strays}"
        return mine


@contextlib.contextmanager
def world_on(redis_url: str) -> Iterator[World]:
    """Three instances on ``redis_url``; on each one client per transport and protocol."""
    cluster = Cluster(redis_url, new_prefix("emit"), 3)
    clients: NodeClients | None = None
    try:
        spec, members = [], {}
        for i, url in enumerate(cluster.urls):
            for m, mode in enumerate(MODES):
                k = i * len(MODES) + m
                tag = f"{mode}@{i}"
                user = ("alice", "bob", None)[k % 3]
                groups = {"room-a"} if k % 2 == 0 else {"room-b"} if k % 4 == 1 else set()
                spec.append({"tag": tag, "url": url, "mode": mode, "user": user})
                members[tag] = {"instance": i, "mode": mode, "user": user, "groups": groups}
        clients = NodeClients(spec)
        for entry in clients.wait_for("ready", 60)["clients"]:
            members[entry["tag"]]["id"] = entry["id"]
        for tag, member in members.items():
            for group in member["groups"]:
                clients.command(cmd="join", tag=tag, group=group)
                clients.wait_for("joined")
        yield World(cluster, clients, members)
    finally:
        if clients is not None:
            clients.close()
        cluster.close()


@pytest.fixture(scope="module")
def world(redis_server: RedisServer) -> Iterator[World]:
    with world_on(redis_server.url) as w:
        yield w


@pytest.fixture(scope="module")
def barrier(world: World) -> Iterator[Emitter]:
    with Emitter(world.url, world.prefix, hub=HUB) as emitter:
        yield emitter


# -- the plan: every target kind, group changes ------------------------------------------------------


def every_target(world: World, label: str) -> list[dict[str, Any]]:
    """Steps (tests/emitter/plan.py's format) sending to every target kind, adding to and removing
    from a group through the emitter, and adding a connection no instance holds."""
    w = world
    on = [w.tags(instance=i) for i in range(3)]
    a_member_2 = next(t for t in on[2] if "room-a" in w.members[t]["groups"])
    outsider = next(t for t in on[1] if not w.members[t]["groups"])
    x, y = on[1][1], on[2][3]  # the new group's members, on two instances
    g = f"{label}-new"

    def send(spec: list[Any], value: str, *extra: Any) -> dict[str, Any]:
        return {"op": "send", "target": spec, "args": ["Message", spec[0], f"{label}-{value}", *extra]}

    return [
        send(["all"], "all", PAYLOAD),
        send(["all_except", [w.id(on[0][0]), w.id(on[2][4])]], "all-except"),
        send(["client", w.id(on[1][2])], "client"),
        send(["clients", [w.id(on[0][1]), w.id(on[1][3]), w.id(on[2][4]), w.id(on[0][1])]], "clients"),
        send(["group", "room-a"], "group"),
        send(["groups", ["room-a", "room-b"]], "groups"),
        send(["group_except", "room-a", [w.id(a_member_2), w.id(outsider)]], "group-except"),
        send(["user", "alice"], "user"),
        send(["users", ["alice", "bob"]], "users"),
        send(["group", "nobody-joined-this"], "empty-group"),
        send(["user", "nobody"], "unknown-user"),
        send(["client", "no-such-connection"], "unknown-client"),
        {"op": "add", "connection": w.id(x), "group": g},
        {"op": "add", "connection": w.id(y), "group": g},
        send(["group", g], "new-1"),
        {"op": "remove", "connection": w.id(x), "group": g},
        send(["group", g], "new-2"),
        {"op": "add", "connection": "no-such-connection", "group": g, "ack_timeout": 1.0},
    ]


def expectations(world: World, label: str, steps: list[dict[str, Any]]) -> dict[str, Counter[str]]:
    """Each value's recipients, following the plan's group changes as the servers do."""
    g = f"{label}-new"
    added: list[str] = []
    by_id = {m["id"]: t for t, m in world.members.items()}
    expected: dict[str, Counter[str]] = {}
    for step in steps:
        if step["op"] == "add" and step["connection"] in by_id:
            added.append(by_id[step["connection"]])
        elif step["op"] == "remove":
            added.remove(by_id[step["connection"]])
        elif step["op"] == "send":
            spec = step["target"]
            expected[step["args"][2]] = Counter(added) if spec == ["group", g] else world.expected(spec)
    return expected


def check_results(world: World, steps: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
    """What each step returned: receiver counts as Redis reports them, the unknown add's timeout."""
    assert len(results) == len(steps), results
    for step, result in zip(steps, results, strict=True):
        if step["op"] == "send":
            kind = step["target"][0]
            value = step["args"][2]
            if kind == "all" or value.endswith("-all-except"):
                assert result == {"receivers": 3}, (step, result)  # every instance subscribes to :all
            elif value.endswith(("-empty-group", "-unknown-user", "-unknown-client")):
                assert result == {"receivers": 0}, (step, result)
            elif kind == "client":
                assert result == {"receivers": 1}, (step, result)
            elif kind == "user":
                assert result == {"receivers": 3}, (step, result)  # alice is on every instance
            else:
                assert result.get("receivers", 0) > 0, (step, result)
        elif step["connection"] == "no-such-connection":
            assert result["error"] == "TimeoutError", result
            assert (
                "no-such-connection" in result["message"]
                and "no server instance acknowledged" in (result["message"])
            ), result
        else:
            assert result == {"ok": True}, (step, result)


def check_payload(mine: dict[str, list[Any]], label: str) -> None:
    """The structured argument reached every client, JSON and MessagePack alike."""
    for tag, msgs in mine.items():
        (full,) = [m for m in msgs if m[1] == f"{label}-all"]
        assert full == ["all", f"{label}-all", PAYLOAD], (tag, full)


# -- the blocking Emitter in a plain Python process --------------------------------------------------


def run_plan_process(world: World, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """tests/emitter/plan.py with ``steps``: each step's result; asserts that the blocking emitter made
    no event loop and started no thread in that process."""
    proc = subprocess.run(
        [PYTHON, str(PLAN), world.url, world.prefix, HUB],
        input=json.dumps(steps),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    *results, done = [json.loads(line) for line in proc.stdout.splitlines()]
    assert done["loops_made"] == [] and done["uvloop"] is False, done
    assert done["threads_started"] == [] and done["threads_alive"] == 1, done
    return results


@requires(*NODE_CLIENT)
def test_sync_emitter_in_a_plain_process_reaches_each_target_once(world: World, barrier: Emitter) -> None:
    label = f"sync-{uuid.uuid4().hex[:6]}"
    steps = every_target(world, label)
    check_results(world, steps, run_plan_process(world, steps))
    check_payload(world.check(label, expectations(world, label, steps), barrier), label)


# -- hubwire emit ------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-m", "hubwire.cli", "emit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(),
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


@requires(*NODE_CLIENT)
def test_cli_reaches_each_target_once(world: World, barrier: Emitter) -> None:
    label = f"cli-{uuid.uuid4().hex[:6]}"
    common = ["--redis", world.url, "--channel-prefix", world.prefix, "--hub", HUB]
    target_client = world.tags(instance=2)[1]
    runs = {
        "all": (["--all"], world.expected(["all"])),
        "group": (["--group", "room-b"], world.expected(["group", "room-b"])),
        "user": (["--user", "bob"], world.expected(["user", "bob"])),
        "client": ([f"--client={world.id(target_client)}"], Counter([target_client])),
    }
    procs = {
        name: _cli(
            *common, *flags, "Message", json.dumps(name), json.dumps(f"{label}-{name}"), json.dumps(PAYLOAD)
        )
        for name, (flags, _) in runs.items()
    }  # in parallel: the check does not depend on their order
    for name, proc in procs.items():
        code, out, err = _finish(proc)
        assert code == 0 and err == "", (name, code, out, err)
        took = {"all": 3, "group": 3, "user": 3, "client": 1}[name]  # instances with a recipient
        assert out.startswith("sent Message to ") and f": {took} server subscription(s) took it" in out, out
    expected = {f"{label}-{name}": want for name, (_, want) in runs.items()}
    mine = world.check(label, expected, barrier)
    for tag, msgs in mine.items():
        assert all(m[2] == PAYLOAD for m in msgs), (tag, msgs)


def test_cli_bad_input_and_unreachable_redis_say_so_in_one_line() -> None:
    dead = f"redis://hw:sekret@127.0.0.1:{free_port()}/0"
    common = ["--channel-prefix", "P:", "--hub", "H"]
    cases = {
        "not json": (["--redis", dead, *common, "--all", "Message", "{nope"], 2, "argument 1 is not JSON"),
        "bad url": (
            ["--redis", "redis+cluster://hw:sekret@h:1/3", *common, "--all", "M"],
            2,
            "only database 0",
        ),
        "unreachable": (["--redis", dead, *common, "--group", "g", "M", "1"], 1, "redis://hw:***@127.0.0.1"),
    }
    procs = {name: _cli(*args) for name, (args, _, _) in cases.items()}
    no_target = _cli("--redis", dead, *common, "M")
    for name, proc in procs.items():
        code, out, err = _finish(proc)
        _, want_code, says = cases[name]
        assert (code, out) == (want_code, ""), (name, code, out, err)
        assert err.count("\n") == 1 and err.startswith("hubwire emit: ") and says in err, (name, err)
        assert "sekret" not in err and "Traceback" not in err, (name, err)
    code, _, err = _finish(no_target)
    assert code == 2 and "one of the arguments --all --group --user --client is required" in err, err


# -- AsyncEmitter ------------------------------------------------------------------------------------


async def run_async(emitter: AsyncEmitter, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """tests/emitter/plan.py's loop with the AsyncEmitter."""
    results: list[dict[str, Any]] = []
    for step in steps:
        emitter.ack_timeout = step.get("ack_timeout", ACK_TIMEOUT)
        try:
            if step["op"] == "send":
                kind, *args = step["target"]
                target = emitter.all if kind == "all" else getattr(emitter, kind)(*args)
                results.append({"receivers": await target.send(*step["args"])})
            else:
                await getattr(emitter.groups, step["op"])(step["connection"], step["group"])
                results.append({"ok": True})
        except Exception as exc:
            results.append({"error": type(exc).__name__, "message": str(exc)})
    return results


@requires(*NODE_CLIENT)
async def test_async_emitter_reaches_each_target_once(world: World, barrier: Emitter) -> None:
    label = f"async-{uuid.uuid4().hex[:6]}"
    steps = every_target(world, label)
    async with AsyncEmitter(world.url, world.prefix, hub=HUB) as emitter:
        results = await run_async(emitter, steps)
    check_results(world, steps, results)
    check_payload(world.check(label, expectations(world, label, steps), barrier), label)


# -- one Emitter, several threads --------------------------------------------------------------------


@requires(*NODE_CLIENT)
def test_sync_emitter_shared_by_threads_every_message_once(world: World, barrier: Emitter) -> None:
    """Eight threads share one Emitter: each adds a client to a group of its own (concurrent acks on
    one ack channel) and sends 25 messages (to a group, a user, that new group); each arrives once."""
    label = f"threads-{uuid.uuid4().hex[:6]}"
    tags = list(world.members)
    expected: dict[str, Counter[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(t: int) -> None:
        try:
            start.wait(10)
            world_group = f"{label}-g{t}"
            barrier.groups.add(world.id(tags[t]), world_group)
            for n in range(25):
                spec: list[Any] = [["group", "room-b"], ["user", "bob"], ["group", world_group]][n % 3]
                target = barrier.group(spec[1]) if spec[0] == "group" else barrier.user(spec[1])
                target.send("Message", "thread", f"{label}-t{t}-{n}")
        except BaseException as exc:
            errors.append(exc)

    for t in range(8):
        for n in range(25):
            spec = [["group", "room-b"], ["user", "bob"], ["group", f"{label}-g{t}"]][n % 3]
            want = Counter([tags[t]]) if n % 3 == 2 else world.expected(spec)
            expected[f"{label}-t{t}-{n}"] = want
    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and not any(t.is_alive() for t in threads), errors
    world.check(label, expected, barrier)


# -- what an emitter publishes, without a server -----------------------------------------------------


def test_envelopes_are_the_servers_bytes() -> None:
    """The same channels and, origin and number aside, byte for byte the envelope a server's lifetime
    manager publishes for the same send; group commands a server decodes, with unique ack ids."""
    from hubwire.backplane import RedisBackplane
    from hubwire.protocol.backplane import RedisInvocation, encode_invocation

    backplane = RedisBackplane("redis://127.0.0.1:1", channel_prefix="App:")  # never started
    manager = backplane.create_manager("ChatHub")
    manager.protocols = (JsonHubProtocol(), MessagePackHubProtocol())
    emitter = Emitter("redis://127.0.0.1:1", "App:", hub="ChatHub")
    items = emitter._core.invocations(
        ["App:ChatHub:group:g1", "App:ChatHub:group:g2"], "Say", ["hi", {"n": 1}], ["x"]
    )
    assert [c for c, _ in items] == [manager.channels.group("g1"), manager.channels.group("g2")]
    first, second = (decode_invocation(payload) for _, payload in items)
    assert (first.origin, second.origin) == (emitter.name, emitter.name) and second.seq == first.seq + 1
    assert first.invocation_id is None and first.excluded == ["x"]
    _, serializations = manager._serialize(InvocationMessage("Say", ["hi", {"n": 1}]))
    assert first.serializations == serializations
    server_bytes = encode_invocation(manager._envelope(serializations, ["x"]))
    assert (
        encode_invocation(
            RedisInvocation(first.serializations, first.excluded, origin=manager.server_name, seq=1)
        )
        == server_bytes
    )
    assert emitter.all._channels == (manager.channels.all,)
    assert emitter.user("u")._channels == (manager.channels.user("u"),)
    assert emitter.clients("one-id")._channels == (
        manager.channels.connection("one-id"),
    )  # one string: one id
    assert emitter.groups(["a", "", "a", "b"])._channels == (
        manager.channels.group("a"),
        manager.channels.group("b"),
    )

    requests = [emitter._core.group_request(GROUP_ADD, "c1", "g") for _ in range(3)]
    commands = [decode_group_command(r.payload) for r in requests]
    assert {(c.server_name, c.id) for c in commands} == {(emitter.name, i) for i in (1, 2, 3)}
    assert all(c.connection_id == "c1" and c.group == "g" and c.action == GROUP_ADD for c in commands)
    assert requests[0].channel == manager.channels.group_management
    assert requests[0].ack_channel == manager.channels.ack(emitter.name)


def test_a_forked_child_is_another_sender() -> None:
    """Celery's prefork pool forks after the emitter may have been made: a child counting from the
    parent's name and numbers would have its messages dropped as the parent's repeats."""
    emitter = Emitter("redis://127.0.0.1:1", hub="H")
    ((_, payload),) = emitter._core.invocations(["c"], "M", [])
    parent = decode_invocation(payload)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first envelope's origin and number, then leave at once
        try:
            ((_, data),) = emitter._core.invocations(["c"], "M", [])
            child = decode_invocation(data)
            os.write(write, json.dumps([child.origin, child.seq]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        origin, seq = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert origin != parent.origin and seq == 1
    ((_, again),) = emitter._core.invocations(["c"], "M", [])
    assert decode_invocation(again).origin == parent.origin  # the parent goes on as before


@pytest.mark.parametrize(
    "url",
    [
        "redis://hw:secret@127.0.0.1:1/2",
        "rediss://127.0.0.1:1/0?ssl_cert_reqs=none&ssl_check_hostname=false",
        "unix:///nonexistent/redis.sock?db=1",
        "redis+sentinel://hw:secret@127.0.0.1:1,127.0.0.1:2/0/mymaster",
        "redis+cluster://hw:secret@127.0.0.1:1,127.0.0.1:2",
        "rediss+cluster://127.0.0.1:1?ssl_cert_reqs=none",
    ],
)
async def test_every_backplane_url_is_taken_and_nothing_connects_before_a_send(url: str) -> None:
    sync, aio = Emitter(url, hub="H"), AsyncEmitter(url, hub="H")
    assert sync.url == aio.url and "secret" not in sync.url
    assert sync._publish_command == aio._publish_command == ("SPUBLISH" if "cluster" in url else "PUBLISH")
    await aio.close()
    sync.close()


async def test_bad_urls_and_unreachable_redis_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"redis\+cluster://hw:\*\*\*@h:1/3") as bad:
        Emitter("redis+cluster://hw:secret@h:1/3", hub="H")
    assert "secret" not in str(bad.value)
    with pytest.raises(ValueError, match="unsupported Redis URL scheme"):
        AsyncEmitter("http://x", hub="H")
    with pytest.raises(ValueError, match="hub must name the hub"):
        Emitter("redis://x", hub="")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    emitter = Emitter(dead, hub="H")
    with pytest.raises(ValueError, match="method must be a non-empty string"):
        emitter.all.send("")
    with pytest.raises(redis.exceptions.ConnectionError):
        emitter.all.send("M")
    with pytest.raises(redis.exceptions.ConnectionError):  # not a timeout: Redis itself is away
        emitter.groups.add("c", "g")
    async with AsyncEmitter(dead, hub="H") as aio:
        with pytest.raises(redis.exceptions.ConnectionError):
            await aio.all.send("M")
        with pytest.raises(redis.exceptions.ConnectionError):
            await aio.groups.add("c", "g")
    cluster = Emitter(f"redis+cluster://127.0.0.1:{free_port()}", hub="H")
    with pytest.raises(redis.exceptions.ConnectionError, match="Redis Cluster cannot be connected"):
        cluster.user("u").send("M")


# -- Redis Cluster: sharded pub/sub ------------------------------------------------------------------


@requires(*NODE_CLIENT)
async def test_redis_cluster_every_target_once_over_sharded_pub_sub() -> None:
    """Both emitters on a three-master Redis Cluster (as the README's least-privilege ACL user):
    SPUBLISH to the shard owning each channel, the group acks subscribed (SSUBSCRIBE) on the shard
    owning the emitter's ack channel."""
    acl = AclUser(prefix="", commands=README_COMMANDS)  # the README's least-privilege line suffices
    with RedisClusterDeployment(masters=3, replicas=0, acl=acl) as deployment, world_on(deployment.url) as w:
        with Emitter(w.url, w.prefix, hub=HUB) as emitter:  # the barrier
            label = f"cl-sync-{uuid.uuid4().hex[:6]}"
            steps = every_target(w, label)
            check_results(w, steps, run_plan_process(w, steps))
            check_payload(w.check(label, expectations(w, label, steps), emitter), label)
            async with AsyncEmitter(w.url, w.prefix, hub=HUB) as aio:
                label = f"cl-async-{uuid.uuid4().hex[:6]}"
                steps = every_target(w, label)
                results = await run_async(aio, steps)
                check_results(w, steps, results)
                check_payload(w.check(label, expectations(w, label, steps), emitter), label)
        classic = [
            c for m in deployment.masters() for c in deployment.call(m.port, "PUBSUB", "CHANNELS", "*")
        ]
        assert classic == [], classic  # the servers subscribe sharded only: the emitters' messages went there


# -- TLS, unix socket, Sentinel ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tls", "unix", "sentinel"])
async def test_tls_unix_socket_and_sentinel_urls_work_for_both_emitters(kind: str) -> None:
    """On each deployment, one instance and one client: each emitter adds the client to a group (the
    ack comes back over that deployment) and sends to the group; the client gets both, once."""
    deployments = {
        "tls": lambda: TlsRedis(tls_auth_clients=True),
        "unix": UnixRedis,
        "sentinel": SentinelDeployment,
    }
    with deployments[kind]() as deployment:
        group = Cluster(deployment.url, new_prefix(kind), 1)
        try:
            hub = await RawHub.open(group.urls[0])
            me = (await hub.invoke("Whoami"))["connectionId"]
            with Emitter(deployment.url, group.prefix, hub=HUB, ack_timeout=5.0) as emitter:
                emitter.groups.add(me, "g-sync")
                assert emitter.group("g-sync").send("Message", "sync", f"{kind}-sync") == 1
            async with AsyncEmitter(deployment.url, group.prefix, hub=HUB, ack_timeout=5.0) as aio:
                await aio.groups.add(me, "g-async")
                assert await aio.group("g-async").send("Message", "async", f"{kind}-async") == 1
            got = [(await hub.next_message())["arguments"] for _ in range(2)]
            assert got == [["sync", f"{kind}-sync"], ["async", f"{kind}-async"]], got
            await hub.close()
        except BaseException:
            print(group.logs())
            raise
        finally:
            group.close()
