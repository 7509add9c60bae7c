"""Helpers for driving the PyPI SignalR clients in tests."""

from __future__ import annotations

import contextlib
import socket
import threading

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
