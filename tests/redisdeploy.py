"""Real Redis deployments for the tests: Cluster, Sentinel, TLS, unix socket, ACL-protected.

The backplane takes every Redis deployment by URL (``redis://``, ``rediss://``, ``unix://``,
``redis+sentinel://``, ``redis+cluster://`` and their TLS forms); its tests need the real thing, not a
mock, because what breaks in production is exactly what a mock does not do: MOVED after a slot
move, a replica taking over, a sentinel naming another master, a certificate that does not verify, a
command the ACL does not grant.

Every class here is a context manager that starts Debian's ``redis-server`` 7.0 (Sentinel is
``redis-server <conf> --sentinel``, no other binary) on free loopback ports, each process in its own
session and directory under one temp dir, and waits, bounded, until the deployment is usable as a
whole (a cluster with ``cluster_state:ok`` and all 16384 slots on every node and every replica
attached; sentinels that know each other and the replica), since a test that starts on a
half-formed deployment fails in confusing ways. ``close()`` SIGKILLs every process group and removes
the temp dir; ``logs()`` gives the tail of every process's log for failure messages. A deployment
that fails to start closes itself and raises :class:`DeploymentError` with those logs.

Authentication (``acl=AclUser(prefix=...)`` and/or ``requirepass=...``): the ``default`` user is
password-protected (it is the helpers' admin: cluster creation, slot moves, waits), replicas
authenticate as ``hw-replication`` (``+psync +replconf +ping``) and sentinels as ``hw-sentinel``
(the Redis docs' minimal Sentinel rule). The application user the URLs carry gets, on every data
node (P is its prefix)::

    user hw on >PASSWORD resetkeys resetchannels ~P* &P* -@all +publish +spublish +subscribe
        +ssubscribe +unsubscribe +sunsubscribe +ping +get +set +exists +expire +del +pttl +hset
        +hgetall +hexists +hdel +hello +auth
        +select +cluster|slots +cluster|shards +cluster|nodes +info +readonly +role +command +asking

``+command`` because redis-py's ``RedisCluster`` reads the command table (``COMMAND``) when it
starts, ``+asking`` for the ASK redirect during a slot move. ``CLIENT SETNAME`` is *not* granted, on
purpose (redis-py's ``CLIENT SETINFO`` on connect gets NOPERM, which redis-py ignores). With
``protect_sentinels=True`` the sentinels too require a password and know the same user, with::

    user hw on >PASSWORD resetchannels &* -@all +sentinel|masters +sentinel|master
        +sentinel|get-master-addr-by-name +sentinel|sentinels +sentinel|replicas +sentinel|slaves
        +ping +hello +auth +subscribe +psubscribe +unsubscribe +punsubscribe +role +info

TLS certificates (a CA, a server certificate for 127.0.0.1/localhost that is also the nodes' client
certificate for replication and the cluster bus, a client certificate) are made with the
``openssl`` command.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import redis
from redis.crc import key_slot

from .conftest import free_port, wait_port

ALL_SLOTS = 16384
#: the default user's password when an ACL user is asked for without ``requirepass``
ADMIN_PASSWORD = "hw-admin-secret"

#: what the backplane's user may run on a data node (module docstring)
APP_COMMANDS = (
    "publish",
    "spublish",
    "subscribe",
    "ssubscribe",
    "unsubscribe",
    "sunsubscribe",
    "ping",
    "get",
    "set",
    "exists",
    "expire",
    "del",
    "pttl",
    "hset",
    "hgetall",
    "hexists",
    "hdel",
    "hello",
    "auth",
    "select",
    "cluster|slots",
    "cluster|shards",
    "cluster|nodes",
    "info",
    "readonly",
    "role",
    "command",
    "asking",
)
#: what the backplane's user may run on a sentinel: discover the master, follow +switch-master
SENTINEL_APP_COMMANDS = (
    "sentinel|masters",
    "sentinel|master",
    "sentinel|get-master-addr-by-name",
    "sentinel|sentinels",
    "sentinel|replicas",
    "sentinel|slaves",
    "ping",
    "hello",
    "auth",
    "subscribe",
    "psubscribe",
    "unsubscribe",
    "punsubscribe",
    "role",
    "info",
)
#: Redis docs ("Redis Access Control List" in the Sentinel page): what a sentinel needs on data nodes
SENTINEL_RULE = (
    "allchannels +multi +slaveof +ping +exec +subscribe +config|rewrite +role +publish +info"
    " +client|setname +client|kill +script|kill"
)
REPLICATION_RULE = "+psync +replconf +ping"
#: openssl: a new P-256 key, unencrypted (fast to make, and every TLS stack here takes it)
EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


class DeploymentError(RuntimeError):
    """A deployment that did not start or did not reach the state waited for (message has the logs)."""


@dataclass(frozen=True)
class AclUser:
    """The application's least-privilege user: its keys and channels all start with ``prefix``."""

    prefix: str = "hw:"
    name: str = "hw"
    password: str = "hw-secret"
    commands: tuple[str, ...] = APP_COMMANDS
    sentinel_commands: tuple[str, ...] = SENTINEL_APP_COMMANDS

    def rule(self) -> str:
        """The ACL rule on a data node (``ACL SETUSER <name> <rule>`` or ``user <name> <rule>``)."""
        grants = " ".join(f"+{c}" for c in self.commands)
        p = self.prefix
        return f"on >{self.password} resetkeys resetchannels ~{p}* &{p}* -@all {grants}"

    def sentinel_rule(self) -> str:
        """The rule on a sentinel (with ``protect_sentinels``): discovery and its event channels."""
        grants = " ".join(f"+{c}" for c in self.sentinel_commands)
        return f"on >{self.password} resetchannels &* -@all {grants}"


