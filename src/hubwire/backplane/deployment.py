"""Which Redis deployment a backplane URL names, and how to reach each of its nodes.

One URL configures everything (README, Scaling out):

* ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS; redis-py's ``ssl_ca_certs``,
  ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``, ``ssl_check_hostname`` query options) and
  ``unix:///path/redis.sock[?db=N]``: one Redis (or a managed one behind one address);
* ``redis+sentinel://[user:password@]h1:26379,h2:26379[/db][/service_name]`` (``rediss+sentinel://``):
  the master that the sentinels name (python-socketio's convention; ``mymaster`` when no service
  name is given), followed through failovers;
* ``redis+cluster://[user:password@]h1:port[,h2:port...]`` (``rediss+cluster://``): a Redis Cluster,
  where the backplane uses sharded pub/sub (SPUBLISH / SSUBSCRIBE) so traffic spreads over shards.

Why redis-py underneath: URL parsing, TLS contexts, Sentinel's master discovery, the Cluster slot
map and keyed commands (MOVED / ASK, failovers) are easy to get subtly wrong, and redis-py gets them
right. The backplane's two hot paths (pipelined publishes and the subscriber's reads) run on
hubwire's own connections (:mod:`.resp`), opened with the same :class:`NodeSettings`:
``bench/redis_paths.py`` measures redis-py's pub/sub paths at several times their CPU cost.
"""

from __future__ import annotations

import functools
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import redis
import redis.cluster
import redis.sentinel
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import RedisSSLContext, parse_url
from redis.asyncio.sentinel import Sentinel
from redis.crc import key_slot
from redis.exceptions import RedisError

__all__ = [
    "BlockingDeployment",
    "Deployment",
    "NodeSettings",
    "blocking_deployment",
    "parse_deployment",
    "redact",
    "redact_text",
]

#: the TLS query options of redis-py's URLs, and their keyword arguments
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_SENTINEL_DEFAULT_SERVICE = "mymaster"
#: no CLIENT SETINFO on connect: a least-privilege user may not run it
_COMMON: dict[str, Any] = {"driver_info": None}


@dataclass(frozen=True, slots=True)
class _Flavour:
    """redis-py's client classes of one kind: asyncio (the backplane) or blocking (``hubwire.emitter``'s
    ``Emitter``, for processes without an event loop). One parser builds either, so a URL means the
    same to both."""

    redis: Any
    sentinel: Any
    cluster: Any
    cluster_node: Any


_ASYNCIO = _Flavour(Redis, Sentinel, RedisCluster, ClusterNode)


def _later(cls: Any) -> Callable[..., functools.partial[Any]]:
    """``cls(**kwargs)`` made later (:class:`BlockingDeployment`)."""
    return lambda **kwargs: functools.partial(cls, **kwargs)


_BLOCKING = _Flavour(
    redis.Redis, redis.sentinel.Sentinel, _later(redis.cluster.RedisCluster), redis.cluster.ClusterNode
)


_SECRET_QUERY = re.compile(r"((?:^|&)[^=&]*password[^=&]*=)[^&]*", re.IGNORECASE)


