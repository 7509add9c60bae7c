"""Send to a hub's clients from processes that run no server: Celery/RQ workers, cron jobs, scripts.

::

    from hubwire.emitter import Emitter

    emitter = Emitter("redis://redis:6379", channel_prefix="BlogApp:SignalR:", hub="BlogHub")
    emitter.all.send("PostPublished", {"id": 7})
    emitter.group("author:ada").send("AuthorPosted", "ada", 7)
    emitter.groups.add(connection_id, "admins")  # waits for the instance holding the connection

The emitter speaks to the servers' Redis backplane the way another server instance would: the same
channels, the same .NET-compatible envelopes (README, "Emitting from other processes"), so every
instance delivers the message to its own clients, once. :class:`Emitter` is plain blocking code
(no event loop, safe from several threads); :class:`AsyncEmitter` has the same names for asyncio.
``hubwire emit`` is the command-line form.
"""

from .aio import AsyncEmitter, AsyncGroups, AsyncTarget
from .sync import Emitter, Groups, Target

__all__ = ["AsyncEmitter", "AsyncGroups", "AsyncTarget", "Emitter", "Groups", "Target"]