@dataclass(frozen=True)
class _Security:
    """Who may connect: the admin (``default``) password, and the user the URLs carry."""

    admin_password: str | None = None
    acl: AclUser | None = None

    @classmethod
    def of(cls, acl: AclUser | None, requirepass: str | None) -> _Security:
        if acl is not None:
            return cls(requirepass or ADMIN_PASSWORD, acl)
        return cls(requirepass, None)

    def data_lines(self) -> list[str]:
        """Config lines of a data node: protected default, internal users, the app user."""
        if self.admin_password is None:
            return []
        pw = self.admin_password
        lines = [
            f"user default on resetpass >{pw} ~* &* +@all",
            f"user hw-replication on >{pw} {REPLICATION_RULE}",
            f"user hw-sentinel on >{pw} {SENTINEL_RULE}",
            "masteruser hw-replication",
            f"masterauth {pw}",
        ]
        if self.acl is not None:
            lines.append(f"user {self.acl.name} {self.acl.rule()}")
        return lines

    def sentinel_lines(self, service: str, protect: bool) -> list[str]:
        """Sentinel config: its auth on the data nodes, and (``protect``) its own protection."""
        if self.admin_password is None:
            return []
        pw = self.admin_password
        lines = [f"sentinel auth-user {service} hw-sentinel", f"sentinel auth-pass {service} {pw}"]
        if protect:
            lines += [f"user default on resetpass >{pw} ~* &* +@all", f"sentinel sentinel-pass {pw}"]
            if self.acl is not None:
                lines.append(f"user {self.acl.name} {self.acl.sentinel_rule()}")
        return lines

    def userinfo(self) -> str:
        """The ``user:password@`` part of the URLs (the app user, else the default's password)."""
        if self.acl is not None:
            return f"{quote(self.acl.name, safe='')}:{quote(self.acl.password, safe='')}@"
        if self.admin_password is not None:
            return f":{quote(self.admin_password, safe='')}@"
        return ""

    def client_kwargs(self) -> dict[str, Any]:
        """redis-py ``username``/``password`` of the user the URLs carry."""
        if self.acl is not None:
            return {"username": self.acl.name, "password": self.acl.password}
        if self.admin_password is not None:
            return {"password": self.admin_password}
        return {}


class Certificates:
    """A CA, a server certificate (127.0.0.1, localhost; also the nodes' own client certificate for
    replication and the cluster bus, hence both usages) and a client certificate, made with openssl."""

    def __init__(self, directory: Path) -> None:
        exe = shutil.which("openssl")
        if exe is None:
            raise DeploymentError(
                "the openssl command is needed for the TLS certificates (apt-get install openssl)"
            )
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.ca_cert = directory / "ca.crt"
        self.ca_key = directory / "ca.key"
        self.server_cert = directory / "server.crt"
        self.server_key = directory / "server.key"
        self.client_cert = directory / "client.crt"
        self.client_key = directory / "client.key"
        self._openssl = exe
        self._make()

    def _run(self, *args: str) -> None:
        with open(self.dir / "openssl.log", "ab") as log:
            subprocess.run(
                [self._openssl, *args],
                cwd=self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=30,
            )

    def _make(self) -> None:
        ca = ["-keyout", "ca.key", "-out", "ca.crt", "-days", "3", "-subj", "/CN=hubwire test CA"]
        ca += [
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]
        self._run("req", "-x509", *EC_KEY, *ca)
        # SKI/AKI: Python's ssl (VERIFY_X509_STRICT from 3.13) wants them
        leaf = "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        leaf += "keyUsage=digitalSignature\n"
        san = "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        self._leaf("server", "localhost", leaf + san + "extendedKeyUsage=serverAuth,clientAuth\n")
        self._leaf("client", "hubwire test client", leaf + "extendedKeyUsage=clientAuth\n")

    def _leaf(self, name: str, cn: str, extensions: str) -> None:
        (self.dir / f"{name}.ext").write_text(extensions)
        self._run(
            "req", "-new", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}"
        )
        self._run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "3",
            "-extfile",
            f"{name}.ext",
        )

    def server_lines(self, auth_clients: str) -> list[str]:
        """TLS config of a node (its TLS port is set by the caller)."""
        return [
            f"tls-cert-file {self.server_cert}",
            f"tls-key-file {self.server_key}",
            f"tls-ca-cert-file {self.ca_cert}",
            f"tls-auth-clients {auth_clients}",
            "tls-replication yes",
        ]

    def client_kwargs(self) -> dict[str, Any]:
        """redis-py keyword arguments of a verifying client with the client certificate."""
        return {
            "ssl": True,
            "ssl_ca_certs": str(self.ca_cert),
            "ssl_certfile": str(self.client_cert),
            "ssl_keyfile": str(self.client_key),
            "ssl_cert_reqs": "required",
        }

    def query(self) -> str:
        """The URL query of a verifying client with the client certificate."""
        ca, cert, key = (quote(str(p), safe="/") for p in (self.ca_cert, self.client_cert, self.client_key))
        return f"ssl_ca_certs={ca}&ssl_certfile={cert}&ssl_keyfile={key}&ssl_cert_reqs=required"

    def cli_args(self) -> list[str]:
        return [
            "--tls",
            "--cacert",
            str(self.ca_cert),
            "--cert",
            str(self.client_cert),
            "--key",
            str(self.client_key),
        ]


