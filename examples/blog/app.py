"""The blog demo: a FastAPI app whose REST API publishes posts live to every browser through a hub.

* ``POST /api/login {"user": "alice", "admin": false}`` -> ``{"token": <JWT>}`` (a demo login: no
  password; the token is signed with ``BLOG_JWT_SECRET``, or a demo default)
* ``POST /api/posts {"title", "body"}`` (bearer token) creates a draft by the logged-in user;
  ``POST /api/posts/{id}/publish`` (its author or an admin) calls :meth:`PostService.publish`, which
  sends ``PostPublished`` to everyone and ``AuthorPosted`` to the author's followers
* ``POST /api/alerts {"message"}`` (admins only) sends ``Alert`` to the ``admins`` group
* ``GET /api/posts``, ``GET /api/instance``, ``GET /healthz`` (readiness: the store answers)
* ``BlogHub`` at ``/hubs/blog`` (logged-in users only): ``Follow(author)`` / ``Unfollow(author)``,
  ``Instance()``, ``WhoAmI()``; admins join ``admins`` in ``on_connected``, and everyone rejoins
  the ``author:{name}`` groups of the authors they follow there, so a reconnect (to any instance)
  restores the groups
* ``/`` the page (official ``@microsoft/signalr`` browser bundle from ``node_modules``)

Run one instance: ``hubwire demo`` (in memory). Many: ``hubwire demo --instances 3`` (see
``examples/blog/cluster.py``), or ``hubwire run examples.blog.app:app --redis URL`` per instance.
With ``HUBWIRE_REDIS_URL`` set, posts and follows live in Redis too (``store.py``), so every
instance serves the same blog.

Environment: ``HUBWIRE_REDIS_URL``, ``HUBWIRE_CHANNEL_PREFIX`` (also isolates the Redis keys),
``BLOG_JWT_SECRET``, ``BLOG_INSTANCE`` (the name ``Instance()`` reports; default host and pid).
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Protocol, TypedDict

import jwt
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from hubwire import Hub, HubContext, HubException, HubServer, Principal, RequestInfo, authorize
from hubwire.auth import JwtBearerAuthenticator

from .store import AlreadyPublished, MemoryPostStore, Post, PostStore, RedisPostStore

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
NODE_MODULES = Path(os.environ.get("BLOG_NODE_MODULES", HERE.parent.parent / "node_modules"))
SIGNALR_JS = NODE_MODULES / "@microsoft" / "signalr" / "dist" / "browser" / "signalr.min.js"

#: demo default only: set BLOG_JWT_SECRET in any real deployment (every instance needs the same one)
DEMO_SECRET = "hubwire-blog-demo-secret-not-for-production"
JWT_SECRET = os.environ.get("BLOG_JWT_SECRET") or DEMO_SECRET
TOKEN_LIFETIME = 12 * 3600
INSTANCE = os.environ.get("BLOG_INSTANCE") or f"{socket.gethostname()} pid {os.getpid()}"
ADMINS = "admins"
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


def author_group(author: str) -> str:
    return f"author:{author}"


def is_admin(principal: Principal | None) -> bool:
    return principal is not None and principal.has_role("admin")


def make_store() -> PostStore:
    url = os.environ.get("HUBWIRE_REDIS_URL")
    if not url:
        return MemoryPostStore()
    prefix = os.environ.get("BLOG_KEY_PREFIX") or (os.environ.get("HUBWIRE_CHANNEL_PREFIX") or "") + "blog:"
    return RedisPostStore(url, prefix)


class PostService:
    """Posts plus the live announcements (the hub context works the same on one or many instances)."""

    def __init__(self, store: PostStore, hub: HubContext) -> None:
        self.store = store
        self.hub = hub

    async def create(self, title: str, body: str, author: str) -> Post:
        return await self.store.create(title, body, author)

    async def publish(self, post_id: int) -> Post:
        post = await self.store.publish(post_id)
        payload = post.to_json()
        # followers first: by the time anyone sees PostPublished, AuthorPosted was sent
        await self.hub.clients.group(author_group(post.author)).send("AuthorPosted", payload)
        await self.hub.clients.all.send("PostPublished", payload)
        return post

    async def alert(self, message: str, sender: str) -> Alert:
        alert: Alert = {"message": message, "from": sender, "instance": INSTANCE}
        await self.hub.clients.group(ADMINS).send("Alert", alert)
        return alert


#: what ``Alert`` carries (``from`` is a Python keyword, hence the functional form)
Alert = TypedDict("Alert", {"message": str, "from": str, "instance": str})


class InstanceInfo(TypedDict):
    name: str
    pid: int


class Identity(TypedDict):
    user: str
    admin: bool
    follows: list[str]
    instance: str


class BlogClient(Protocol):
    """What the blog sends to its pages (``hubwire typescript`` types their handlers from this)."""

    async def post_published(self, post: Post) -> None:
        """A post was published (to everyone)."""

    async def author_posted(self, post: Post) -> None:
        """An author this connection follows published a post."""

    async def alert(self, alert: Alert) -> None:
        """An admin's alert (to the ``admins`` group)."""


