"""Where the blog keeps posts and follows: in memory on one instance, in Redis on many.

Every instance of the app must see the same posts (a post created through instance 1 is published
through instance 3), so with a Redis URL the store lives in Redis; without one it is a dict in the
process, which is all a single instance needs.

Redis layout (``prefix`` defaults to the channel prefix + ``blog:``, so apps sharing one Redis stay
apart like their channels do):

* ``{prefix}posts``: hash, post id -> post JSON
* ``{prefix}posts:next``: the id counter (``INCR``)
* ``{prefix}published``: hash, post id -> publishedAt; ``HSETNX`` claims a publication, so two
  instances publishing the same post at once announce it once
* ``{prefix}follows:{user}``: set of the authors a user follows
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

#: how many posts ``GET /api/posts`` returns (newest first)
LIST_LIMIT = 50


def now_iso() -> str:
    """An ISO 8601 UTC timestamp with milliseconds, as JavaScript's ``Date`` prints it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class Post:
    id: int
    title: str
    body: str
    author: str
    createdAt: str  # camelCase: the JSON names clients see
    publishedAt: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Post:
        return cls(**json.loads(raw))


class AlreadyPublished(Exception):
    """The post was published before (by this instance or another)."""


class PostStore(Protocol):
    async def create(self, title: str, body: str, author: str) -> Post: ...

    async def get(self, post_id: int) -> Post | None: ...

    async def publish(self, post_id: int) -> Post:
        """Mark published once: raises KeyError (unknown) or AlreadyPublished."""
        ...

    async def list(self, limit: int = LIST_LIMIT) -> list[Post]: ...

    async def follow(self, user: str, author: str) -> list[str]: ...

    async def unfollow(self, user: str, author: str) -> list[str]: ...

    async def follows(self, user: str) -> list[str]: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class MemoryPostStore:
    """One process's posts (the zero-configuration demo)."""

    def __init__(self) -> None:
        self._posts: dict[int, Post] = {}
        self._follows: dict[str, set[str]] = {}

    async def create(self, title: str, body: str, author: str) -> Post:
        post = Post(len(self._posts) + 1, title, body, author, now_iso())
        self._posts[post.id] = post
        return post

    async def get(self, post_id: int) -> Post | None:
        return self._posts.get(post_id)

    async def publish(self, post_id: int) -> Post:
        post = self._posts.get(post_id)
        if post is None:
            raise KeyError(post_id)
        if post.publishedAt is not None:
            raise AlreadyPublished(post_id)
        post.publishedAt = now_iso()
        return post

    async def list(self, limit: int = LIST_LIMIT) -> list[Post]:
        return sorted(self._posts.values(), key=lambda p: p.id, reverse=True)[:limit]

    async def follow(self, user: str, author: str) -> list[str]:
        self._follows.setdefault(user, set()).add(author)
        return await self.follows(user)

    async def unfollow(self, user: str, author: str) -> list[str]:
        self._follows.get(user, set()).discard(author)
        return await self.follows(user)

    async def follows(self, user: str) -> list[str]:
        return sorted(self._follows.get(user, ()))

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class RedisPostStore:
    """Posts shared by every instance, in Redis (redis-py asyncio)."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis.asyncio as redis

        self.prefix = prefix
        self.redis = redis.from_url(
            url, decode_responses=True, socket_connect_timeout=5, socket_timeout=5, health_check_interval=30
        )

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    async def create(self, title: str, body: str, author: str) -> Post:
        post_id = int(await self.redis.incr(self._key("posts:next")))
        post = Post(post_id, title, body, author, now_iso())
        await self.redis.hset(self._key("posts"), str(post_id), json.dumps(post.to_json()))
        return post

    async def get(self, post_id: int) -> Post | None:
        raw = await self.redis.hget(self._key("posts"), str(post_id))
        return None if raw is None else Post.from_json(raw)

    async def publish(self, post_id: int) -> Post:
        post = await self.get(post_id)
        if post is None:
            raise KeyError(post_id)
        published_at = now_iso()
        if not await self.redis.hsetnx(self._key("published"), str(post_id), published_at):
            raise AlreadyPublished(post_id)
        post.publishedAt = published_at
        await self.redis.hset(self._key("posts"), str(post_id), json.dumps(post.to_json()))
        return post

    async def list(self, limit: int = LIST_LIMIT) -> list[Post]:
        raw = await self.redis.hvals(self._key("posts"))
        posts = sorted((Post.from_json(item) for item in raw), key=lambda p: p.id, reverse=True)
        return posts[:limit]

    async def follow(self, user: str, author: str) -> list[str]:
        await self.redis.sadd(self._key(f"follows:{user}"), author)
        return await self.follows(user)

    async def unfollow(self, user: str, author: str) -> list[str]:
        await self.redis.srem(self._key(f"follows:{user}"), author)
        return await self.follows(user)

    async def follows(self, user: str) -> list[str]:
        return sorted(await self.redis.smembers(self._key(f"follows:{user}")))

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self.redis.aclose()