@dataclass
class _Node:
    """One redis-server (or sentinel) process: its directory, config file, log and connection."""

    name: str
    port: int
    dir: Path
    lines: list[str]
    client: dict[str, Any]
    sentinel: bool = False
    proc: subprocess.Popen[bytes] | None = None
    #: False once a test killed it on purpose (a node dying by itself fails the waits)
    expected_alive: bool = True

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True)
        self.conf = self.dir / ("sentinel.conf" if self.sentinel else "redis.conf")
        self.conf.write_text("\n".join([f"dir {self.dir}", *self.lines]) + "\n")
        self.log = self.dir / "redis.log"

    def start(self) -> None:
        args = [shutil.which("redis-server") or "redis-server", str(self.conf)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*args, *(["--sentinel"] if self.sentinel else [])],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.expected_alive = True

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL its process group (a fork for a replication snapshot dies with it)."""
        self.expected_alive = False
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def tail(self, lines: int) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            text = [f"(no log: {exc})"]
        code = None if self.proc is None else self.proc.poll()
        state = "running" if code is None and self.proc is not None else f"exit code {code}"
        return f"==== {self.name} (port {self.port}, {state}) ====\n" + "\n".join(text)


def _parse_info(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def _pairs(flat: list[Any]) -> dict[str, Any]:
    """A RESP2 flat key/value reply (``SENTINEL MASTER``) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class _Deployment:
    """Processes under one temp dir, admin connections to them, bounded waits and logs."""

    kind = "redis"

    def __init__(self, security: _Security, tls: bool) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"hubwire-{self.kind}-"))
        self.security = security
        self.certs: Certificates | None = None
        self._nodes: dict[int, _Node] = {}
        self._extra_logs: list[Path] = []
        self._killed_at: dict[int, float] = {}
        if tls:
            try:
                self.certs = Certificates(self.dir / "tls")
            except BaseException:
                self.close()
                raise
            self._extra_logs.append(self.dir / "tls" / "openssl.log")

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process (group) and remove the temp dir."""
        for node in self._nodes.values():
            with contextlib.suppress(Exception):
                node.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    @contextlib.contextmanager
    def _starting(self) -> Iterator[None]:
        """Close everything started so far when starting fails, so a fixture leaks nothing."""
        try:
            yield
        except BaseException:
            self.close()
            raise

    @property
    def nodes(self) -> dict[int, subprocess.Popen[bytes]]:
        """port -> process of every data node and sentinel started."""
        return {port: node.proc for port, node in self._nodes.items() if node.proc is not None}

    def logs(self, lines: int = 60) -> str:
        """The last ``lines`` lines of every process's log (and of cluster creation, openssl)."""
        parts = [node.tail(lines) for node in self._nodes.values()]
        for path in self._extra_logs:
            with contextlib.suppress(OSError):
                parts.append(f"==== {path.name} ====\n" + path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    # -- nodes and admin connections ---------------------------------------------------------------

    def _listen(self, port: int, auth_clients: str = "yes") -> list[str]:
        """Config lines: loopback only, no persistence, TCP or TLS port."""
        # repl-diskless-sync-delay 0: a master otherwise waits 5 s for more replicas before a full sync
        lines = ["bind 127.0.0.1", 'save ""', "appendonly no", "repl-diskless-sync-delay 0"]
        if self.certs is None:
            return [*lines, f"port {port}"]
        return [*lines, "port 0", f"tls-port {port}", *self.certs.server_lines(auth_clients)]

    def _node_client(self, password: str | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"password": password}
        if self.certs is not None:
            kwargs |= self.certs.client_kwargs()
        return kwargs

    def _add(self, name: str, port: int, lines: list[str], *, sentinel: bool = False, **client: Any) -> _Node:
        password = client.pop("password", self.security.admin_password)
        node = _Node(name, port, self.dir / name, lines, self._node_client(password) | client, sentinel)
        self._nodes[port] = node
        return node

    def _start(self, node: _Node, timeout: float = 15.0) -> None:
        node.start()
        if "unix_socket_path" not in node.client:
            assert node.proc is not None
            try:
                wait_port(node.port, timeout, node.proc)
            except (RuntimeError, TimeoutError) as exc:
                raise DeploymentError(f"{node.name}: {exc}\n{self.logs()}") from exc
        self._wait(
            f"{node.name} answers PING", lambda: self.call(node.port, "PING") in ("PONG", True), timeout
        )

    def call(self, port: int, *args: Any) -> Any:
        """One command on one node as its admin: raw RESP2 reply (no redis-py parsing), fresh connection."""
        node = self._nodes[port]
        kwargs: dict[str, Any] = {"host": "127.0.0.1", "port": port} | node.client
        with redis.Redis(
            **kwargs,
            decode_responses=True,
            socket_timeout=3,
            socket_connect_timeout=2,
            driver_info=None,
            protocol=2,
        ) as r:
            r.response_callbacks.clear()
            return r.execute_command(*args)

    def info(self, port: int, section: str) -> dict[str, str]:
        return _parse_info(self.call(port, "INFO", section))

    def alive_ports(self, sentinel: bool = False) -> list[int]:
        return [p for p, n in self._nodes.items() if n.alive and n.sentinel == sentinel]

    def _kill(self, port: int) -> None:
        self._nodes[port].kill()
        self._killed_at[port] = time.monotonic()

    # -- bounded waits ------------------------------------------------------------------------------

    def _wait(self, what: str, condition: Callable[[], Any], timeout: float) -> float:
        """Poll ``condition`` (Redis errors count as "not yet") until true; the seconds it took."""
        start = time.monotonic()
        deadline = start + timeout
        last: BaseException | None = None
        while True:
            try:
                if condition():
                    return time.monotonic() - start
            except (redis.RedisError, OSError) as exc:
                last = exc
            died = [n.name for n in self._nodes.values() if n.expected_alive and n.proc and not n.alive]
            if died:
                raise DeploymentError(f"{what}: {', '.join(died)} exited\n{self.logs()}")
            if time.monotonic() >= deadline:
                raise DeploymentError(f"{what}: not after {timeout} s (last error: {last!r})\n{self.logs()}")
            time.sleep(0.05)

    def _ports(self, count: int) -> list[int]:
        """``count`` distinct free loopback ports."""
        ports: list[int] = []
        while len(ports) < count:
            port = free_port()
            if port not in ports and port not in self._nodes:
                ports.append(port)
        return ports

    def _scheme(self, base: str) -> str:
        return base.replace("redis", "rediss", 1) if self.certs is not None else base

    def _query(self, first: str = "?") -> str:
        return "" if self.certs is None else first + self.certs.query()

    def client_kwargs(self) -> dict[str, Any]:
        """redis-py keyword arguments of the user the URLs carry (credentials, TLS)."""
        kwargs = self.security.client_kwargs()
        if self.certs is not None:
            kwargs |= self.certs.client_kwargs()
        return kwargs


# ================================================================================================
# Standalone: TCP, TLS, unix socket
# ================================================================================================


class StandaloneRedis(_Deployment):
    """One redis-server: TCP (default), TLS (``tls=True``) or a unix socket only (``unix=True``)."""

    kind = "standalone"

    def __init__(
        self,
        *,
        acl: AclUser | None = None,
        requirepass: str | None = None,
        tls: bool = False,
        tls_auth_clients: str | bool = True,
        unix: bool = False,
        timeout: float = 15.0,
    ) -> None:
        super().__init__(_Security.of(acl, requirepass), tls)
        if isinstance(tls_auth_clients, bool):
            tls_auth_clients = "yes" if tls_auth_clients else "no"
        self.port = self._ports(1)[0]  # with ``unix`` only the node's key: it listens on no TCP port
        self.socket = self.dir / "redis.sock" if unix else None
        with self._starting():
            if self.socket is not None:
                listen = [
                    "port 0",
                    f"unixsocket {self.socket}",
                    "unixsocketperm 700",
                    'save ""',
                    "appendonly no",
                ]
                client: dict[str, Any] = {"unix_socket_path": str(self.socket)}
            else:
                listen, client = self._listen(self.port, tls_auth_clients), {}
            node = self._add("redis", self.port, [*listen, *self.security.data_lines()], **client)
            self._start(node, timeout)

    @property
    def url(self) -> str:
        """``redis://[user:pw@]127.0.0.1:P/0``, ``rediss://...?ssl_...``, ``unix:///path?db=0``."""
        if self.socket is not None:
            return f"unix://{self.security.userinfo()}{self.socket}?db=0"
        return f"{self._scheme('redis')}://{self.security.userinfo()}127.0.0.1:{self.port}/0{self._query()}"

    def kill(self) -> None:
        self._kill(self.port)

    def restart(self, timeout: float = 15.0) -> None:
        node = self._nodes[self.port]
        node.kill()
        self._start(node, timeout)


class TlsRedis(StandaloneRedis):
    """redis-server on a TLS port only (``--port 0 --tls-port P``), with certificates made for it.

    ``tls_auth_clients``: True/"yes" (client certificate required), False/"no", or "optional".
    Properties ``ca_cert``, ``client_cert``, ``client_key``, ``server_cert``; ``url`` is ready to use.
    """

    kind = "tls"

    def __init__(
        self,
        *,
        tls_auth_clients: str | bool = True,
        acl: AclUser | None = None,
        requirepass: str | None = None,
        timeout: float = 15.0,
    ) -> None:
        super().__init__(
            acl=acl, requirepass=requirepass, tls=True, tls_auth_clients=tls_auth_clients, timeout=timeout
        )

    @property
    def _certs(self) -> Certificates:
        assert self.certs is not None
        return self.certs

    @property
    def ca_cert(self) -> Path:
        return self._certs.ca_cert

    @property
    def client_cert(self) -> Path:
        return self._certs.client_cert

    @property
    def client_key(self) -> Path:
        return self._certs.client_key

    @property
    def server_cert(self) -> Path:
        return self._certs.server_cert


class UnixRedis(StandaloneRedis):
    """redis-server on a unix socket only (``--port 0 --unixsocket path --unixsocketperm 700``)."""

    kind = "unix"

    def __init__(
        self, *, acl: AclUser | None = None, requirepass: str | None = None, timeout: float = 15.0
    ) -> None:
        super().__init__(acl=acl, requirepass=requirepass, unix=True, timeout=timeout)


# ================================================================================================
# Cluster
# ================================================================================================


@dataclass
class ClusterNodeView:
    """One line of ``CLUSTER NODES`` as one node sees it."""

    node_id: str
    port: int
    flags: set[str]
    master_id: str | None
    slots: list[tuple[int, int]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "noaddr", "handshake"})

    @property
    def is_master(self) -> bool:
        return "master" in self.flags


