"""One owner for background tasks: each one tracked, and cancelled and awaited at shutdown.

Why: a task started without a reference can be garbage-collected mid-run, and
one nobody awaits at shutdown leaks past the server's life (and hides its
exception). Every layer that starts work in the background hands it here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

__all__ = ["BackgroundTasks", "cancel_and_wait"]

log = logging.getLogger("hubwire.tasks")

T = TypeVar("T")


class BackgroundTasks:
    """A set of running tasks with spawn / wait / cancel."""

    __slots__ = ("_tasks", "name")

    def __init__(self, name: str = "hubwire") -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Run ``coro`` in the background; its exception, if any, is logged, never lost."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def wait(self, timeout: float | None) -> None:
        """Let the running tasks finish, for at most ``timeout`` seconds."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def cancel_all(self) -> None:
        """Cancel every task and wait until each has ended (bounded: :func:`cancel_and_wait`)."""
        await cancel_and_wait(self._tasks, what=self.name)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], timeout: float = 10.0, what: str = "") -> bool:
    """Cancel ``tasks`` and wait until they have ended; False (logged) if some outlive ``timeout``.

    Why not one ``cancel()`` and an unbounded wait: on Python 3.11 ``asyncio.wait_for`` can swallow
    a cancellation that arrives as the awaited operation completes (fixed in 3.12), and a loop
    around it then goes on as if nothing happened: shutdown would wait for it forever. A task
    still running half a second after a cancellation is cancelled again.
    """
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            names = ", ".join(sorted(task.get_name() for task in pending))
            log.error(
                "tasks of %s still running %.0fs after being cancelled: %s", what or "hubwire", timeout, names
            )
            return False
        _, pending = await asyncio.wait(pending, timeout=min(0.5, remaining))
    return True
