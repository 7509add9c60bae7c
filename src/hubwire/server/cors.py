"""Browser origins: CORS headers and preflights for hub paths, and the ``allowed_origins`` check."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..connections.connection import RequestInfo
from ..http import Send, respond

__all__ = ["CorsPolicy", "origin_allowed"]

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


class CorsPolicy:
    """``cors_origins``: a list of origins, ``"*"`` for any, or None (off, the default).

    The JS client sends credentials, so an allowed origin is echoed rather than ``*``.
    """

    def __init__(self, cors_origins: Sequence[str] | str | None) -> None:
        if isinstance(cors_origins, str) and cors_origins != "*":
            cors_origins = [cors_origins]
        self.origins: frozenset[str] | str | None = (
            cors_origins if cors_origins is None or isinstance(cors_origins, str) else frozenset(cors_origins)
        )

    @property
    def enabled(self) -> bool:
        return self.origins is not None

    def headers(self, request: RequestInfo) -> list[tuple[str, str]]:
        """CORS response headers for a hub-path request from an allowed browser origin."""
        origin = request.header("origin")
        if self.origins is None or not origin:
            return []
        if self.origins != "*" and origin not in self.origins:
            return []
        return [
            ("access-control-allow-origin", origin),
            ("access-control-allow-credentials", "true"),
            ("vary", "Origin"),
        ]

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