@dataclass
class ClusterMaster:
    """A current master: port, node id, slot ranges (inclusive) and its replicas' ports."""

    port: int
    node_id: str
    slots: list[tuple[int, int]]
    replicas: list[int]

    def owns(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)


def parse_cluster_nodes(text: str) -> list[ClusterNodeView]:
    """``CLUSTER NODES``: ``<id> <ip:port@cport[,host]> <flags> <master|-> <ping> <pong> <epoch>
    <link> <slot>...``; slots in migration (``[slot->-id]``) are left out."""
    views = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        port = int(parts[1].split("@", 1)[0].rsplit(":", 1)[1] or 0)
        slots = []
        for item in parts[8:]:
            if item.startswith("["):
                continue
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        master = None if parts[3] == "-" else parts[3]
        views.append(ClusterNodeView(parts[0], port, set(parts[2].split(",")) - {"myself"}, master, slots))
    return views


class RedisClusterDeployment(_Deployment):
    """A Redis Cluster of ``masters * (1 + replicas)`` nodes (``--cluster-enabled yes``), created by
    ``redis-cli --cluster create``, with a short ``cluster-node-timeout`` so failover is quick."""

    kind = "cluster"

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        *,
        acl: AclUser | None = None,
        requirepass: str | None = None,
        tls: bool = False,
        node_timeout_ms: int = 1000,
        timeout: float = 40.0,
    ) -> None:
        super().__init__(_Security.of(acl, requirepass), tls)
        self.expected_masters = masters
        self.replicas_per_master = replicas
        self._killed_slots: dict[int, list[tuple[int, int]]] = {}
        with self._starting():
            count = masters * (1 + replicas)
            ports = self._ports(2 * count)
            for i, (port, bus) in enumerate(zip(ports[:count], ports[count:], strict=True)):
                lines = [
                    *self._listen(port),
                    "cluster-enabled yes",
                    "cluster-config-file nodes.conf",
                    f"cluster-node-timeout {node_timeout_ms}",
                    f"cluster-port {bus}",  # not port+10000: that can be taken or above 65535
                    "cluster-replica-validity-factor 0",  # a replica always may take over
                    *(["tls-cluster yes"] if self.certs else []),
                    *self.security.data_lines(),
                ]
                self._add(f"node{i}-{port}", port, lines)
            for node in self._nodes.values():
                self._start(node)
            self._create(timeout)
            self._wait("cluster formed, every replica attached", self._healthy, timeout)

    def _create(self, timeout: float) -> None:
        args = [shutil.which("redis-cli") or "redis-cli", "--cluster", "create"]
        args += [f"127.0.0.1:{p}" for p in self._nodes]
        args += ["--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
        if self.security.admin_password is not None:
            args += ["-a", self.security.admin_password, "--no-auth-warning"]
        if self.certs is not None:
            args += self.certs.cli_args()
        log = self.dir / "cluster-create.log"
        self._extra_logs.append(log)
        with open(log, "ab") as out:
            try:
                done = subprocess.run(
                    args, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
                )
            except subprocess.TimeoutExpired as exc:
                raise DeploymentError(
                    f"redis-cli --cluster create: not done after {timeout} s\n{self.logs()}"
                ) from exc
        if done.returncode != 0:
            raise DeploymentError(f"redis-cli --cluster create exited {done.returncode}\n{self.logs()}")

    # -- views --------------------------------------------------------------------------------------

    def view(self, port: int) -> list[ClusterNodeView]:
        """``CLUSTER NODES`` as the node on ``port`` sees the cluster."""
        return parse_cluster_nodes(self.call(port, "CLUSTER", "NODES"))

    def _any_view(self) -> list[ClusterNodeView]:
        last: Exception | None = None
        for port in self.alive_ports():
            try:
                return self.view(port)
            except (redis.RedisError, OSError) as exc:
                last = exc
        raise DeploymentError(f"no cluster node answers CLUSTER NODES ({last!r})\n{self.logs()}")

    @staticmethod
    def _masters_of(view: list[ClusterNodeView]) -> list[ClusterMaster]:
        masters = []
        for v in view:
            if v.is_master and not v.failed:
                replicas = [r.port for r in view if r.master_id == v.node_id and not r.failed]
                masters.append(ClusterMaster(v.port, v.node_id, sorted(v.slots), sorted(replicas)))
        return sorted(masters, key=lambda m: m.slots[0] if m.slots else (ALL_SLOTS, 0))

    def masters(self) -> list[ClusterMaster]:
        """The current masters (not failed), with their slot ranges, as a live node sees them."""
        return self._masters_of(self._any_view())

    def master_for_slot(self, slot: int) -> int:
        """The port of the master that serves ``slot``."""
        for master in self.masters():
            if master.owns(slot):
                return master.port
        raise DeploymentError(f"no master serves slot {slot}\n{self.logs()}")

    def master_for_key(self, key: str | bytes) -> int:
        """The port of the master of ``key``'s slot (hash tags count; a shard channel the same)."""
        return self.master_for_slot(self.slot(key))

    @staticmethod
    def slot(key: str | bytes) -> int:
        return key_slot(key.encode() if isinstance(key, str) else key)

    def node_id(self, port: int) -> str:
        return str(self.call(port, "CLUSTER", "MYID"))

    @property
    def url(self) -> str:
        """``redis+cluster://[user:pw@]127.0.0.1:p1,127.0.0.1:p2`` (two seed nodes: one may be down)."""
        seeds = ",".join(f"127.0.0.1:{p}" for p in list(self._nodes)[:2])
        return f"{self._scheme('redis+cluster')}://{self.security.userinfo()}{seeds}{self._query()}"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", p) for p in self._nodes]

    # -- health -------------------------------------------------------------------------------------

    def _state_ok(self, port: int) -> bool:
        info = _parse_info(self.call(port, "CLUSTER", "INFO"))
        return info.get("cluster_state") == "ok" and info.get("cluster_slots_ok") == str(ALL_SLOTS)

    def _healthy(self) -> bool:
        """Every node alive: state ok, all slots ok, the full topology seen, replicas linked."""
        for port in self._nodes:
            if not self._state_ok(port):
                return False
            view = self.view(port)
            if len(view) != len(self._nodes) or any(v.failed for v in view):
                return False
            masters = self._masters_of(view)
            if len(masters) != self.expected_masters:
                return False
            if any(len(m.replicas) != self.replicas_per_master for m in masters):
                return False
            me = next(v for v in view if v.port == port)
            if not me.is_master and self.info(port, "replication").get("master_link_status") != "up":
                return False
        return True

    def wait_healthy(self, timeout: float = 20.0) -> float:
        """Wait until every node is up, agrees on the topology, and every replica is linked."""
        return self._wait("cluster healthy", self._healthy, timeout)

    # -- faults -------------------------------------------------------------------------------------

    def kill_master(self, port: int) -> None:
        """SIGKILL the master on ``port`` (its slots are remembered for :meth:`wait_failover`)."""
        master = next((m for m in self.masters() if m.port == port), None)
        if master is None:
            raise DeploymentError(f"{port} is not a master now\n{self.logs()}")
        self._killed_slots[port] = master.slots
        self._kill(port)

    def wait_failover(self, old_port: int, timeout: float = 20.0) -> float:
        """Wait until one of the killed master's replicas serves all its slots in the view of every
        live node and ``cluster_state`` is ok everywhere; the seconds since :meth:`kill_master`."""
        slots = self._killed_slots[old_port]
        old_id_views = {v.node_id for v in self._any_view() if v.port == old_port}

        def taken_over() -> bool:
            for port in self.alive_ports():
                if not self._state_ok(port):
                    return False
                owners = [
                    m
                    for m in self._masters_of(self.view(port))
                    if all(m.owns(lo) and m.owns(hi) for lo, hi in slots)
                ]
                if not owners or owners[0].port == old_port or owners[0].node_id in old_id_views:
                    return False
            return True

        self._wait(f"failover of {old_port}", taken_over, timeout)
        return time.monotonic() - self._killed_at[old_port]

    def restart(self, port: int, timeout: float = 20.0) -> float:
        """Start the killed node again (its nodes.conf is kept: it rejoins, as a replica of whoever
        took over); wait until the cluster is fully healthy again. The seconds it took."""
        node = self._nodes[port]
        if node.alive:
            raise DeploymentError(f"{port} is running")
        started = time.monotonic()
        self._start(node)
        self.wait_healthy(timeout)
        return time.monotonic() - started

    # -- slot moves ---------------------------------------------------------------------------------

    def migrate_slot(self, slot: int, to_port: int, timeout: float = 15.0) -> float:
        """Move ``slot`` (and its keys) to the master on ``to_port``, the way ``redis-cli --cluster
        reshard`` does: IMPORTING on the target, MIGRATING on the source, MIGRATE the keys, then
        SETSLOT NODE on target, source and every other master; wait until every live node agrees.
        The seconds it took."""
        started = time.monotonic()
        source = self.master_for_slot(slot)
        if source == to_port:
            return 0.0
        src_id, dst_id = self.node_id(source), self.node_id(to_port)
        self.call(to_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        self.call(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := self.call(source, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            auth = (
                []
                if self.security.admin_password is None
                else ["AUTH2", "default", self.security.admin_password]
            )
            self.call(source, "MIGRATE", "127.0.0.1", to_port, "", 0, 5000, *auth, "KEYS", *keys)
        others = [m.port for m in self.masters() if m.port not in (source, to_port)]
        for port in (to_port, source, *others):
            self.call(port, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)

        def agreed() -> bool:
            for port in self.alive_ports():
                owner = [m for m in self._masters_of(self.view(port)) if m.owns(slot)]
                if [m.port for m in owner] != [to_port] or not self._state_ok(port):
                    return False
            return True

        self._wait(f"slot {slot} moved to {to_port}", agreed, timeout)
        return time.monotonic() - started


# ================================================================================================
# Sentinel
# ================================================================================================


class SentinelDeployment(_Deployment):
    """A master, ``replicas`` replicas and ``sentinels`` sentinels monitoring it (quorum 2), with a
    short ``down-after-milliseconds`` and ``failover-timeout`` so a failover takes seconds.

    With ``acl``/``requirepass`` the data nodes are protected and the sentinels authenticate to
    them (``sentinel auth-user/auth-pass``); ``protect_sentinels=True`` protects the sentinels too,
    with the same user (its sentinel rule) and password, so one URL's credentials serve both."""

    kind = "sentinel"

    def __init__(
        self,
        service_name: str = "hubwire",
        *,
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        acl: AclUser | None = None,
        requirepass: str | None = None,
        protect_sentinels: bool = False,
        tls: bool = False,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(_Security.of(acl, requirepass), tls)
        self.service_name = service_name
        self.protect_sentinels = protect_sentinels
        with self._starting():
            ports = self._ports(1 + replicas + sentinels)
            self.data_ports = ports[: 1 + replicas]
            self.sentinel_ports = ports[1 + replicas :]
            master = ports[0]
            for i, port in enumerate(self.data_ports):
                follow = [] if i == 0 else [f"replicaof 127.0.0.1 {master}"]
                self._add(
                    f"{'master' if i == 0 else f'replica{i}'}-{port}",
                    port,
                    [*self._listen(port), *follow, *self.security.data_lines()],
                )
            for node in list(self._nodes.values()):
                self._start(node)
            # replicas linked before the sentinels start: a sentinel learns replicas from the
            # master's INFO, which it asks for at once and then only every 10 s
            self._wait("replicas linked", lambda: self._linked(master, replicas), timeout)
            for i, port in enumerate(self.sentinel_ports):
                self._add_sentinel(i, port, master, quorum, down_after_ms, failover_timeout_ms)
            for port in self.sentinel_ports:
                self._start(self._nodes[port])
            self._wait("sentinels know each other and the replicas", lambda: self._watching(master), timeout)

    def _add_sentinel(
        self, i: int, port: int, master: int, quorum: int, down_ms: int, failover_ms: int
    ) -> None:
        svc = self.service_name
        lines = [
            *self._listen(port),
            "sentinel resolve-hostnames no",
            f"sentinel monitor {svc} 127.0.0.1 {master} {quorum}",
            f"sentinel down-after-milliseconds {svc} {down_ms}",
            f"sentinel failover-timeout {svc} {failover_ms}",
            f"sentinel parallel-syncs {svc} 1",
            *self.security.sentinel_lines(svc, self.protect_sentinels),
        ]
        password = self.security.admin_password if self.protect_sentinels else None
        self._add(f"sentinel{i}-{port}", port, lines, sentinel=True, password=password)

    def _linked(self, master: int, replicas: int) -> bool:
        info = self.info(master, "replication")
        online = [v for k, v in info.items() if k.startswith("slave") and "state=online" in v]
        return len(online) == replicas

    def _watching(self, master: int) -> bool:
        replicas = len(self.data_ports) - 1
        for port in self.sentinel_ports:
            state = _pairs(self.call(port, "SENTINEL", "MASTER", self.service_name))
            if state["flags"] != "master" or int(state["port"]) != master:
                return False
            if (
                int(state["num-slaves"]) != replicas
                or int(state["num-other-sentinels"]) != len(self.sentinel_ports) - 1
            ):
                return False
            known = [_pairs(r) for r in self.call(port, "SENTINEL", "REPLICAS", self.service_name)]
            if any(r["flags"] != "slave" or r["master-link-status"] != "ok" for r in known):
                return False
        return True

    @property
    def url(self) -> str:
        """``redis+sentinel://[user:pw@]127.0.0.1:s1,...,127.0.0.1:s3/0/<service>`` (TLS: ``rediss+``)."""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        scheme = self._scheme("redis+sentinel")
        return f"{scheme}://{self.security.userinfo()}{hosts}/0/{self.service_name}{self._query()}"

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", p) for p in self.sentinel_ports]

    def sentinel_kwargs(self) -> dict[str, Any]:
        """redis-py ``sentinel_kwargs`` (credentials only if the sentinels are protected; TLS)."""
        kwargs = self.security.client_kwargs() if self.protect_sentinels else {}
        if self.certs is not None:
            kwargs |= self.certs.client_kwargs()
        return kwargs

    def _named_master(self, port: int) -> int:
        _host, master = self.call(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)
        return int(master)

    def master_port(self) -> int:
        """The master's port as the first live sentinel that answers names it."""
        last: Exception | None = None
        for port in self.alive_ports(sentinel=True):
            try:
                return self._named_master(port)
            except (redis.RedisError, OSError, ValueError) as exc:
                last = exc
        raise DeploymentError(f"no sentinel names a master ({last!r})\n{self.logs()}")

    def kill_master(self) -> int:
        """SIGKILL the current master; its port."""
        port = self.master_port()
        self._kill(port)
        return port

    def wait_promoted(self, old_port: int, timeout: float = 20.0) -> float:
        """Wait until every live sentinel names one other node master and that node reports role
        master; the seconds since :meth:`kill_master`."""

        def promoted() -> bool:
            named = {self._named_master(p) for p in self.alive_ports(sentinel=True)}
            if len(named) != 1 or old_port in named:
                return False
            return bool(self.call(named.pop(), "ROLE")[0] == "master")

        self._wait(f"a replica promoted in place of {old_port}", promoted, timeout)
        return time.monotonic() - self._killed_at[old_port]

    def restart(self, port: int, timeout: float = 20.0) -> float:
        """Start a killed data node again. A killed master comes back *as a master* (its config
        says so) until a sentinel tells it to replicate the new one, on its next INFO from the node
        (every 10 s, not configurable): ~10 s. Wait until it does and is linked; the seconds."""
        node = self._nodes[port]
        if node.alive or node.sentinel:
            raise DeploymentError(f"{port} is running or is a sentinel")
        started = time.monotonic()
        self._start(node)

        def following() -> bool:
            info = self.info(port, "replication")
            master = self.master_port()
            return (
                master != port
                and info.get("role") == "slave"
                and info.get("master_port") == str(master)
                and info.get("master_link_status") == "up"
            )

        self._wait(f"{port} back as a replica of the current master", following, timeout)
        return time.monotonic() - started
