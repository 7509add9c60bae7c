"""``hubwire`` command: run an app (``hubwire run module:attr``), the demo (``hubwire demo``), send to
a hub's clients from a shell (``hubwire emit``), look at a running cluster (``hubwire inspect``), or
write typed TypeScript clients for an app's hubs (``hubwire typescript module:attr``)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from .server.gctune import DEFAULT_GC_THRESHOLD, parse_gc_threshold

__all__ = ["load_app", "main"]


def load_app(spec: str) -> Any:
    """Import ``module:attribute`` (attribute may be dotted); a callable factory is called."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"expected module:attribute, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _run(args: argparse.Namespace) -> None:
    import uvicorn

    from .server.serving import HubwireServer

    if args.redis:
        os.environ["HUBWIRE_REDIS_URL"] = args.redis
    if args.service:
        os.environ["HUBWIRE_SERVICE_URLS"] = args.service
        if args.access_key:
            os.environ["HUBWIRE_SERVICE_ACCESS_KEY"] = args.access_key
        if not os.environ.get("HUBWIRE_SERVICE_ACCESS_KEY"):
            raise SystemExit("hubwire: --service needs --access-key (or HUBWIRE_SERVICE_ACCESS_KEY)")
    if args.channel_prefix:
        os.environ["HUBWIRE_CHANNEL_PREFIX"] = args.channel_prefix
    if args.detailed_errors:
        os.environ["HUBWIRE_DETAILED_ERRORS"] = "1"
    if args.require_redis:
        os.environ["HUBWIRE_REQUIRE_REDIS"] = "1"
    if args.drain_timeout is not None:
        if args.drain_timeout < 0:
            raise SystemExit("hubwire: --drain-timeout must not be negative")
        os.environ["HUBWIRE_DRAIN_TIMEOUT"] = str(args.drain_timeout)
    gc_threshold = args.gc_threshold or os.environ.get("HUBWIRE_GC_THRESHOLD") or DEFAULT_GC_THRESHOLD
    try:
        parse_gc_threshold(gc_threshold)
    except ValueError as exc:
        source = "--gc-threshold" if args.gc_threshold else "HUBWIRE_GC_THRESHOLD"
        raise SystemExit(f"hubwire: {source}: {exc}") from None
    os.environ["HUBWIRE_GC_THRESHOLD"] = gc_threshold
    source = "--redis" if args.redis else "HUBWIRE_REDIS_URL"
    _check_redis_url(os.environ.get("HUBWIRE_REDIS_URL"), source)
    if args.require_redis and not os.environ.get("HUBWIRE_REDIS_URL"):
        raise SystemExit("hubwire: --require-redis needs a Redis URL: pass --redis or set HUBWIRE_REDIS_URL")
    if args.workers < 1:
        raise SystemExit("hubwire: --workers must be at least 1")
    if args.workers > 1 and args.reload:
        raise SystemExit("hubwire: --reload runs one process; it cannot be combined with --workers")
    # loaded here even when workers load it again: a broken app stops with its error once, and
    # the checks below need it
    app = load_app(args.app)
    if callable(app) and getattr(args, "factory", False):
        app = app()
    if args.workers > 1:
        _check_workers(args.workers)
    options: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "ws_per_message_deflate": False,  # per-socket compression would undo serialize-once broadcasts
        "ws": _ws_protocol(args.serving),
        "ws_max_size": _ws_max_size(app),
        "lifespan": "on",
        "proxy_headers": args.proxy_headers,
        "forwarded_allow_ips": args.forwarded_allow_ips,
        "root_path": args.root_path,
        "ssl_keyfile": args.ssl_keyfile,
        "ssl_certfile": args.ssl_certfile,
        **_log_config(args.log_format, args.log_level),
    }
    if args.workers == 1 and not args.reload:
        server = HubwireServer(uvicorn.Config(app, **options))
        server.run()
        if not server.started:
            raise SystemExit(3)  # as uvicorn: startup failed (its log says why)
        return
    # each worker process (or the reloaded one) imports the app itself: uvicorn needs the import string
    from uvicorn.supervisors import ChangeReload, Multiprocess

    config = uvicorn.Config(
        args.app, workers=args.workers, reload=args.reload, factory=args.factory, **options
    )
    sock = config.bind_socket()
    if config.should_reload:
        ChangeReload(config, target=HubwireServer(config).run, sockets=[sock]).run()
    else:
        Multiprocess(config, sockets=[sock]).run()


