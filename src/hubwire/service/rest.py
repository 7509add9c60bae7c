"""The serverless REST data plane of the hubwire service, shaped after Azure SignalR Service's.

An app server that holds no connections itself sends to a hub's clients and manages
their groups over HTTP. :class:`ServiceRestApi` is that API as an ASGI app over the
lifetime managers of the hubs the service hosts. Both API versions are served (an
``api-version`` query parameter is accepted and ignored):

- every client: ``POST /api/v1/hubs/{hub}``, ``POST /api/hubs/{hub}/:send``;
- a user's connections: ``POST /api/v1/hubs/{hub}/users/{user}``,
  ``POST /api/hubs/{hub}/users/{user}/:send``;
- one connection: ``POST /api/v1/hubs/{hub}/connections/{connectionId}``,
  ``POST /api/hubs/{hub}/connections/{connectionId}/:send``;
- a group: ``POST /api/v1/hubs/{hub}/groups/{group}``, ``POST /api/hubs/{hub}/groups/{group}/:send``;
- group membership: ``PUT`` (add) and ``DELETE`` (remove)
  ``/api/v1/hubs/{hub}/groups/{group}/connections/{connectionId}`` and
  ``/api/hubs/{hub}/groups/{group}/connections/{connectionId}``.

A send's body is JSON ``{"target": "<client method>", "arguments": [...]}`` (``arguments``
may be left out: none). Hub and group sends take ``excluded=<connection id>``, repeated, in
the query. What is answered, with a short text body:

- ``202`` a send was accepted (also to a hub nobody serves here: it is dropped, as the
  service drops sends to a hub without clients); a group change was made: ``202`` in v1,
  ``200`` in 2022-06-01 (what each version's swagger documents);
- ``400`` a body that is not JSON, a ``target`` missing, empty or not a string, ``arguments``
  not a list or not serializable by the hub's protocols (an integer past 64 bits for
  MessagePack), a malformed name, or a :class:`~hubwire.exceptions.HubException` of the
  manager (its text: e.g. a group name over the hub's limit);
- ``401`` (``WWW-Authenticate: Bearer``) no valid token; ``404`` no such path, or a group
  change on a hub nobody serves here; ``405`` (with ``Allow``) another method;
  ``413`` a body past ``max_body_size``.

**Authentication** (the Azure SignalR REST API's): ``Authorization: Bearer <JWT>``, HS256
signed with the access key, with ``exp``, and ``aud`` equal to the request's URL without
query or trailing slash: ``{scheme}://{Host header}{path}``, the path as the client sent it
(percent-encoded) or, when that is unambiguous, decoded, with or without the ``root_path``
of a mounted app. Scheme and host compare case-insensitively and a default port may be
left out; the path compares exactly. :func:`rest_token` mints such a token.

**Names**: path segments are percent-decoded (UTF-8), each on its own, so ``%2F`` is part
of a name. Hub names are case-insensitive, as the service's (it lowercases them) and as
hubwire's hub paths: ``manager_for`` is called with the name lower-cased, and a name must
start with a letter and hold only ASCII letters, digits and ``_``. With ``application=``
in the query the hub is ``{application}_{hub}`` (lower-cased), as the service names it.
User ids, connection ids and group names (1 to 1024 characters) are taken exactly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import msgspec

from ..exceptions import HubException
from ..http import BodyTooLarge, ClientGone, Receive, Scope, Send, read_body, respond
from ..hubs.lifetime import HubLifetimeManager
from ..protocol.messages import InvocationMessage

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "RestError",
    "RestRoute",
    "ServiceRestApi",
    "parse_route",
    "request_paths",
    "request_urls",
    "rest_token",
    "token_user",
]

log = logging.getLogger("hubwire.service")

#: the largest request body accepted by default (1 MiB)
DEFAULT_MAX_BODY_SIZE = 1 << 20
#: the longest group name the service takes
MAX_GROUP_NAME = 1024

Action = Literal["broadcast", "user", "connection", "group", "add_to_group", "remove_from_group"]
Version = Literal["v1", "2022-06-01"]

_HUB_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_SEND_ACTIONS = ("broadcast", "user", "connection", "group")

# (segments, {method: action}); "{...}" segments are names, the others literals (any case)
_ROUTES: tuple[tuple[tuple[str, ...], dict[str, Action]], ...] = (
    (("api", "v1", "hubs", "{hub}"), {"POST": "broadcast"}),
    (("api", "v1", "hubs", "{hub}", "users", "{user}"), {"POST": "user"}),
    (("api", "v1", "hubs", "{hub}", "connections", "{connection}"), {"POST": "connection"}),
    (("api", "v1", "hubs", "{hub}", "groups", "{group}"), {"POST": "group"}),
    (
        ("api", "v1", "hubs", "{hub}", "groups", "{group}", "connections", "{connection}"),
        {"PUT": "add_to_group", "DELETE": "remove_from_group"},
    ),
    (("api", "hubs", "{hub}", ":send"), {"POST": "broadcast"}),
    (("api", "hubs", "{hub}", "users", "{user}", ":send"), {"POST": "user"}),
    (("api", "hubs", "{hub}", "connections", "{connection}", ":send"), {"POST": "connection"}),
    (("api", "hubs", "{hub}", "groups", "{group}", ":send"), {"POST": "group"}),
    (
        ("api", "hubs", "{hub}", "groups", "{group}", "connections", "{connection}"),
        {"PUT": "add_to_group", "DELETE": "remove_from_group"},
    ),
)


class RestError(Exception):
    """A request refused with ``status`` and a short text (never anything the client sent)."""

    def __init__(self, status: int, text: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = list(headers)


@dataclass(frozen=True, slots=True)
class RestRoute:
    """What a request path asks for; names are percent-decoded, ``hub`` lower-cased."""

    action: Action
    version: Version
    hub: str
    user: str | None = None
    connection_id: str | None = None
    group: str | None = None


def _decode_segment(segment: str) -> str:
    try:
        return unquote(segment, errors="strict")
    except UnicodeDecodeError:
        raise RestError(400, "Malformed path: a segment is not UTF-8.") from None


def _match(segments: Sequence[str]) -> tuple[tuple[str, ...], dict[str, Action]] | None:
    for pattern, methods in _ROUTES:
        if len(pattern) != len(segments):
            continue
        if all(p[0] == "{" or p == s.lower() for p, s in zip(pattern, segments, strict=True)):
            return pattern, methods
    return None


def parse_route(method: str, path: str) -> RestRoute:
    """The route of ``method`` on ``path`` (percent-encoded, relative to the app's root).

    Raises :class:`RestError`: 404 for no such path, 405 for another method, 400 for a
    malformed name. Segments are split on ``/`` first, then each is decoded; one trailing
    slash is ignored; literal segments match in any case.
    """
    raw = path.split("/")
    if raw[0] == "":
        raw = raw[1:]
    if len(raw) > 1 and raw[-1] == "":
        raw = raw[:-1]
    segments = [_decode_segment(s) for s in raw]
    found = None if "" in segments else _match(segments)
    if found is None:
        raise RestError(404, "Not Found")
    pattern, methods = found
    action = methods.get(method.upper())
    if action is None:
        raise RestError(405, "Method Not Allowed", [("allow", ", ".join(methods))])
    names = {p[1:-1]: s for p, s in zip(pattern, segments, strict=True) if p[0] == "{"}
    hub = names["hub"]
    if not _HUB_NAME.fullmatch(hub):
        raise RestError(400, "Invalid hub name: a letter, then letters, digits or '_'.")
    group = names.get("group")
    if group is not None and len(group) > MAX_GROUP_NAME:
        raise RestError(400, f"Group names are limited to {MAX_GROUP_NAME} characters.")
    version: Version = "v1" if pattern[1] == "v1" else "2022-06-01"
    return RestRoute(action, version, hub.lower(), names.get("user"), names.get("connection"), group)


# -- tokens ----------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _audience(url: str) -> str:
    """A URL as an audience: no query, no fragment, no trailing slash."""
    parts = urlsplit(url)
    return parts._replace(query="", fragment="", path=parts.path.rstrip("/")).geturl()


def rest_token(access_key: str, url: str, lifetime: float = 3600, *, user: str | None = None) -> str:
    """A token for one REST request to ``url``: HS256 with ``access_key``, ``aud`` = ``url``
    without query or trailing slash, ``exp`` = now + ``lifetime`` s, ``nameid`` = ``user``.

    Minted with the standard library alone, so callers need no JWT package.
    """
    claims: dict[str, Any] = {"aud": _audience(url), "exp": int(time.time() + lifetime)}
    if user is not None:
        claims["nameid"] = user
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode("ascii")
    signature = hmac.new(access_key.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def token_user(claims: Mapping[str, Any]) -> str | None:
    """The user id a token carries: its ``nameid`` claim (None: none, or not a string)."""
    user = claims.get("nameid")
    return user if isinstance(user, str) else None


def _url_key(url: str) -> tuple[str, str, str] | None:
    """(scheme, host[:port], path) compared for audiences: scheme and host lower-cased, a
    default port dropped, no trailing slash; None for what is not an absolute URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if not scheme or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443), ("ws", 80), ("wss", 443)):
        host = f"{host}:{port}"
    return scheme, host, parts.path.rstrip("/")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _raw_path(scope: Scope) -> str | None:
    raw = scope.get("raw_path")
    if not isinstance(raw, bytes | bytearray):
        return None
    return bytes(raw).split(b"?", 1)[0].decode("latin-1")


