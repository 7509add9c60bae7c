"""Which application serves a path: hub paths, their ``/negotiate``, and internal endpoints.

Paths match case-insensitively with the trailing slash ignored (as ASP.NET
routes do); ``root_path`` of a mounted app is stripped first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from ..connections.application import ConnectionApplication
from ..http import ASGIApp, Scope

__all__ = ["IMPLEMENTED_TRANSPORTS", "Match", "Router", "check_transports", "normalize"]

#: every transport, in the order negotiate lists them (clients try them in this order)
IMPLEMENTED_TRANSPORTS = ("WebSockets", "ServerSentEvents", "LongPolling")

#: what a request is for: a transport request, a negotiate, or an internal endpoint
Match = (
    tuple[Literal["transport", "negotiate"], ConnectionApplication]
    | tuple[Literal["internal"], ASGIApp]
    | None
)


def normalize(path: str) -> str:
    return ("/" + path.strip("/")).lower()


def check_transports(requested: Sequence[str]) -> tuple[str, ...]:
    """The requested transports in negotiate order; unknown names are a configuration error."""
    unknown = [t for t in requested if t not in IMPLEMENTED_TRANSPORTS]
    if unknown:
        raise ValueError(f"unknown transport(s) {unknown}; choose from {IMPLEMENTED_TRANSPORTS}")
    return tuple(t for t in IMPLEMENTED_TRANSPORTS if t in requested)


class Router:
    """The path table of one server."""

    def __init__(self) -> None:
        self._routes: dict[str, ConnectionApplication] = {}
        self._internal: dict[str, ASGIApp] = {}

    def add(self, path: str, endpoint: ConnectionApplication) -> None:
        key = normalize(path)
        if key in self._routes:
            raise ValueError(f"path {path!r} is already served")
        self._routes[key] = endpoint

    def add_internal(self, path: str, app: ASGIApp) -> None:
        self._internal[normalize(path)] = app

    def route(self, path: str) -> ConnectionApplication | None:
        """The endpoint serving a transport ``path``."""
        return self._routes.get(normalize(path))

    def items(self) -> list[tuple[str, ConnectionApplication]]:
        return list(self._routes.items())

    def endpoints(self) -> list[ConnectionApplication]:
        return list(self._routes.values())

    def match(self, scope: Scope) -> Match:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        key = normalize(path)
        kind = scope["type"]
        if self._internal and kind == "http" and key in self._internal:
            return "internal", self._internal[key]
        endpoint = self._routes.get(key)
        if endpoint is not None:
            return "transport", endpoint
        if key.endswith("/negotiate") and kind == "http":
            endpoint = self._routes.get(key[: -len("/negotiate")] or "/")
            if endpoint is not None:
                return "negotiate", endpoint
        return None