def _check_workers(workers: int) -> None:
    """``--workers N`` runs N instances: each must reach the others through a shared backplane.

    Why refuse: with the in-memory backplane each worker only knows its own clients, so a
    broadcast would reach a random 1/N of them and a client's next request (long polling, a
    resume) would land on a worker that never heard of it.
    """
    import gc

    from .backplane.base import InMemoryBackplane
    from .server import HubServer

    servers = [obj for obj in gc.get_objects() if isinstance(obj, HubServer)]
    if any(isinstance(server.backplane, InMemoryBackplane) for server in servers):
        raise SystemExit(
            f"hubwire: --workers {workers} needs a shared backplane: with the in-memory one each worker "
            "would only reach its own clients (a broadcast reaches some, a client's next request lands "
            "on a worker that does not know it). Pass --redis URL (or set HUBWIRE_REDIS_URL), "
            "or run one worker."
        )


def _check_redis_url(url: str | None, source: str) -> None:
    """A Redis URL that cannot work stops the server here, with one line naming it (password
    redacted) and where it came from (``source``), instead of a traceback from inside the app's import."""
    if not url:
        return
    from .backplane.deployment import parse_deployment

    try:
        parse_deployment(url)
    except ValueError as exc:
        raise SystemExit(f"hubwire: {source}: {exc}") from None


def _ws_max_size(app: Any) -> int:
    """The largest WebSocket message uvicorn buffers (ASGI serving mode; native mode bounds frames
    per hub itself): four of the hubs' largest message, as native mode does, instead of uvicorn's
    16 MiB for any client. Other WebSocket routes of a wrapped app get the same bound."""
    from .server import HubServer

    default = 16 * 1024 * 1024
    if not isinstance(app, HubServer):
        return default
    sizes = [endpoint.max_receive_size() for endpoint in app.router.endpoints()]
    if not sizes or None in sizes:
        return default
    return max(max(4 * size, 64 * 1024) for size in sizes if size is not None)


def _log_config(fmt: str, level: str) -> dict[str, Any]:
    """``json``: every record (uvicorn's and hubwire's) as one JSON line; ``text``: uvicorn's default,
    with hubwire's records at ``--log-level`` too (without a handler of their own only warnings would
    show, and a developer asking for debug would still not see why a call failed)."""
    handler = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    if fmt != "json":
        import copy

        from uvicorn.config import LOGGING_CONFIG

        text_config = copy.deepcopy(LOGGING_CONFIG)
        text_config["loggers"]["hubwire"] = handler
        return {"log_config": text_config}
    return {
        "log_config": {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"json": {"()": "hubwire.logs.JsonFormatter"}},
            "handlers": {
                "default": {
                    "class": "logging.StreamHandler",
                    "formatter": "json",
                    "stream": "ext://sys.stderr",
                }
            },
            "loggers": {"uvicorn": handler, "uvicorn.access": handler, "hubwire": handler},
        }
    }


def _ws_protocol(serving: str) -> Any:
    """``native``: hubwire's direct-write WebSocket protocol; ``asgi``: uvicorn's own (request-checked)."""
    from .transports.native import CheckedWebSocketProtocol, NativeWebSocketProtocol

    return CheckedWebSocketProtocol if serving == "asgi" else NativeWebSocketProtocol


