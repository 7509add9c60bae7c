"""Two hubs served beside the service's REST data plane, for ``tests/test_service_rest.py``.

``HubServer(app=ServiceRestApi(...))``: hub paths (``/chat``, ``/other``) go to the hubs,
everything else to the REST API, which reaches the hubs through their lifetime managers.
Users are taken from the ``user`` query parameter (a test authenticator, not for production).
"""

from __future__ import annotations

from hubwire import Hub, HubLifetimeManager, HubOptions, HubServer, Principal, RequestInfo
from hubwire.service.rest import ServiceRestApi

#: the access key REST tokens are signed with
ACCESS_KEY = "svcrest-test-access-key-" + "0123456789abcdef" * 3  # 72 bytes: long enough for HS512 too


class ChatHub(Hub):
    async def get_connection_id(self) -> str:
        return self.context.connection_id


class OtherHub(ChatHub):
    """A second hub: what is sent to ``chat`` must not reach it."""


def authenticate(request: RequestInfo) -> Principal | None:
    user = request.query_param("user")
    return Principal(user, {"sub": user}) if user else None


hubs = HubServer(authenticator=authenticate)
# small group limits, so the manager's HubException (-> 400) is reachable over REST
hubs.add_hub("/chat", ChatHub, options=HubOptions(max_groups_per_connection=3, max_group_name_length=64))
hubs.add_hub("/other", OtherHub)
HUBS: dict[str, type[Hub]] = {"chat": ChatHub, "other": OtherHub}


def manager_for(name: str) -> HubLifetimeManager | None:
    hub = HUBS.get(name)
    return hubs.manager(hub) if hub is not None else None


hubs.app = ServiceRestApi(ACCESS_KEY, manager_for)
app = hubs