def redact(url: str) -> str:
    """``url`` with its passwords (userinfo, ``...password=`` options) replaced by ``***``.

    For every log line and error message that names a Redis URL.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hosts}" if ":" in userinfo else f"***@{hosts}"
    query = _SECRET_QUERY.sub(r"\1***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_text(text: str) -> str:
    """Redis URLs inside an error text (redis-py's errors may quote one) with their passwords redacted."""
    return re.sub(r"rediss?(?:\+\w+)?://\S+", lambda m: redact(m.group(0)), text)


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """How to open one data connection to one node: address, TLS, credentials, database."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    tls: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0

    @property
    def node(self) -> str:
        """The node's name in logs and in the bus's routing table."""
        return self.path or f"{self.host}:{self.port}"

    def at(self, host: str, port: int) -> NodeSettings:
        return replace(self, host=host, port=port, path=None)


def _tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    check = options.get("ssl_check_hostname")
    context = RedisSSLContext(
        keyfile=options.get("ssl_keyfile"),
        certfile=options.get("ssl_certfile"),
        cert_reqs=options.get("ssl_cert_reqs") or "required",
        ca_certs=options.get("ssl_ca_certs"),
        check_hostname=True if check is None else str(check).lower() not in ("0", "false", "no", "n", "f"),
    )
    return context.get()


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items() if v}


def _hosts(netloc: str, default_port: int, shown: str) -> list[tuple[str, int]]:
    hosts = []
    for item in netloc.rpartition("@")[2].split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep:
            host, port = item.strip(), str(default_port)
        host = host.strip("[]")
        if not host or not port.isdigit() or not _valid_host(host):
            raise ValueError(f"invalid host:port {item!r} in the Redis URL {shown}")
        hosts.append((host, int(port)))
    return hosts


def _valid_host(host: str) -> bool:
    """A name the resolver can take (a label over 63 characters fails only when connecting)."""
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


def _credentials(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    out: dict[str, Any] = {}
    if parts.username:
        out["username"] = unquote(parts.username)
    if parts.password:
        out["password"] = unquote(parts.password)
    return out


class Deployment:
    """A Redis deployment: where a channel's traffic goes, and keyed commands through redis-py."""

    #: "standalone", "sentinel" or "cluster"
    kind = "standalone"
    #: sharded pub/sub (SPUBLISH / SSUBSCRIBE) instead of PUBLISH / SUBSCRIBE
    sharded = False

    def __init__(self, url: str, settings: NodeSettings, client: Redis | RedisCluster) -> None:
        self.url = redact(url)
        self.settings = settings
        self.client = client

    async def refresh(self) -> tuple[bool, set[str]]:
        """Learn the deployment's current layout (the master, the slot map); a no-op for one Redis.

        Returns whether it changed since the last refresh, and the nodes that gained slots or
        became master (what is published there is held a moment: bus.py).
        """
        return True, set()

    def node_for(self, channel: bytes) -> NodeSettings:
        """The node whose connections carry ``channel``."""
        return self.settings

    def masters(self) -> list[NodeSettings]:
        """The nodes channels are routed to now."""
        return [self.settings]

    def nodes(self) -> set[str]:
        """The names of :meth:`masters`."""
        return {node.node for node in self.masters()}

    async def command(self, *args: Any) -> Any:
        """One keyed command, routed by redis-py (to the master; by slot on a cluster)."""
        return await self.client.execute_command(*args)

    async def aclose(self) -> None:
        await self.client.aclose()
        self._initialized = False


class SentinelDeployment(Deployment):
    kind = "sentinel"

    def __init__(self, url: str, settings: NodeSettings, sentinel: Sentinel, service: str) -> None:
        super().__init__(url, settings, sentinel.master_for(service, **_COMMON))
        self.sentinel = sentinel
        self.service = service
        self.master: NodeSettings | None = None

    async def refresh(self) -> tuple[bool, set[str]]:
        host, port = await self.sentinel.discover_master(self.service)
        master = self.settings.at(str(host), int(port))
        changed = self.master is None or master.node != self.master.node
        self.master = master
        return changed, {master.node} if changed else set()

    def node_for(self, channel: bytes) -> NodeSettings:
        if self.master is None:
            raise RedisError(f"no master of {self.service!r} known yet (sentinels at {self.url})")
        return self.master

    def masters(self) -> list[NodeSettings]:
        return [] if self.master is None else [self.master]

    async def aclose(self) -> None:
        await super().aclose()
        for client in self.sentinel.sentinels:
            await client.aclose()


class ClusterDeployment(Deployment):
    kind = "cluster"
    sharded = True

    def __init__(self, url: str, settings: NodeSettings, cluster: RedisCluster) -> None:
        super().__init__(url, settings, cluster)
        self.cluster = cluster
        self._owners: dict[int, NodeSettings] = {}
        self._initialized = False

    async def refresh(self) -> tuple[bool, set[str]]:
        if not self._initialized:  # the first time (or after aclose): the command table too
            await self.cluster.initialize()
            self._initialized = True
        else:
            await self.cluster.nodes_manager.initialize()
        before = self._owners
        owners: dict[int, NodeSettings] = {}
        known: dict[tuple[str, int], NodeSettings] = {}
        for slot, nodes in self.cluster.nodes_manager.slots_cache.items():
            if nodes:
                address = (nodes[0].host, int(nodes[0].port))
                if address not in known:
                    known[address] = self.settings.at(*address)
                owners[slot] = known[address]
        self._owners = owners
        gained = {
            node.node for slot, node in owners.items() if slot not in before or before[slot].node != node.node
        }
        return bool(gained) or len(owners) != len(before), gained

    def node_for(self, channel: bytes) -> NodeSettings:
        owner = self._owners.get(key_slot(channel))
        if owner is None:
            raise RedisError(f"slot {key_slot(channel)} is not served by any master of {self.url}")
        return owner

    def masters(self) -> list[NodeSettings]:
        return list({owner.node: owner for owner in self._owners.values()}.values())


def parse_deployment(url: str, *, connect_timeout: float = 2.0, command_timeout: float = 5.0) -> Deployment:
    """The deployment ``url`` names; ``ValueError`` (password redacted) for a URL that cannot work.

    Nothing is connected here: a bad URL fails at once, an unreachable deployment later, in the
    bus's own reconnect loop, with the URL in its log lines.
    """
    return _parse(url, connect_timeout, command_timeout, _ASYNCIO)


class BlockingDeployment:
    """redis-py's blocking client for a backplane URL, for processes without an event loop
    (``hubwire.emitter.Emitter``): ``redis.Redis`` (for Sentinel the master's, following failovers)
    or ``redis.cluster.RedisCluster``. ``sharded``: channels are published with SPUBLISH there, as
    the backplane's bus does (a cluster).

    The client is made on first use: redis-py's blocking cluster client connects in its
    constructor, and an emitter created at import time must not fail (or wait) there while Redis
    is away. Thread-safe, like redis-py's clients.
    """

    def __init__(self, deployment: Deployment) -> None:
        self.kind = deployment.kind
        self.sharded = deployment.sharded
        #: the URL with its password redacted
        self.url = deployment.url
        made: Any = deployment.client
        self._make: Callable[[], Any] | None = made if isinstance(made, functools.partial) else None
        self._client: Any = None if self._make is not None else made
        #: a Sentinel deployment's connections to the sentinels (closed with the client)
        self._sentinels: list[Any] = (
            list(deployment.sentinel.sentinels) if isinstance(deployment, SentinelDeployment) else []
        )
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None and self._make is not None:
                    self._client = self._make()
        return self._client

    def close(self) -> None:
        """Close the connections (a later call opens new ones)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                if self._make is not None:
                    self._client = None
            for sentinel in self._sentinels:
                sentinel.close()


def blocking_deployment(
    url: str, *, connect_timeout: float = 2.0, command_timeout: float = 5.0
) -> BlockingDeployment:
    """:func:`parse_deployment` with blocking clients: the same URLs, options and errors."""
    return BlockingDeployment(_parse(url, connect_timeout, command_timeout, _BLOCKING))


def _parse(url: str, connect_timeout: float, command_timeout: float, flavour: _Flavour) -> Deployment:
    shown = redact(url)
    scheme = urlsplit(url).scheme.lower()
    timeouts: dict[str, Any] = {"socket_connect_timeout": connect_timeout, "socket_timeout": command_timeout}
    try:
        if scheme in ("redis", "rediss", "unix"):
            return _standalone(url, shown, timeouts, flavour)
        if scheme in ("redis+sentinel", "rediss+sentinel"):
            return _sentinel(url, shown, scheme.startswith("rediss"), timeouts, flavour)
        if scheme in ("redis+cluster", "rediss+cluster"):
            return _cluster(url, shown, scheme.startswith("rediss"), timeouts, flavour)
    except ValueError:
        raise
    except (RedisError, TypeError, OSError, ssl.SSLError) as exc:
        raise ValueError(f"invalid Redis URL {shown}: {exc}") from None
    raise ValueError(
        f"unsupported Redis URL scheme {scheme!r} in {shown} (redis://, rediss://, unix://, "
        "redis+sentinel://, rediss+sentinel://, redis+cluster://, rediss+cluster://)"
    )


def _standalone(url: str, shown: str, timeouts: dict[str, Any], flavour: _Flavour) -> Deployment:
    try:
        params: dict[str, Any] = dict(parse_url(url))
    except ValueError as exc:
        raise ValueError(f"invalid Redis URL {shown}: {exc}") from None
    unknown = set(params) - {"host", "port", "path", "db", "username", "password", "connection_class"}
    unknown -= set(_TLS_OPTIONS)
    if unknown:
        raise ValueError(f"unsupported option(s) {', '.join(sorted(unknown))} in the Redis URL {shown}")
    if set(params) & set(_TLS_OPTIONS) and not url.lower().startswith("rediss:"):
        raise ValueError(f"TLS options in the Redis URL {shown} need the rediss:// scheme")
    if params.get("host") and not _valid_host(params["host"]):
        raise ValueError(f"invalid host {params['host']!r} in the Redis URL {shown}")
    if url.lower().startswith("unix:") and not params.get("path"):
        raise ValueError(f"the Redis URL {shown} names no socket path (unix:///path/redis.sock)")
    tls = _tls_context(params) if url.lower().startswith("rediss:") else None
    settings = NodeSettings(
        host=params.get("host") or "127.0.0.1",
        port=int(params.get("port") or 6379),
        path=params.get("path"),
        tls=tls,
        username=params.get("username"),
        password=params.get("password"),
        db=int(params.get("db") or 0),
    )
    client = flavour.redis.from_url(url, **timeouts, **_COMMON)
    return Deployment(url, settings, client)


def _tls_kwargs(url: str, tls: bool, shown: str) -> tuple[dict[str, Any], ssl.SSLContext | None]:
    query = _query(url)
    unknown = set(query) - set(_TLS_OPTIONS) - {"sentinel_username", "sentinel_password"}
    if unknown:
        raise ValueError(f"unsupported option(s) {', '.join(sorted(unknown))} in the Redis URL {shown}")
    options = {k: v for k, v in query.items() if k in _TLS_OPTIONS}
    if options and not tls:
        raise ValueError(f"TLS options in the Redis URL {shown} need the rediss+ scheme")
    if not tls:
        return {}, None
    kwargs: dict[str, Any] = {"ssl": True, **options}
    if "ssl_check_hostname" in kwargs:
        kwargs["ssl_check_hostname"] = kwargs["ssl_check_hostname"].lower() not in ("0", "false", "no")
    return kwargs, _tls_context(options)


def _sentinel(url: str, shown: str, tls: bool, timeouts: dict[str, Any], flavour: _Flavour) -> Deployment:
    parts = urlsplit(url)
    sentinels = _hosts(parts.netloc, 26379, shown)
    segments = [unquote(s) for s in parts.path.split("/")[1:]]
    db, service = 0, _SENTINEL_DEFAULT_SERVICE
    if segments and segments[0]:
        if not segments[0].isdigit():
            raise ValueError(f"the database in the Redis URL {shown} must be a number")
        db = int(segments[0])
    if len(segments) > 1 and segments[1]:
        service = segments[1]
    tls_kwargs, context = _tls_kwargs(url, tls, shown)
    credentials = _credentials(url)
    query = _query(url)
    sentinel_kwargs: dict[str, Any] = {**timeouts, **tls_kwargs}
    if "sentinel_password" in query:
        sentinel_kwargs["password"] = query["sentinel_password"]
        if "sentinel_username" in query:
            sentinel_kwargs["username"] = query["sentinel_username"]
    sentinel = flavour.sentinel(
        sentinels, sentinel_kwargs=sentinel_kwargs, db=db, **credentials, **timeouts, **tls_kwargs
    )
    settings = NodeSettings(
        tls=context, db=db, username=credentials.get("username"), password=credentials.get("password")
    )
    return SentinelDeployment(url, settings, sentinel, service)


def _cluster(url: str, shown: str, tls: bool, timeouts: dict[str, Any], flavour: _Flavour) -> Deployment:
    parts = urlsplit(url)
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"a Redis Cluster has only database 0; the URL {shown} names another")
    nodes = [flavour.cluster_node(host, port) for host, port in _hosts(parts.netloc, 6379, shown)]
    tls_kwargs, context = _tls_kwargs(url, tls, shown)
    credentials = _credentials(url)
    cluster = flavour.cluster(
        startup_nodes=nodes,
        require_full_coverage=False,
        **credentials,
        **timeouts,
        **tls_kwargs,
        **_COMMON,
    )
    settings = NodeSettings(
        tls=context, username=credentials.get("username"), password=credentials.get("password")
    )
    return ClusterDeployment(url, settings, cluster)