def _relative_raw(raw: str, root: str) -> str:
    """``raw`` without as many leading segments as ``root`` has (the root path, encoded)."""
    depth = len([s for s in root.split("/") if s])
    return "/" + "/".join(raw.split("/")[depth + 1 :]) if depth else raw


def request_paths(scope: Scope) -> tuple[str, str | None]:
    """The request path relative to the app's root: (percent-encoded, decoded or None).

    The encoded one comes from ``raw_path`` when the server gives it (else it is the decoded
    path); the decoded one is None when decoding is ambiguous (an encoded ``/``).
    """
    path = str(scope.get("path", "/"))
    root = str(scope.get("root_path", ""))
    mounted = bool(root) and (path == root or path.startswith(root + "/"))
    relative = (path[len(root) :] or "/") if mounted else path
    raw = _raw_path(scope)
    if raw is None:  # the server gives no raw path: encode the decoded one back
        return quote(relative, safe="/"), relative
    encoded = _relative_raw(raw, root) if mounted else raw
    ambiguous = "%2f" in raw.lower()
    return encoded, None if ambiguous else relative


def request_urls(scope: Scope) -> list[str]:
    """The URLs a token's ``aud`` may name for this request (see the module's doc)."""
    scheme = str(scope.get("scheme", "http"))
    host = _header(scope, b"host")
    if host is None:
        server = scope.get("server")
        if not server:
            return []
        host = f"{server[0]}:{server[1]}"
    root = str(scope.get("root_path", ""))
    encoded, decoded = request_paths(scope)
    paths = {encoded, root + encoded}
    if decoded is not None:
        paths |= {decoded, root + decoded}
    return [f"{scheme}://{host}{p}" for p in sorted(paths)]


