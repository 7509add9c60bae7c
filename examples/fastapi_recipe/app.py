"""FastAPI and hubwire sharing one login: the API issues JWTs, and both its routes and the hub accept them.

Run it: ``hubwire run examples.fastapi_recipe.app:server`` (from a source checkout, with
``pip install "hubwire[fastapi]"``), then ``POST /api/login {"user": "ada", "password": "ada-password"}``.

* ``POST /api/login`` checks a password and answers ``{"token": <JWT>}``: ``sub`` is the user, ``role``
  the roles (a list), plus ``iss``, ``aud`` and ``exp``;
* ``current_user`` is a FastAPI dependency built on the hub's own authenticator, so a route and the hub
  read the same token the same way (the ``Authorization: Bearer`` header, or ``?access_token=``);
* ``NewsHub`` at ``/hubs/news`` admits signed-in users only; its ``Publish`` method only editors
  (``require_role("editor")`` reads the ``role`` claim, like ``Principal.has_role``);
* ``HubServer(app=api)`` serves the hub path and passes every other request to FastAPI.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Annotated, Any

import jwt
from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel

from hubwire import Hub, HubServer, Principal, RequestInfo, authorize
from hubwire.auth import JwtBearerAuthenticator, require_role

#: every instance of the app needs the same secret; this default is for trying the recipe only
SECRET = os.environ.get("RECIPE_JWT_SECRET", "recipe-secret-change-me-in-production")
ISSUER = "https://login.recipe.example"
AUDIENCE = "recipe-api"
TOKEN_LIFETIME = 3600

#: stands in for your user store: name -> (password, roles)
USERS: dict[str, tuple[str, list[str]]] = {
    "ada": ("ada-password", ["editor"]),
    "bob": ("bob-password", []),
}

# One authenticator for the hub and the API: the audience and issuer are checked, not only the signature.
authenticator = JwtBearerAuthenticator(SECRET, audience=AUDIENCE, issuer=ISSUER)


def issue_token(user: str, roles: list[str]) -> str:
    """A signed JWT the authenticator above accepts; ``role`` is one of the claims ``has_role`` reads."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user,
        "role": roles,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + TOKEN_LIFETIME,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


def current_user(request: Request) -> Principal:
    """FastAPI dependency: the caller's Principal from the hub's authenticator, or 401."""
    principal = authenticator(RequestInfo.from_scope(request.scope))
    if principal is None or not principal.identifier:
        raise HTTPException(401, "not signed in", headers={"WWW-Authenticate": "Bearer"})
    return principal


CurrentUser = Annotated[Principal, Depends(current_user)]


@authorize()  # anonymous negotiate and transport requests get 401
class NewsHub(Hub):
    async def who_am_i(self) -> str:
        return self.context.user_identifier or ""

    @authorize(require_role("editor"))  # others get "Failed to invoke 'Publish' because user is unauthorized"
    async def publish(self, headline: str) -> None:
        await self.clients.all.send("Headline", headline, self.context.user_identifier)


class Login(BaseModel):
    user: str
    password: str


api = FastAPI(title="hubwire FastAPI recipe")


@api.post("/api/login")
async def login(body: Login) -> dict[str, str]:
    known = USERS.get(body.user)
    # compare_digest: the time taken does not tell how much of the password was right
    if known is None or not secrets.compare_digest(known[0].encode(), body.password.encode()):
        raise HTTPException(401, "wrong user or password")
    return {"token": issue_token(body.user, known[1])}


@api.get("/api/me")
async def me(user: CurrentUser) -> dict[str, Any]:
    return {"user": user.identifier, "editor": user.has_role("editor")}


@api.post("/api/headlines", status_code=202)
async def post_headline(headline: str, user: CurrentUser) -> dict[str, str]:
    """The same send as the hub's ``Publish``, from a route: through the hub context."""
    if not user.has_role("editor"):
        raise HTTPException(403, "editors only")
    await server.hub_context(NewsHub).clients.all.send("Headline", headline, user.identifier)
    return {"sent": headline}


server = HubServer(authenticator=authenticator, app=api)  # hub paths here, everything else to FastAPI
server.add_hub("/hubs/news", NewsHub)
