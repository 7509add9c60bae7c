"""Tokens of the connection service, all HS256 JWTs signed with the shared access key.

Three kinds, told apart by their audience so that none can stand in for another:
an app server's link (``…/server/?hub=H``), a client sent to the service by an app
server's negotiate (``…/client/?hub=H``, carrying the user the app server
authenticated), and a REST call. A node behind a load balancer is known by several
host names, so the audience is checked on its path and hub only; the signature with
the access key is what authenticates.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from ..auth import bearer_token
from ..connections.connection import Principal, RequestInfo

__all__ = [
    "ALL_TRANSPORTS",
    "CLAIMS",
    "MIN_KEY_BYTES",
    "ClientAuthenticator",
    "check_access_key",
    "client_audience",
    "client_token",
    "client_url",
    "link_token",
    "require_pyjwt",
    "transports_path",
    "verify",
]

#: the claim carrying the app user's own claims (absent: the user is anonymous to the app)
CLAIMS = "hubwire.claims"
#: ASP.NET's short name of the user-id claim, as Azure SignalR Service puts it in client tokens
NAMEID = "nameid"


def require_pyjwt() -> None:
    """Fail at startup, in one line, when PyJWT is missing (not at the first token)."""
    if importlib.util.find_spec("jwt") is None:
        raise RuntimeError("the connection service needs PyJWT: pip install 'hubwire[service]'")


#: the shortest access key taken (RFC 7518: an HS256 key has at least 256 bits). Why: every client
#: is handed a token signed with it, so a short key can be guessed offline from any negotiate's
#: answer, and with it links (all clients' traffic) and any user's client token can be forged.
MIN_KEY_BYTES = 32


def check_access_key(access_key: str) -> str:
    """``access_key``, or ValueError when it is too short to sign with."""
    if len(access_key.encode()) < MIN_KEY_BYTES:
        raise ValueError(
            f"the connection service's access key must have at least {MIN_KEY_BYTES} bytes "
            "(every client gets a token signed with it; a short one can be guessed offline)"
        )
    return access_key


def _aud_suffix(kind: str, hub: str) -> str:
    return f"/{kind}/?hub={quote(hub, safe='')}"


def client_audience(base_url: str, hub: str) -> str:
    """A client token's audience: ``{base}/client/?hub={hub}``."""
    return base_url.rstrip("/") + _aud_suffix("client", hub)


_SHORT = {"WebSockets": "ws", "ServerSentEvents": "sse", "LongPolling": "lp"}
ALL_TRANSPORTS = tuple(_SHORT)


def transports_path(transports: Sequence[str]) -> str:
    """A node's client path for a hub path that offers only ``transports`` (``/client`` for all):
    negotiate there lists exactly those, and the others are refused, as on the app's own path."""
    if set(transports) >= set(ALL_TRANSPORTS):
        return "/client"
    return "/client/" + "-".join(_SHORT[t] for t in ALL_TRANSPORTS if t in transports)


def client_url(base_url: str, hub: str, transports: Sequence[str]) -> str:
    """Where a negotiating client is sent: the node's client path and the hub."""
    return base_url.rstrip("/") + transports_path(transports) + f"/?hub={quote(hub, safe='')}"


def link_token(access_key: str, node_url: str, hub: str, lifetime: float = 3600.0) -> str:
    """What an app server shows a node to open a link for ``hub``."""
    import jwt  # PyJWT (the ``service`` extra): imported where used, so ``import hubwire`` needs none

    now = int(time.time())
    aud = node_url.rstrip("/") + _aud_suffix("server", hub)
    return jwt.encode({"aud": aud, "iat": now, "exp": now + int(lifetime)}, access_key, "HS256")


def client_token(access_key: str, url: str, principal: Principal | None, lifetime: float = 3600.0) -> str:
    """What a client shows a node: the app server vouches for its user (or for an anonymous one),
    for ``lifetime`` seconds or until the user's own token (claim ``exp``) expires, if sooner."""
    import jwt

    now = int(time.time())
    claims: dict[str, Any] = {"aud": url, "iat": now, "exp": now + int(lifetime)}
    if principal is not None:
        claims[CLAIMS] = principal.claims
        if principal.identifier is not None:
            claims[NAMEID] = principal.identifier
        # never past the app's own token: a node authorizes every SSE / long-polling request
        # with this one, as the app server would have with the app's token
        app_exp = principal.claims.get("exp")
        if isinstance(app_exp, int | float) and not isinstance(app_exp, bool):
            claims["exp"] = min(claims["exp"], int(app_exp))
    return jwt.encode(claims, access_key, "HS256")


def verify(access_key: str, token: str, kind: str, hub: str) -> dict[str, Any] | None:
    """The claims of a valid, unexpired token of ``kind`` ("server" or "client") for ``hub``."""
    import jwt

    try:
        claims = jwt.decode(
            token, access_key, algorithms=["HS256"], options={"verify_aud": False, "require": ["exp"]}
        )
    except jwt.PyJWTError:
        return None
    aud = claims.get("aud") if isinstance(claims, dict) else None
    if not isinstance(aud, str) or not aud.endswith(_aud_suffix(kind, hub)):
        return None
    return claims


class ClientAuthenticator:
    """A node's authenticator: the token an app server's negotiate gave the client.

    Every client of a node has a principal (anonymous app users too: the app server
    vouched for them); ``claims[CLAIMS]`` is absent for those.
    """

    challenge = "Bearer"

    def __init__(self, access_key: str) -> None:
        self.access_key = check_access_key(access_key)

    def __call__(self, request: RequestInfo) -> Principal | None:
        token = bearer_token(request)
        hub = request.query_param("hub")
        if token is None or not hub:
            return None
        claims = verify(self.access_key, token, "client", hub)
        if claims is None:
            return None
        user = claims.get(NAMEID)
        return Principal(user if isinstance(user, str) else None, claims)