# -- the app -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Payload:
    target: str
    arguments: list[Any]


def _payload(body: bytes) -> _Payload:
    try:
        value = msgspec.json.decode(body)
    except Exception:  # DecodeError, ValidationError (numbers out of range), RecursionError
        raise RestError(400, "The body is not JSON.") from None
    if not isinstance(value, dict):
        raise RestError(400, 'The body must be a JSON object {"target": ..., "arguments": [...]}.')
    target = value.get("target")
    if not isinstance(target, str) or not target:
        raise RestError(400, "'target' must be a non-empty string.")
    arguments = value.get("arguments", [])
    if not isinstance(arguments, list):
        raise RestError(400, "'arguments' must be a list.")
    return _Payload(target, arguments)


def _check_serializable(manager: HubLifetimeManager, payload: _Payload) -> None:
    """Refuse arguments a protocol of the hub cannot write, before anyone gets anything."""
    message = InvocationMessage(payload.target, payload.arguments)
    for protocol in manager.protocols:
        try:
            protocol.write_message(message)
        except Exception:  # OverflowError (a MessagePack int past 64 bits), ...
            raise RestError(400, f"The arguments cannot be written as {protocol.name}.") from None


def _excluded(scope: Scope) -> tuple[str, ...]:
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    return tuple(v for k, v in parse_qsl(query, keep_blank_values=True) if k == "excluded" and v)


def _application(scope: Scope) -> str | None:
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    values = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "application"]
    if not values or not values[0]:
        return None
    if not _HUB_NAME.fullmatch(values[0]):
        raise RestError(400, "Invalid application name: a letter, then letters, digits or '_'.")
    return values[0].lower()


