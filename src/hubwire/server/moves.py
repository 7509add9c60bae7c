"""Stateful reconnect across instances: this server's side of moving a connection.

Why here: moving a connection touches the connection manager (freeze,
release, adopt), the hub application of its path (hub state, groups) and the
backplane's takeover exchange (``backplane/takeover.py``), and only the
server layer sees all three. :class:`ConnectionMoves` is the holder side
(offer, hand over, forward) and :meth:`ConnectionMoves.take_over` the taker
side, called by the dispatcher for a resume of a connection held elsewhere.

What moves: the connection id and token, its user (checked: the resume must
come from the same user), its protocol, groups and items, the unacknowledged
messages with their numbering and which of the client's messages were
handled. What does not: the request hub code sees becomes the resume's (so
no headers or cookies cross Redis), and the claims are those the resume
authenticated with. Client-result calls waiting on the old holder fail with
"Connection disconnected."; hub methods still running there finish there and
their results are forwarded.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from ..backplane.base import Backplane
from ..backplane.takeover import Offer, TakeoverRequest, Takeovers
from ..connections.application import ConnectionApplication
from ..connections.connection import Connection, Principal, RequestInfo
from ..connections.manager import ConnectionManager
from ..connections.replay import ReplayState
from ..connections.tokens import VerifiedToken
from ..protocol import texts
from ..transports import websocket
from .routes import Router

__all__ = ["ConnectionMoves", "token_digest"]

log = logging.getLogger("hubwire.server")


class _Offered(msgspec.Struct, array_like=True):
    hub: dict[str, Any]


class _Final(msgspec.Struct, array_like=True):
    first_id: int
    kept: list[bytes]
    next_receive_id: int
    latest_received: int
    #: backplane ids (origin, seq) the old holder delivered after its offer
    ids: list[tuple[str, int]]


_encoder = msgspec.msgpack.Encoder()
_offer_decoder = msgspec.msgpack.Decoder(_Offered)
_final_decoder = msgspec.msgpack.Decoder(_Final)


def token_digest(token: str) -> bytes:
    """What proves the token across Redis without sending it."""
    return hashlib.sha256(token.encode()).digest()


class ConnectionMoves:
    """Offers, hands over and takes over resumable connections (one per server)."""

    def __init__(
        self, connections: ConnectionManager, router: Router, backplane: Backplane, takeovers: Takeovers
    ) -> None:
        self.connections = connections
        self.router = router
        self.backplane = backplane
        self.takeovers = takeovers
        #: connections offered to another instance, not handed over yet
        self._frozen: dict[str, Connection] = {}
        #: connections taken over here -> the instance they came from (its forwards are accepted)
        self._moved_from: dict[str, str] = {}
        takeovers.holder = self
        connections.on_end.append(self._ended)

    def _ended(self, conn: Connection) -> None:
        self._moved_from.pop(conn.connection_id, None)

    # -- holder side -------------------------------------------------------------------------------

    def offer(self, request: TakeoverRequest) -> bytes | int | None:
        conn = self.connections.lookup(request.connection_id)
        if conn is None or not self.connections.is_live(conn):
            return None  # not held here
        if not hmac.compare_digest(token_digest(conn.token), request.token_digest):
            return None  # another token for this id: a forgery, never answered
        application: ConnectionApplication | None = conn.application
        if application is None or self.router.route(request.path) is not application:
            return 404
        owner = conn.principal.identifier if conn.principal is not None else None
        if owner is not None and request.user is None:
            return 401
        if request.user is not None and owner != request.user:
            log.warning(
                "refused moving %s to another instance as another user",
                conn.connection_id,
                extra={"connection_id": conn.connection_id, "event": "resume_refused"},
            )
            return 403
        if not conn.resumable:
            return 409
        state = application.export_for_move(conn)
        if isinstance(state, str):
            log.info("connection %s cannot move to another instance: %s", conn.connection_id, state)
            return 409
        self.connections.freeze(conn)
        self._frozen[conn.connection_id] = conn
        return _encoder.encode(_Offered(state))

    async def finish(self, connection_id: str, forward: Callable[[bytes], None]) -> bytes | None:
        conn = self._frozen.pop(connection_id, None)
        if conn is None or not self.connections.is_live(conn):
            return None
        replay = conn.outbox.replay
        if replay is None:
            return None
        application: ConnectionApplication = conn.application
        # unregistered first: from here on nothing reaches it but what running hub methods send
        await application.release_moved(conn)
        tags = conn.outbox.tags or ()
        state = replay.export()
        ids = [tag for tag in tags if tag is not None]
        self.connections.release(conn, forward)
        self._moved_from.pop(connection_id, None)
        log.info(
            "connection %s handed over to another instance (%d messages unacknowledged)",
            connection_id,
            len(state.kept),
            extra={"connection_id": connection_id, "event": "moved_out"},
        )
        final = _Final(state.first_id, state.kept, state.next_receive_id, state.latest_received, ids)
        return _encoder.encode(final)

    def abandon(self, connection_id: str) -> None:
        conn = self._frozen.pop(connection_id, None)
        if conn is not None:
            self.connections.thaw(conn)

    def forwarded(self, origin: str, connection_id: str, data: bytes) -> None:
        if self._moved_from.get(connection_id) != origin:
            return  # not a connection that came from there
        conn = self.connections.lookup(connection_id)
        if conn is not None and self.connections.is_live(conn):
            conn.outbox.write(data)

    # -- taker side --------------------------------------------------------------------------------

    async def take_over(
        self,
        endpoint: ConnectionApplication,
        verified: VerifiedToken,
        token: str,
        request: RequestInfo,
        principal: Principal | None,
    ) -> Connection | tuple[int, str]:
        """Take a resumable connection over from the instance holding it, for this resume.

        Refused (the client then starts a new connection): 404 when no instance
        answers in time (none holds it, or the holder died), the holder's status
        otherwise (401 / 403: another user; 409: it cannot move).
        """
        path = next((p for p, e in self.router.items() if e is endpoint), None)
        if path is None:
            return 404, texts.NO_CONNECTION
        cid = verified.connection_id
        user = principal.identifier if principal is not None else None
        answer = await self.takeovers.request(cid, token_digest(token), user, path)
        if answer is None:
            log.warning(
                "no instance handed over %s: resume refused, the client starts afresh",
                cid,
                extra={"connection_id": cid, "event": "resume_refused"},
            )
            return 404, texts.NO_CONNECTION
        if isinstance(answer, int):
            return answer, (texts.RESUME_OTHER_USER if answer == 403 else "")
        return await self._adopt(endpoint, verified, token, request, principal, answer)

    async def _adopt(
        self,
        endpoint: ConnectionApplication,
        verified: VerifiedToken,
        token: str,
        request: RequestInfo,
        principal: Principal | None,
        offer: Offer,
    ) -> Connection | tuple[int, str]:
        cid = verified.connection_id
        conn = self.connections.adopt(verified, token, principal)
        self._moved_from[cid] = offer.origin
        try:
            hub_state = _offer_decoder.decode(offer.state).hub
            await endpoint.import_moved(conn, hub_state)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            log.warning("cannot take %s over: %s", cid, exc)
            await self._undo(endpoint, conn)
            return 404, texts.NO_CONNECTION  # the holder's offer times out: it keeps the connection
        raw = await self.takeovers.commit(offer)
        replay = conn.outbox.replay
        final: _Final | None = None
        if raw is not None:
            try:
                final = _final_decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("malformed hand-over of %s: %s", cid, exc)
        if final is None or replay is None or conn.outbox.closed or not self.connections.is_live(conn):
            await self._undo(endpoint, conn)
            return 404, texts.NO_CONNECTION
        # the old holder's messages, then those that reached only this instance meanwhile
        theirs = {(origin, seq) for origin, seq in final.ids}
        mine = replay.taken()
        tags = conn.outbox.tags or [None] * len(mine)
        later = [data for data, tag in zip(mine, tags, strict=False) if tag is None or tag not in theirs]
        state = ReplayState(final.first_id, final.kept, final.next_receive_id, final.latest_received)
        replay.restore(state, later)
        conn.outbox.tags = None
        self.connections.activate(conn, websocket.FEATURES, request, principal)
        await self.backplane.reclaim_connection(cid)
        log.info(
            "connection %s taken over from another instance (%d messages to replay)",
            cid,
            replay.kept,
            extra={"connection_id": cid, "event": "moved_in"},
        )
        return conn

    async def _undo(self, endpoint: ConnectionApplication, conn: Connection) -> None:
        self._moved_from.pop(conn.connection_id, None)
        try:
            await endpoint.abandon_moved(conn)
        finally:
            self.connections.drop_adopted(conn)
