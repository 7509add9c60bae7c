"""An app with the live dashboard on, for tests/test_dashboard.py.

``hubwire run tests.apps.dashboard:app [--redis URL --channel-prefix P]``: one hub at ``/hub``
(users from the ``user`` query parameter, a test authenticator only), the dashboard at
``/ops/dashboard`` behind HTTP Basic ``ops`` / ``s3cret``, the stats snapshot at ``/debug/stats`` and
this instance's server name at ``/instance``.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from hubwire import Hub, HubServer, Principal, RequestInfo
from hubwire.server.dashboard import BasicAuth

DASHBOARD = "/ops/dashboard"
USER, PASSWORD = "ops", "s3cret"


class DemoHub(Hub):
    async def whoami(self) -> dict[str, Any]:
        return {"connectionId": self.context.connection_id}

    async def send_all(self, value: str) -> None:
        await self.clients.all.send("Message", value)


def authenticate(request: RequestInfo) -> Principal | None:
    user = request.query_param("user")
    return Principal(user, {"sub": user}) if user else None


async def instance(request: Request) -> PlainTextResponse:
    return PlainTextResponse(server.inspection.name)


server = HubServer(
    authenticator=authenticate,
    stats_path="/debug/stats",
    dashboard_path=DASHBOARD,
    dashboard_auth=BasicAuth(USER, PASSWORD),
    app=Starlette(routes=[Route("/instance", instance)]),
)
server.add_hub("/hub", DemoHub)
app = server