def _demo_imports() -> None:
    """Make the repository's ``examples`` importable when the demo runs from elsewhere (editable install)."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "examples" / "blog").is_dir() and str(repo) not in sys.path:
        sys.path.append(str(repo))


def _load_demo(spec: str) -> Any:
    """Load part of the blog demo, or stop with one line saying what is missing.

    Why: the demo is the repository's ``examples/blog`` (an app with its own dependencies, not part
    of the library), so an installed wheel does not contain it; without this, ``hubwire demo``
    after ``pip install hubwire`` would end in a ModuleNotFoundError traceback.
    """
    try:
        return load_app(spec)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing.partition(".")[0] == "examples":
            raise SystemExit(
                "hubwire demo: the blog demo is in the examples/ folder of a hubwire source checkout, "
                "which an installed wheel does not contain; run it from a checkout with `./run demo` "
                "(or `pip install -e '.[demo]'` there, then `hubwire demo`)"
            ) from None
        raise SystemExit(
            f"hubwire demo: the blog demo needs {missing!r}, which is not installed: "
            "pip install 'hubwire[demo]' (from a source checkout: pip install -e '.[demo]')"
        ) from None


def _demo(args: argparse.Namespace) -> None:
    """The blog demo: one in-memory instance, or ``--instances N`` on Redis behind a round-robin front."""
    _demo_imports()
    if args.instances > 1:
        cluster_main = _load_demo("examples.blog.cluster:main")
        argv = ["--instances", str(args.instances), "--host", args.host, "--port", str(args.port)]
        if args.redis:
            argv += ["--redis", args.redis]
        if args.channel_prefix:
            argv += ["--channel-prefix", args.channel_prefix]
        cluster_main(argv)
        return
    import uvicorn

    if args.redis:
        os.environ["HUBWIRE_REDIS_URL"] = args.redis
        os.environ["HUBWIRE_CHANNEL_PREFIX"] = args.channel_prefix or "BlogApp:SignalR:"
    app = _load_demo(args.app)
    where = "Redis " + args.redis if args.redis else "in memory"
    print(f"hubwire demo on http://{args.host}:{args.port}  ({where}; Ctrl+C to stop)", flush=True)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        ws_per_message_deflate=False,
        ws=_ws_protocol("native"),
    )


def _emit(args: argparse.Namespace) -> None:
    """Send one message through the servers' Redis (:class:`hubwire.emitter.Emitter`): no event loop,
    nothing subscribed. Bad input exits 2, Redis unreachable 1, each with one line (password redacted)."""
    from redis.exceptions import RedisError

    from .backplane.deployment import redact_text
    from .emitter import Emitter

    def fail(code: int, text: str) -> None:
        print(f"hubwire emit: {text}", file=sys.stderr)
        raise SystemExit(code)

    values = []
    for i, text in enumerate(args.args, 1):
        try:
            values.append(json.loads(text))
        except ValueError as exc:
            shown = text if len(text) <= 60 else text[:57] + "..."
            fail(2, f"argument {i} is not JSON ({exc}): {shown!r} (a string is written '\"text\"')")
    if not args.redis:
        fail(2, "no Redis URL: pass --redis or set HUBWIRE_REDIS_URL")
    try:
        emitter = Emitter(args.redis, args.channel_prefix, hub=args.hub)
    except ValueError as exc:
        fail(2, str(exc))
    if args.all:
        target, what = emitter.all, "all"
    elif args.group is not None:
        target, what = emitter.group(args.group), f"group {args.group!r}"
    elif args.user is not None:
        target, what = emitter.user(args.user), f"user {args.user!r}"
    else:
        target, what = emitter.client(args.client), f"connection {args.client!r}"
    try:
        with emitter:
            receivers = target.send(args.method, *values)
    except RedisError as exc:
        # redis-py appends its client's repr to some errors (no master found): the words before it
        reason = redact_text(str(exc)).split(" : <", 1)[0] or type(exc).__name__
        fail(1, f"cannot publish through Redis at {emitter.url}: {reason}")
    except (TypeError, ValueError) as exc:
        fail(2, str(exc))
    print(f"sent {args.method} to {what}: {receivers} server subscription(s) took it")


def _emit_parser(sub: Any) -> None:
    emit = sub.add_parser(
        "emit",
        help="send a message to a hub's clients through the servers' Redis backplane",
        description="Send METHOD(ARG...) to clients of every instance, as hub_context(...).clients would.",
    )
    emit.add_argument(
        "--redis",
        default=os.environ.get("HUBWIRE_REDIS_URL"),
        help="the servers' Redis URL (HUBWIRE_REDIS_URL)",
    )
    emit.add_argument(
        "--channel-prefix",
        default=os.environ.get("HUBWIRE_CHANNEL_PREFIX", ""),
        help="the servers' channel prefix (HUBWIRE_CHANNEL_PREFIX)",
    )
    emit.add_argument(
        "--hub", required=True, help="the hub's backplane name (add_hub's name=, else its class name)"
    )
    to = emit.add_mutually_exclusive_group(required=True)
    to.add_argument("--all", action="store_true", help="every connection")
    to.add_argument("--group", help="members of a group")
    to.add_argument("--user", help="every connection of a user")
    to.add_argument("--client", metavar="ID", help="one connection")
    emit.add_argument("method", metavar="METHOD", help="the client method to call")
    emit.add_argument("args", metavar="JSON_ARG", nargs="*", help="its arguments, each a JSON value")
    emit.set_defaults(func=_emit)


# -- hubwire typescript ----------------------------------------------------------------------------


def _add_typescript(sub: Any) -> None:
    ts = sub.add_parser(
        "typescript",
        help="write typed TypeScript clients (over @microsoft/signalr) for an app's hubs",
        description="One class per hub with a typed method per hub method and typed handlers for the "
        "client methods the hub declares (Hub.client_methods), from the Python type hints.",
    )
    ts.add_argument("app", help="module:attribute of a HubServer (or of one Hub class)")
    ts.add_argument("--out", help="the .ts file to write (default: standard output)")
    ts.add_argument("--hub", action="append", help="only this hub class (repeat for more)")
    ts.set_defaults(func=_typescript)


def _typescript(args: argparse.Namespace) -> None:
    """Hubs of hubwire's own pages (the dashboard) are left out: they are not the app's API."""
    from .hubs import Hub, HubConnectionHandler
    from .hubs.typescript import TypeScriptError, generate
    from .server import HubServer

    target = load_app(args.app)
    hubs: dict[type[Hub], list[str]] = {}
    if isinstance(target, type) and issubclass(target, Hub):
        hubs[target] = []
    elif isinstance(target, HubServer):
        for path, endpoint in target.router.items():
            if isinstance(endpoint, HubConnectionHandler) and not endpoint.hub_cls.__module__.startswith(
                "hubwire."
            ):
                hubs.setdefault(endpoint.hub_cls, []).append(path)
    else:
        raise SystemExit(f"hubwire typescript: {args.app} is a {type(target).__name__}, not a HubServer")
    if args.hub:
        unknown = set(args.hub) - {h.__name__ for h in hubs}
        if unknown:
            raise SystemExit(f"hubwire typescript: no hub {sorted(unknown)} in {args.app}")
        hubs = {h: paths for h, paths in hubs.items() if h.__name__ in args.hub}
    try:
        text = generate(list(hubs.items()))
    except TypeScriptError as exc:
        raise SystemExit(f"hubwire typescript: {exc}") from None
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)


# -- hubwire inspect ---------------------------------------------------------------------------------


def _add_inspect(sub: Any) -> None:
    inspect = sub.add_parser(
        "inspect",
        help="list a cluster's live instances, or the connections of a group, a user or one id",
        description="Ask every live instance of a cluster over Redis (instances without a lease are "
        "dead and left out; live ones that do not answer in time are named). Shows connection ids, "
        "users, groups and transports, never tokens. Exit status 1 when Redis cannot be reached or "
        "--connection finds nothing.",
    )
    inspect.add_argument("--redis", default=os.environ.get("HUBWIRE_REDIS_URL"), help="Redis URL")
    inspect.add_argument("--channel-prefix", default=os.environ.get("HUBWIRE_CHANNEL_PREFIX", ""))
    target = inspect.add_mutually_exclusive_group()
    target.add_argument("--group", help="the group's connections on every instance")
    target.add_argument("--user", help="the user's connections on every instance")
    target.add_argument("--connection", help="one connection, with its groups")
    inspect.add_argument("--hub", help="only this hub (its backplane name) for --group / --user")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for answers")
    inspect.set_defaults(func=_inspect)


def _inspect(args: argparse.Namespace) -> None:
    import json
    import logging

    if not args.redis:
        raise SystemExit("hubwire inspect: --redis (or HUBWIRE_REDIS_URL) is required")
    _check_redis_url(args.redis, "--redis / HUBWIRE_REDIS_URL")
    logging.basicConfig(level=logging.ERROR, format="hubwire inspect: %(message)s")
    try:
        report, found = asyncio.run(_inspect_cluster(args))
    except Exception as exc:  # Redis unreachable or refusing: one line, no traceback
        raise SystemExit(f"hubwire inspect: {exc}") from None
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_inspect_text(args, report))
    if not found:
        raise SystemExit(1)


async def _inspect_cluster(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """What was asked, as JSON-able data; False when ``--connection`` found nothing."""
    import msgspec

    from .backplane.inspect import ClusterInspector

    async with ClusterInspector(args.redis, args.channel_prefix, timeout=args.timeout) as cluster:
        if args.group is not None or args.user is not None or args.connection is not None:
            if args.connection is not None:
                result = await cluster.connection(args.connection)
            elif args.group is not None:
                result = await cluster.group(args.group, args.hub)
            else:
                result = await cluster.user(args.user, args.hub)
            report = {
                "connections": msgspec.to_builtins(list(result)),
                "missing": list(result.missing),
                "truncated": result.truncated,
            }
            return report, args.connection is None or len(result) > 0
        instances = await cluster.instances()
    missing = [i.name for i in instances if i.info is None]
    return {"instances": msgspec.to_builtins(instances), "missing": missing}, True


def _inspect_text(args: argparse.Namespace, report: dict[str, Any]) -> str:
    lines: list[str] = []
    if "instances" in report:
        lines += _instances_text(report["instances"], args.channel_prefix)
    else:
        rows = [
            [c["connection_id"], c["user"] or "-", c["transport"] or "-", c["hub"], c["instance"]]
            for c in report["connections"]
        ]
        lines += _table(["CONNECTION", "USER", "TRANSPORT", "HUB", "INSTANCE"], rows)
        if args.connection is not None:
            for c in report["connections"]:
                lines += [f"protocol: {c['protocol']}", f"groups: {', '.join(c['groups'] or []) or '-'}"]
            where = f"connection {args.connection!r}"
        else:
            where = f"group {args.group!r}" if args.group is not None else f"user {args.user!r}"
        lines.append(f"{len(rows)} connection{'s' if len(rows) != 1 else ''} of {where}")
        if report["truncated"]:
            lines.append("truncated: an instance had more than fits in one answer")
    if report["missing"]:
        lines.append(f"no answer within {args.timeout:g}s from: {', '.join(report['missing'])}")
    return "\n".join(lines)


def _instances_text(instances: list[dict[str, Any]], prefix: str) -> list[str]:
    import time

    now = time.time()
    rows, per_hub = [], []
    for item in instances:
        info = item["info"]
        if info is None:
            rows.append([item["name"], "-", _when(item["started"], now), "-", "no answer", "-", "-", "-"])
            continue
        backplane = info["backplane"] or {}
        rows.append(
            [
                item["name"],
                info["address"] or "-",
                _when(info["started"], now),
                info["version"],
                backplane.get("state", "in-memory"),
                str(backplane.get("buffered", "-")),
                str(backplane.get("subscriptions", "-")),
                str(sum(c["connections"] for c in info["connections"])),
            ]
        )
        per_hub += [
            [item["name"], c["hub"], c["transport"], str(c["connections"])] for c in info["connections"]
        ]
    header = [
        "INSTANCE",
        "ADDRESS",
        "STARTED",
        "VERSION",
        "BACKPLANE",
        "BUFFERED",
        "SUBSCRIPTIONS",
        "CONNECTIONS",
    ]
    lines = [f"{len(instances)} live instance{'s' if len(instances) != 1 else ''} (prefix {prefix!r})", ""]
    lines += _table(header, rows)
    if per_hub:
        lines += ["", *_table(["INSTANCE", "HUB", "TRANSPORT", "CONNECTIONS"], per_hub)]
    return lines


def _when(started: float | None, now: float) -> str:
    import time

    if started is None:
        return "-"
    up = max(0, int(now - started))
    ago = f"{up // 86400}d{up % 86400 // 3600}h" if up >= 86400 else f"{up // 3600}h{up % 3600 // 60:02d}m"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) + f" ({ago} ago)"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _add_run(sub: Any) -> None:
    run = sub.add_parser("run", help="serve an ASGI app or HubServer with uvicorn")
    run.add_argument("app", help="module:attribute of a HubServer or ASGI app")
    run.add_argument("--factory", action="store_true", help="the attribute is a factory to call")
    run.add_argument(
        "--service",
        help="run the hubs for a connection service: its node URLs, comma-separated (clients are sent "
        "there by negotiate; sets HUBWIRE_SERVICE_URLS)",
    )
    _access_key_option(run)
    _serve_options(run)
    run.set_defaults(func=_run)
    svc = sub.add_parser(
        "service", help="serve a connection-service node: it holds clients, app servers run the hubs"
    )
    _access_key_option(svc)
    svc.add_argument(
        "--serverless",
        action="store_true",
        help="serve clients of hubs no app server runs, listen-only (REST sends reach them; sets "
        "HUBWIRE_SERVICE_SERVERLESS=1)",
    )
    _serve_options(svc)
    svc.set_defaults(func=_service, app="hubwire.server.service_node:from_env", factory=True, service=None)


def _access_key_option(parser: Any) -> None:
    parser.add_argument(
        "--access-key",
        help="the connection service's shared secret (sets HUBWIRE_SERVICE_ACCESS_KEY; keep it out of "
        "shell history: prefer the variable)",
    )


def _service(args: argparse.Namespace) -> None:
    if args.workers > 1:
        # app servers link to every node; workers sharing one port cannot each be reached
        raise SystemExit(
            "hubwire service: --workers is not for nodes (an app server must link to each node, and "
            "workers share one port): run more nodes on their own ports instead"
        )
    if args.serverless:
        os.environ["HUBWIRE_SERVICE_SERVERLESS"] = "1"
    if args.access_key:
        os.environ["HUBWIRE_SERVICE_ACCESS_KEY"] = args.access_key
    if not os.environ.get("HUBWIRE_SERVICE_ACCESS_KEY"):
        raise SystemExit("hubwire service: pass --access-key or set HUBWIRE_SERVICE_ACCESS_KEY")
    _run(args)


def _serve_options(run: Any) -> None:
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--redis", help="Redis URL for the backplane (sets HUBWIRE_REDIS_URL)")
    run.add_argument("--channel-prefix", help="backplane channel prefix (sets HUBWIRE_CHANNEL_PREFIX)")
    run.add_argument(
        "--detailed-errors",
        action="store_true",
        help="tell clients why a call failed (exception, which argument did not bind); development only "
        "(sets HUBWIRE_DETAILED_ERRORS; the app's HubOptions(enable_detailed_errors=...) wins)",
    )
    run.add_argument(
        "--require-redis",
        action="store_true",
        help="refuse to start while Redis cannot be reached (sets HUBWIRE_REQUIRE_REDIS); without it an "
        "instance starts alone and retries",
    )
    run.add_argument("--log-level", default="info")
    run.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("HUBWIRE_LOG_FORMAT", "text"),
        help="json: one JSON object per line, with connection ids (never tokens)",
    )
    run.add_argument(
        "--serving",
        choices=("native", "asgi"),
        default=os.environ.get("HUBWIRE_SERVING", "native"),
        help="native: WebSocket frames written directly (default); asgi: plain ASGI sends",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("HUBWIRE_WORKERS", "1")),
        help="processes serving the port, each an instance over the backplane (needs --redis)",
    )
    run.add_argument(
        "--drain-timeout",
        type=float,
        help="seconds a graceful shutdown (SIGTERM) waits for running calls and for stateful "
        "connections to resume elsewhere (default 10; sets HUBWIRE_DRAIN_TIMEOUT)",
    )
    run.add_argument(
        "--proxy-headers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="take the client address and scheme from X-Forwarded-For / X-Forwarded-Proto of trusted "
        "proxies (as uvicorn; WebSockets served natively too)",
    )
    run.add_argument(
        "--forwarded-allow-ips",
        help="proxies trusted for --proxy-headers: comma-separated IPs or networks, '*' for all "
        "(default: $FORWARDED_ALLOW_IPS or 127.0.0.1)",
    )
    run.add_argument(
        "--gc-threshold",
        help="the garbage collector's thresholds G0,G1,G2 in each serving process, or 'python' for "
        f"Python's own (default: $HUBWIRE_GC_THRESHOLD, else {DEFAULT_GC_THRESHOLD}: fewer full "
        "collections of a large connection graph; sets HUBWIRE_GC_THRESHOLD)",
    )
    run.add_argument("--root-path", default="", help="the path prefix a proxy strips (ASGI root_path)")
    run.add_argument("--ssl-keyfile", help="TLS private key file (serve https / wss)")
    run.add_argument("--ssl-certfile", help="TLS certificate file")
    run.add_argument("--reload", action="store_true", help="restart when a source file changes (development)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hubwire", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    demo = sub.add_parser(
        "demo", help="serve the blog demo (in memory; --instances 3: three instances on Redis behind a front)"
    )
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument(
        "--instances", type=int, default=1, help="N > 1: N instances sharing Redis behind a round-robin front"
    )
    demo.add_argument("--redis", help="Redis URL (default with --instances: a private redis-server)")
    demo.add_argument("--channel-prefix", help="backplane channel prefix (default BlogApp:SignalR:)")
    demo.add_argument("--app", default="examples.blog.app:app", help=argparse.SUPPRESS)
    demo.set_defaults(func=_demo)
    _emit_parser(sub)
    _add_inspect(sub)
    _add_typescript(sub)
    args = parser.parse_args(_dashed_ids(sys.argv[1:] if argv is None else argv, parser))
    args.func(args)


#: options whose value is a connection id, a user or a group: names that may begin with '-'
_NAME_OPTIONS = frozenset(("--connection", "--client", "--user", "--group"))


def _dashed_ids(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--client -x1`` as ``--client=-x1``: connection ids are base64url and may begin with '-',
    which argparse would take for an option. A following word that is one of hubwire's own
    options stays an option (so a forgotten value still gets argparse's error)."""
    known = _option_strings(parser)
    out: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        following = argv[i + 1] if i + 1 < len(argv) else None
        dashed = following is not None and following.startswith("-") and following not in known
        if word in _NAME_OPTIONS and dashed:
            out.append(f"{word}={following}")
            i += 2
            continue
        out.append(word)
        i += 1
    return out


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found: set[str] = set()
    for action in parser._actions:  # argparse keeps no public list of them
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


if __name__ == "__main__":  # pragma: no cover
    main()
