"""Browser origins: CORS headers and preflights for hub paths, and the ``allowed_origins`` check."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from ..connections.connection import RequestInfo
from ..http import Send, respond

__all__ = ["CorsPolicy", "OriginPredicate", "origin_allowed"]

log = logging.getLogger("hubwire.server")

#: answered to a CORS preflight on hub paths
_CORS_METHODS = "GET, POST, DELETE, OPTIONS"


def origin_allowed(allowed: Sequence[str] | None, request: RequestInfo) -> bool:
    """False when ``allowed`` is set and a browser request (one with ``Origin``) comes from elsewhere."""
    origin = request.header("origin")
    if allowed is None or origin is None:
        return True
    normalized = origin.strip().rstrip("/").lower()
    if "*" in allowed or any(normalized == a.rstrip("/").lower() for a in allowed):
        return True
    log.info("refused a request from origin %r on %s", origin[:200], request.path)
    return False


#: an explicit origin check (ASP.NET's ``SetIsOriginAllowed``): allowed origins get credentials
OriginPredicate = Callable[[str], bool]


class CorsPolicy:
    """``cors_origins``: a list of origins, a predicate ``(origin) -> bool``, ``"*"``, or None (off).

    The JS client sends credentials (cookies), so an origin from the list or accepted by the
    predicate is echoed with ``Access-Control-Allow-Credentials: true``. ``"*"`` answers ``*``
    **without** credentials (browsers refuse a wildcard with credentials; a page on any origin
    must not ride on a user's cookies): browser clients then need ``withCredentials: false``.
    The same list or predicate also guards WebSocket upgrades, which browsers send from any page
    without CORS (cross-site WebSocket hijacking), unless ``allowed_origins`` says otherwise.
    """

    def __init__(self, cors_origins: Sequence[str] | str | OriginPredicate | None) -> None:
        self.wildcard = cors_origins == "*"
        self.predicate: OriginPredicate | None = None
        self.origins: frozenset[str] | None = None
        if callable(cors_origins):
            self.predicate = cors_origins
        elif isinstance(cors_origins, str) and not self.wildcard:
            self.origins = frozenset([cors_origins])
        elif cors_origins is not None and not isinstance(cors_origins, str):
            self.origins = frozenset(cors_origins)

    @property
    def enabled(self) -> bool:
        return self.wildcard or self.predicate is not None or self.origins is not None

    def _credentialed(self, origin: str) -> bool:
        if self.origins is not None:
            return origin in self.origins
        return self.predicate is not None and bool(self.predicate(origin))

    def headers(self, request: RequestInfo) -> list[tuple[str, str]]:
        """CORS response headers for a hub-path request from an allowed browser origin."""
        origin = request.header("origin")
        if not origin:
            return []
        if self._credentialed(origin):
            return [
                ("access-control-allow-origin", origin),
                ("access-control-allow-credentials", "true"),
                ("vary", "Origin"),
            ]
        return [("access-control-allow-origin", "*")] if self.wildcard else []

    def allows_websocket(self, request: RequestInfo) -> bool:
        """A WebSocket upgrade's origin against the list or predicate (no Origin: not a browser)."""
        origin = request.header("origin")
        if origin is None or self.wildcard or not self.enabled:
            return True
        if self._credentialed(origin):
            return True
        log.info("refused a WebSocket from origin %r on %s", origin[:200], request.path)
        return False

    async def preflight(self, request: RequestInfo, send: Send) -> None:
        """Answer a preflight (``OPTIONS``) with ``204``; allow headers only for allowed origins."""
        headers = self.headers(request)
        if headers:
            headers.append(("access-control-allow-methods", _CORS_METHODS))
            asked = request.header("access-control-request-headers")
            if asked:
                headers.append(("access-control-allow-headers", asked))
            headers.append(("access-control-max-age", "600"))
        await respond(send, 204, b"", content_type=None, headers=headers)