class ServiceRestApi:
    """The REST data plane as an ASGI app (see the module's doc for paths and answers).

    ``access_key``: the key tokens are signed with (HS256). ``manager_for``: a hub name
    (lower-cased) -> that hub's lifetime manager, or None for a hub not served here.
    ``max_body_size``: the largest request body taken, in bytes (413 past it).
    Needs PyJWT (the ``jwt`` extra) to check tokens.
    """

    def __init__(
        self,
        access_key: str,
        manager_for: Callable[[str], HubLifetimeManager | None],
        *,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        import jwt  # noqa: F401 - fail here, not on the first request, without PyJWT

        if not access_key:
            raise ValueError("access_key must not be empty")
        self._key = access_key
        self.manager_for = manager_for
        self.max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})  # refused: 403 before the upgrade
        elif kind == "lifespan":
            await _lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            route = parse_route(str(scope.get("method", "")), request_paths(scope)[0])
            self.authenticate(scope)
            status = await self._perform(route, scope, receive)
        except RestError as err:
            await respond(send, err.status, err.text.encode(), headers=err.headers)
            return
        except ClientGone:
            return
        except Exception:  # a manager's failure (the backplane, ...): the caller may retry
            log.exception("REST %s failed", scope.get("method"))
            await respond(send, 500, b"Internal Server Error")
            return
        await respond(send, status, b"Accepted" if status == 202 else b"OK")

    def authenticate(self, scope: Scope) -> dict[str, Any]:
        """The claims of the request's valid token; raises :class:`RestError` 401 otherwise."""
        challenge = [("www-authenticate", "Bearer")]
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RestError(401, "A bearer token is required.", challenge)
        import jwt  # only checking tokens needs PyJWT (rest_token does not)

        try:
            options: jwt.types.Options = {"require": ["exp"], "verify_aud": False}
            claims = jwt.decode(token.strip(), self._key, algorithms=["HS256"], options=options)
        except jwt.ExpiredSignatureError:
            raise RestError(401, "The token has expired.", challenge) from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise RestError(401, "The token is not valid.", challenge) from None
        if not isinstance(claims, dict) or not self._audience_ok(claims.get("aud"), scope):
            raise RestError(401, "The token's audience is not this request's URL.", challenge)
        return claims

    @staticmethod
    def _audience_ok(aud: object, scope: Scope) -> bool:
        named = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        wanted = {_url_key(url) for url in request_urls(scope)} - {None}
        return any(isinstance(a, str) and _url_key(a) in wanted for a in named)

    async def _perform(self, route: RestRoute, scope: Scope, receive: Receive) -> int:
        application = _application(scope)
        hub = f"{application}_{route.hub}" if application else route.hub
        if route.action in _SEND_ACTIONS:
            payload = _payload(await self._body(scope, receive))
            manager = self.manager_for(hub)
            if manager is not None:
                _check_serializable(manager, payload)
                await _guarded(self._send(manager, route, payload, _excluded(scope)))
            return 202
        manager = self.manager_for(hub)
        if manager is None:
            raise RestError(404, "No such hub.")
        assert route.group is not None and route.connection_id is not None
        if route.action == "add_to_group":
            await _guarded(manager.add_to_group(route.connection_id, route.group))
        else:
            await _guarded(manager.remove_from_group(route.connection_id, route.group))
        return 202 if route.version == "v1" else 200

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_body_size:
            raise RestError(413, "The body is too large.")
        try:
            return await read_body(receive, self.max_body_size)
        except BodyTooLarge:
            raise RestError(413, "The body is too large.") from None

    @staticmethod
    async def _send(
        manager: HubLifetimeManager, route: RestRoute, payload: _Payload, excluded: tuple[str, ...]
    ) -> None:
        target, args = payload.target, payload.arguments
        if route.action == "broadcast":
            await manager.send_all(target, args, excluded)
        elif route.action == "user":
            assert route.user is not None
            await manager.send_users((route.user,), target, args)
        elif route.action == "connection":
            assert route.connection_id is not None
            await manager.send_connections((route.connection_id,), target, args)
        else:
            assert route.group is not None
            await manager.send_groups((route.group,), target, args, excluded)


async def _guarded(operation: Awaitable[None]) -> None:
    """Await a manager's operation: a HubException is the client's 400."""
    try:
        await operation
    except HubException as exc:
        raise RestError(400, str(exc) or "Bad Request") from None


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop: acknowledge both (for a server running this app alone)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
