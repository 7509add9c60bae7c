"""Built-in JWT bearer authentication and ready-made authorization policies.

``HubServer(authenticator=JwtBearerAuthenticator(key))`` turns every
negotiate and transport request into a :class:`~hubwire.connections.connection.Principal`
(or ``None`` = anonymous). Hubs or methods marked with
:func:`~hubwire.hubs.hub.authorize` then refuse anonymous callers: ``401`` with an
empty body on negotiate and on every transport request (the empty body is what
makes the JS client report ``Unauthorized: Status code '401'``), or the
completion error ``Failed to invoke '<Target>' because user is unauthorized``
for a method.

Where the token is read from mirrors ASP.NET Core's JWT bearer handler as the
SignalR docs configure it: the ``Authorization: Bearer`` header, else the
``access_token`` query parameter, because browsers cannot put headers on
WebSocket and EventSource requests (and the JS client puts the token in the
query for SSE even in Node).

:class:`JwtBearerAuthenticator` requires the ``jwt`` extra (PyJWT); the rest of this module does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .connections.connection import Principal, RequestInfo

if TYPE_CHECKING:
    import jwt

__all__ = [
    "NAME_IDENTIFIER",
    "JwtBearerAuthenticator",
    "bearer_token",
    "require_claim",
    "require_role",
]

NAME_IDENTIFIER = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier"
"""The claim ASP.NET maps ``sub`` to; tokens minted by .NET code often carry only this one, so
:class:`JwtBearerAuthenticator` falls back to it for the user identifier."""


log = logging.getLogger("hubwire.auth")


def bearer_token(request: RequestInfo, query_parameter: str | None = "access_token") -> str | None:
    """The raw token of a request: ``Authorization: Bearer`` first, then the query parameter."""
    header = request.header("authorization")
    if header:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if query_parameter:
        return request.query_param(query_parameter) or None
    return None


class JwtBearerAuthenticator:
    """Validate a JWT bearer token (signature, expiry, optionally audience/issuer) into a Principal.

    ``key`` is the HMAC secret or the public key (PEM) matching ``algorithms``.
    The user identifier (``clients.user(...)``, ``context.user_identifier``)
    comes from ``user_claim`` (default ``sub``), falling back to the .NET
    name-identifier claim so tokens issued by ASP.NET apps work unchanged.
    An invalid, expired or wrongly signed token makes the request anonymous
    (``None``), exactly like ASP.NET, so only endpoints that require
    authorization refuse it.
    """

    #: sent as ``WWW-Authenticate`` with 401 responses
    challenge = "Bearer"

    def __init__(
        self,
        key: str | bytes | Any,
        *,
        algorithms: Sequence[str] = ("HS256",),
        user_claim: str = "sub",
        audience: str | Iterable[str] | None = None,
        issuer: str | Sequence[str] | None = None,
        leeway: float = 0.0,
        require_expiration: bool = True,
        query_parameter: str | None = "access_token",
    ) -> None:
        self.key = key
        self.algorithms = list(algorithms)
        self.user_claim = user_claim
        self.audience = list(audience) if audience is not None and not isinstance(audience, str) else audience
        self.issuer = issuer
        self.leeway = leeway
        self.require_expiration = require_expiration
        self.query_parameter = query_parameter
        if audience is None and issuer is None:
            # any token signed with this key is accepted, whoever it was issued for
            log.warning(
                "JwtBearerAuthenticator without audience or issuer accepts tokens issued for any "
                "audience by any issuer sharing the key; pass audience= and issuer="
            )

    def decode(self, token: str) -> dict[str, Any] | None:
        """The token's claims, or None when it does not validate."""
        import jwt  # PyJWT (the ``jwt`` extra), imported where used: bearer_token needs none

        options: jwt.types.Options = {
            "verify_aud": self.audience is not None,
            "require": ["exp"] if self.require_expiration else [],
        }
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options=options,
            )
        except jwt.PyJWTError:
            return None
        return claims if isinstance(claims, dict) else None

    def principal(self, claims: dict[str, Any]) -> Principal:
        """Build the Principal from validated claims."""
        identifier = claims.get(self.user_claim)
        if identifier is None:
            identifier = claims.get(NAME_IDENTIFIER)
        return Principal(str(identifier) if identifier is not None else None, claims)

    def __call__(self, request: RequestInfo) -> Principal | None:
        token = bearer_token(request, self.query_parameter)
        if token is None:
            return None
        claims = self.decode(token)
        return None if claims is None else self.principal(claims)


def require_role(*roles: str) -> Callable[[Principal | None], bool]:
    """Policy for :func:`~hubwire.hubs.hub.authorize`: the user has at least one of ``roles``."""

    def policy(principal: Principal | None) -> bool:
        return principal is not None and any(principal.has_role(role) for role in roles)

    return policy


def require_claim(name: str, *values: Any) -> Callable[[Principal | None], bool]:
    """Policy: the user has claim ``name`` (with one of ``values`` when given; list claims count)."""

    def policy(principal: Principal | None) -> bool:
        if principal is None or name not in principal.claims:
            return False
        if not values:
            return True
        claim = principal.claims[name]
        held = claim if isinstance(claim, list) else [claim]
        return any(value in held for value in values)

    return policy
