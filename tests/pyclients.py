"""Helpers for driving the PyPI SignalR clients in tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import Any

from signalrcore.hub.base_hub_connection import BaseHubConnection


def stop_signalrcore(conn: BaseHubConnection, wait: float = 10.0) -> None:
    """Stop a signalrcore connection without hanging.

    signalrcore's stop() closes its socket and then joins the receive thread without a timeout, but
    close() does not wake a recv() blocked in another thread: it would hang until the server's next
    keep-alive ping (15 s). Shutting the socket down first ends the recv at once (SSE / WebSockets).
    """
    sock = getattr(getattr(conn.transport, "_client", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    stopper = threading.Thread(target=conn.stop, daemon=True)
    stopper.start()
    stopper.join(wait)
    assert not stopper.is_alive(), "signalrcore stop() hung"


async def stop_pysignalr(task: asyncio.Task[Any], wait: float = 10.0) -> None:
    """End a pysignalr ``client.run()`` task; an error the client ran into is raised, never hidden.

    The task normally runs until cancelled: cancelling it is the way to stop the client. If it has
    already ended (the client gave up, or its connection failed), its exception is re-raised.
    """
    if task.done():
        if not task.cancelled():
            task.result()  # the client's own error, or None if it ended cleanly
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=wait)
    assert done, f"pysignalr did not stop within {wait} s of being cancelled"
    if not task.cancelled():
        task.result()  # it swallowed the cancellation: whatever it ended with is reported
