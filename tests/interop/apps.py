"""Apps for the transport and auth tests: the interop app plus what its contract does not cover.

``app`` is the interop server (``examples.interop.app``) with extra paths:

* ``/wsonly`` - TestHub with WebSockets only (SSE / long polling must be refused);
* ``/redirected`` - negotiate answers with a redirect (the ``negotiate_redirect`` hook) to
  ``/target`` on the same server, with a freshly minted token;
* ``/target`` - an ``[Authorize]`` hub reporting who the caller is;
* ``/admin`` - a hub that requires role ``admin`` (hub-level policy -> 401);
* ``/methods`` - method-level ``@authorize`` with role and claim policies.

``restricted`` is a separate server whose CORS allows only ``http://allowed.example``; ``plain``
one with the default (no CORS).

Run: ``hubwire run tests.interop.apps:app --port N`` (same env variables as the interop app).
"""

from __future__ import annotations

from examples.interop import app as interop

from hubwire import Hub, HubServer, RequestInfo, authorize
from hubwire.auth import require_claim, require_role


class WhoAmIHub(Hub):
    """Tells the caller how the server sees them."""

    async def echo(self, message: str) -> str:
        return message

    async def who_am_i(self) -> str | None:
        return self.context.user_identifier

    async def transport(self) -> str | None:
        return self.context.transport


@authorize()
class TargetHub(WhoAmIHub):
    """Where ``/redirected`` sends clients; only reachable with the redirect's token."""


@authorize(require_role("admin"))
class AdminHub(WhoAmIHub):
    """Every request needs a user with role ``admin``."""


class MethodsHub(WhoAmIHub):
    """Anonymous connections allowed; some methods are not."""

    @authorize()
    async def secret(self) -> str:
        return "secret"

    @authorize(require_role("admin"))
    async def admin_only(self) -> str:
        return "admin"

    @authorize(require_claim("scope", "write"))
    async def writer(self) -> str:
        return "written"


def redirect_to_target(request: RequestInfo) -> tuple[str, str | None]:
    """Send every negotiating client to ``/target`` on this host, with a token for user ``redirected``."""
    host = request.header("host") or "127.0.0.1"
    return f"http://{host}/target", interop.generate_token(user="redirected")


server = interop.server
server.add_hub("/wsonly", interop.TestHub, transports=("WebSockets",))
server.add_hub("/target", TargetHub)
server.add_hub("/redirected", WhoAmIHub, negotiate_redirect=redirect_to_target)
server.add_hub("/admin", AdminHub)
server.add_hub("/methods", MethodsHub)
app = server

restricted = HubServer(cors_origins=["http://allowed.example"])
restricted.add_connection_handler("/echo", lambda conn, data: conn.write(data))

#: ``"*"``: any origin, never with credentials
wildcard = HubServer(cors_origins="*")
wildcard.add_connection_handler("/echo", lambda conn, data: conn.write(data))

#: CORS is off by default
plain = HubServer()
plain.add_connection_handler("/echo", lambda conn, data: conn.write(data))