@authorize()
class BlogHub(Hub):
    """Live feed; ``author:{name}`` groups for followers, ``admins`` for alerts."""

    client_methods = BlogClient

    async def on_connected(self) -> None:
        # groups belong to a connection: a reconnect (on whatever instance) starts with none,
        # so they are (re)joined here from what the token and the store say
        connection_id = self.context.connection_id
        if is_admin(self.context.user):
            await self.groups.add(connection_id, ADMINS)
        user = self.context.user_identifier
        if user:
            for author in await service.store.follows(user):
                await self.groups.add(connection_id, author_group(author))

    async def follow(self, author: str) -> list[str]:
        """Get ``AuthorPosted`` for ``author``'s posts from now on (remembered for reconnects)."""
        _check_name(author)
        await self.groups.add(self.context.connection_id, author_group(author))
        return await service.store.follow(self._user(), author)

    async def unfollow(self, author: str) -> list[str]:
        _check_name(author)
        await self.groups.remove(self.context.connection_id, author_group(author))
        return await service.store.unfollow(self._user(), author)

    async def instance(self) -> InstanceInfo:
        """Which instance holds this connection."""
        return {"name": INSTANCE, "pid": os.getpid()}

    async def who_am_i(self) -> Identity:
        user = self._user()
        return {
            "user": user,
            "admin": is_admin(self.context.user),
            "follows": await service.store.follows(user),
            "instance": INSTANCE,
        }

    def _user(self) -> str:
        user = self.context.user_identifier
        if not user:  # pragma: no cover - the hub requires a logged-in user
            raise HubException("not logged in")
        return user


def _check_name(name: str) -> None:
    if not NAME.match(name):
        raise HubException("a name is 1-32 letters, digits, '.', '_' or '-'")


# -- REST API ---------------------------------------------------------------------------------------


class Login(BaseModel):
    user: str = Field(pattern=NAME.pattern)
    admin: bool = False


class NewPost(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    body: str = Field(default="", max_length=10_000)


class NewAlert(BaseModel):
    message: str = Field(min_length=1, max_length=500)


def issue_token(user: str, admin: bool = False, lifetime: int = TOKEN_LIFETIME) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user, "iat": now, "exp": now + lifetime}
    if admin:
        claims["role"] = ["admin"]
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def current_user(request: Request) -> Principal:
    principal = authenticator(RequestInfo.from_scope(request.scope))
    if principal is None or not principal.identifier:
        raise HTTPException(401, "log in first (POST /api/login), then send Authorization: Bearer <token>")
    return principal


User = Annotated[Principal, Depends(current_user)]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await service.store.close()


api = FastAPI(title="hubwire blog demo", lifespan=lifespan)


@api.post("/api/login")
async def login(body: Login) -> dict[str, Any]:
    return {"token": issue_token(body.user, body.admin), "user": body.user, "admin": body.admin}


@api.get("/api/posts")
async def list_posts() -> list[dict[str, Any]]:
    return [post.to_json() for post in await service.store.list()]


@api.post("/api/posts", status_code=201)
async def create_post(body: NewPost, user: User) -> dict[str, Any]:
    assert user.identifier is not None
    return (await service.create(body.title, body.body, user.identifier)).to_json()


@api.get("/api/posts/{post_id}")
async def get_post(post_id: int) -> dict[str, Any]:
    post = await service.store.get(post_id)
    if post is None:
        raise HTTPException(404, f"no post {post_id}")
    return post.to_json()


@api.post("/api/posts/{post_id}/publish")
async def publish_post(post_id: int, user: User) -> dict[str, Any]:
    post = await service.store.get(post_id)
    if post is None:
        raise HTTPException(404, f"no post {post_id}")
    if post.author != user.identifier and not is_admin(user):
        raise HTTPException(403, "only the author or an admin publishes a post")
    try:
        return (await service.publish(post_id)).to_json()
    except AlreadyPublished:
        raise HTTPException(409, f"post {post_id} is already published") from None


@api.post("/api/alerts", status_code=202)
async def send_alert(body: NewAlert, user: User) -> dict[str, str]:
    if not is_admin(user):
        raise HTTPException(403, "admins only")
    assert user.identifier is not None
    return dict(await service.alert(body.message, user.identifier))


@api.get("/api/instance")
async def instance() -> dict[str, Any]:
    return {"name": INSTANCE, "pid": os.getpid()}


@api.get("/healthz")
async def healthz() -> JSONResponse:
    """Readiness: this instance serves HTTP and reaches its store (Redis when configured)."""
    store_ok = await service.store.ping()
    ready = store_ok and server.keys.ready  # keys: the instances agreed on the token key
    body = {
        "status": "ok" if ready else ("store unreachable" if not store_ok else server.keys.reason),
        "instance": INSTANCE,
        "store": type(service.store).__name__,
        "backplane": server.backplane.health() or "in-memory",
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@api.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@api.get("/blog.js", include_in_schema=False)
async def page_script() -> FileResponse:
    return FileResponse(STATIC / "blog.js", media_type="text/javascript")


@api.get("/lib/signalr.min.js", include_in_schema=False, response_model=None)
async def signalr_bundle() -> FileResponse | PlainTextResponse:
    if not SIGNALR_JS.exists():
        return PlainTextResponse(
            f"{SIGNALR_JS} is missing: run `npm ci` in the repository (./run demo does)", status_code=404
        )
    return FileResponse(SIGNALR_JS, media_type="text/javascript")


# -- wiring -----------------------------------------------------------------------------------------

authenticator = JwtBearerAuthenticator(JWT_SECRET)
#: the backplane comes from HUBWIRE_REDIS_URL / HUBWIRE_CHANNEL_PREFIX (in memory when unset)
server = HubServer(authenticator=authenticator, app=api)
server.add_hub("/hubs/blog", BlogHub)
service = PostService(make_store(), server.hub_context(BlogHub))
app = server
