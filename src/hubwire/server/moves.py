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

import asyncio
import contextlib
import hashlib
import heapq
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from ..backplane.base import Backplane
from ..backplane.durable import ConnectionJournal, DurableStore, Record, mark_key
from ..backplane.takeover import Offer, TakeoverRequest, Takeovers
from ..connections.application import ConnectionApplication
from ..connections.connection import Connection, Principal, RequestInfo
from ..connections.manager import ConnectionManager
from ..connections.outbox import Tag
from ..connections.replay import ReplayState
from ..connections.tokens import VerifiedToken
from ..protocol import texts
from ..protocol.backplane import decode_invocation
from ..protocol.errors import InvalidDataError
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
    ids: list[tuple[str, int, str]]
    #: the hub state when it was handed over (groups or items may have changed since the offer)
    hub: dict[str, Any]


_encoder = msgspec.msgpack.Encoder()
_offer_decoder = msgspec.msgpack.Decoder(_Offered)
_final_decoder = msgspec.msgpack.Decoder(_Final)


#: history read before the record's last write: what the dead holder may not have had yet
_HISTORY_MARGIN_MS = 10_000
#: bytes read at most (journal and histories) to recover one connection
_RECOVERY_READ_BYTES = 64 * 1024 * 1024
#: seconds a refused resume (404) is refused again at once, without asking the cluster
_REFUSED_FOR = 10.0
#: seconds a connection that moved on is remembered, so results of calls still running follow it
_FORWARD_FOR = 600.0


class _Resume(NamedTuple):
    """One resume being served: the path, what its token says, the token, the request, the user."""

    endpoint: ConnectionApplication
    verified: VerifiedToken
    token: str
    request: RequestInfo
    principal: Principal | None


class _Unrecoverable(Exception):
    """A durable resume that could not be exact (the text says why)."""


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
        #: connections resumed here after their instance died (durable resume)
        self.recovered = 0
        #: connections whose resume was just refused here (404) -> until when it is refused at once
        self._refused: dict[str, float] = {}
        #: connections being taken over to here (a second resume of one is refused meanwhile)
        self._adopting: set[str] = set()
        #: connections handed over from here -> (the released connection, since): forwards follow them
        self._released: dict[str, tuple[Connection, float]] = {}
        takeovers.holder = self
        connections.on_end.append(self._ended)

    def _ended(self, conn: Connection) -> None:
        if conn.connection_id not in self._released:
            self._moved_from.pop(conn.connection_id, None)

    # -- holder side -------------------------------------------------------------------------------

    def is_moving(self, connection_id: str) -> bool:
        """Being handed over from here, or taken over to here: no other resume may touch it."""
        return connection_id in self._frozen or connection_id in self._adopting

    def offer(self, request: TakeoverRequest) -> bytes | int | None:
        conn = self.connections.lookup(request.connection_id)
        if conn is None or not self.connections.is_live(conn):
            return None  # not held here
        application: ConnectionApplication | None = conn.application
        if application is None:
            return None  # negotiated here but started elsewhere: the holder answers
        if not hmac.compare_digest(token_digest(conn.token), request.token_digest):
            return None  # another token for this id: a forgery, never answered
        if self.router.route(request.path) is not application:
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
        if not conn.resumable or self.is_moving(conn.connection_id):
            return 409  # ending, or another resume of it is under way
        state = application.export_for_move(conn)
        if isinstance(state, str):
            log.info("connection %s cannot move to another instance: %s", conn.connection_id, state)
            return 409
        try:
            offered = _encoder.encode(_Offered(state))
        except (TypeError, ValueError, OverflowError):
            return 409
        self.connections.freeze(conn)
        self._frozen[conn.connection_id] = conn
        return offered

    async def finish(self, connection_id: str, forward: Callable[[bytes], None]) -> bytes | None:
        conn = self._frozen.get(connection_id)
        if conn is None or not self.connections.is_live(conn) or conn.outbox.closed:
            # ended or closed while frozen (a slow consumer, the app's abort): nothing to hand over
            self._frozen.pop(connection_id, None)
            return None
        replay = conn.outbox.replay
        application: ConnectionApplication | None = conn.application
        if replay is None or application is None:
            self._frozen.pop(connection_id, None)
            return None
        state_now = application.export_for_move(conn)
        if isinstance(state_now, str):  # e.g. an upload stream started meanwhile
            self.abandon(connection_id)
            return None
        journal = conn.outbox.journal
        store = self.backplane.durable
        if journal is not None and store is not None and isinstance(journal, ConnectionJournal):
            # its record in Redis says everything delivered so far; the new holder goes on from it
            journal.touch()
            try:
                await asyncio.wait_for(store.drain(), self.takeovers.timeout / 2)
            except TimeoutError:
                self.abandon(connection_id)
                return None
            store.detach(journal, delete=False)
        # unregistered first: from here on nothing reaches it but what running hub methods send
        await application.release_moved(conn)
        tags = conn.outbox.tags or ()
        state = replay.export()
        ids = [tag for tag in tags if tag is not None]
        self.connections.release(conn, forward)
        self._frozen.pop(connection_id, None)  # only now: a request meanwhile finds it moving (409)
        # what hub methods still running for it here send goes on (and a forward from a holder
        # before this one, for a call still running there, follows it)
        self._released[connection_id] = (conn, time.monotonic())
        log.info(
            "connection %s handed over to another instance (%d messages unacknowledged)",
            connection_id,
            len(state.kept),
            extra={"connection_id": connection_id, "event": "moved_out"},
        )
        final = _Final(
            state.first_id, state.kept, state.next_receive_id, state.latest_received, ids, state_now
        )
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
            return
        released = self._released.get(connection_id)
        if released is not None:
            released[0].outbox.write(data)  # it moved on from here: forwarded to its holder

    def _prune(self) -> None:
        """Forget connections that moved on long ago (their hub methods here are done by now)."""
        limit = time.monotonic() - _FORWARD_FOR
        for cid in [c for c, (_, since) in self._released.items() if since < limit]:
            del self._released[cid]
            if self.connections.lookup(cid) is None:
                self._moved_from.pop(cid, None)

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
        self._prune()
        if self.is_moving(cid):
            return 409, ""  # another resume of it is under way here
        now = time.monotonic()
        if self._refused.get(cid, 0.0) > now:
            # refused moments ago: asking the whole cluster again (and waiting) is for nothing, and
            # a client replaying an old token must not make every instance work per upgrade
            return 404, texts.NO_CONNECTION
        self._adopting.add(cid)
        try:
            answer = await self._take_over(_Resume(endpoint, verified, token, request, principal), path)
        finally:
            self._adopting.discard(cid)
        if isinstance(answer, tuple) and answer[0] == 404:
            if len(self._refused) > 10_000:
                self._refused = {c: t for c, t in self._refused.items() if t > now}
            self._refused[cid] = time.monotonic() + _REFUSED_FOR
        return answer

    async def _take_over(self, resume: _Resume, path: str) -> Connection | tuple[int, str]:
        verified, token, principal = resume.verified, resume.token, resume.principal
        cid = verified.connection_id
        user = principal.identifier if principal is not None else None
        answer = await self.takeovers.request(cid, token_digest(token), user, path)
        if answer is None:
            if self.backplane.durable is not None:
                return await self.recover(resume)
            log.warning(
                "no instance handed over %s: resume refused, the client starts afresh",
                cid,
                extra={"connection_id": cid, "event": "resume_refused"},
            )
            return 404, texts.NO_CONNECTION
        if isinstance(answer, int):
            log.info(
                "instance holding %s refused to hand it over (%d): resume refused, the client starts afresh",
                cid,
                answer,
                extra={"connection_id": cid, "event": "resume_refused"},
            )
            return answer, (texts.RESUME_OTHER_USER if answer == 403 else "")
        return await self._adopt(resume, answer)

    async def _adopt(self, resume: _Resume, offer: Offer) -> Connection | tuple[int, str]:
        endpoint, verified, token, request, principal = resume
        cid = verified.connection_id
        conn = self.connections.adopt(verified, token, principal)
        self._moved_from[cid] = offer.origin
        try:
            hub_state = _offer_decoder.decode(offer.state).hub
            await endpoint.import_moved(conn, hub_state)
        except Exception as exc:  # the offer is untrusted input; our limits may be lower (groups)
            log.warning("cannot take %s over: %s", cid, exc)
            await self._undo(endpoint, conn)
            return 404, texts.NO_CONNECTION  # the holder's offer times out: it keeps the connection
        raw = await self.takeovers.commit(offer)
        final: _Final | None = None
        if raw is not None:
            try:
                final = _final_decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("malformed hand-over of %s: %s", cid, exc)
        replay = conn.outbox.replay
        if final is None or replay is None:
            await self._undo(endpoint, conn)
            return 404, texts.NO_CONNECTION
        # from here the old holder has let go: a failure ends the connection properly (its
        # on_disconnected runs here) instead of losing it between two instances
        try:
            # copies of what the old holder had may still be on their way here from other nodes
            # (sharded channels): after the barrier they are in, tagged, and dropped below
            await self.takeovers.bus.barrier(self.takeovers.timeout)
            if conn.outbox.closed or not self.connections.is_live(conn):
                raise _Unrecoverable("it was closed while it moved")
            await endpoint.refresh_moved(conn, final.hub)
            # the old holder's messages, then those that reached only this instance meanwhile
            theirs = {(origin, seq, channel) for origin, seq, channel in final.ids}
            mine = replay.taken()
            tags = conn.outbox.tags if conn.outbox.tags is not None else [None] * len(mine)
            if len(tags) != len(mine):
                raise _Unrecoverable("its messages and their ids do not match")
            later = [data for data, tag in zip(mine, tags, strict=True) if tag is None or tag not in theirs]
            state = ReplayState(final.first_id, final.kept, final.next_receive_id, final.latest_received)
            replay.restore(state, later)
            delivered = theirs | {tag for tag in tags if tag is not None}
            conn.outbox.tags = None
            try:
                await endpoint.finish_moved_in(conn, delivered)
            except Exception as exc:  # durable resume only: it goes on without its journal
                log.warning("connection %s moved here without a durable journal: %s", cid, exc)
        except Exception as exc:
            log.warning(
                "connection %s could not be carried on after its hand-over (%s): ended",
                cid,
                exc,
                extra={"connection_id": cid, "event": "moved_in_failed"},
            )
            conn.abort("hand-over failed")
            await self.connections.end(conn, exc)
            return 404, texts.NO_CONNECTION
        self.connections.activate(conn, websocket.FEATURES, request, principal)
        await self.backplane.reclaim_connection(cid)
        log.info(
            "connection %s taken over from another instance (%d messages to replay)",
            cid,
            replay.kept,
            extra={"connection_id": cid, "event": "moved_in"},
        )
        return conn

    # -- durable resume: the holder died ------------------------------------------------------------

    async def recover(self, resume: _Resume) -> Connection | tuple[int, str]:
        """Resume a connection whose holder died, from its journal, record and channel histories.

        Refused (404, the client starts a new connection) whenever the result
        could not be exact: no record (the gap outlived it), a journal with a
        hole, a holder still alive, a history longer than the read bound.
        """
        endpoint, verified, token, principal = (
            resume.endpoint,
            resume.verified,
            resume.token,
            resume.principal,
        )
        store = self.backplane.durable
        assert store is not None
        cid = verified.connection_id

        def refuse(why: str, status: int = 404) -> tuple[int, str]:
            log.warning(
                "cannot resume %s after its instance died (%s): the client starts afresh",
                cid,
                why,
                extra={"connection_id": cid, "event": "resume_refused"},
            )
            return status, texts.NO_CONNECTION if status == 404 else ""

        try:
            record = await store.read_record(cid)
        except Exception as exc:
            return refuse(f"Redis: {exc}")
        if record is None:
            return refuse("no durable record: never durable, ended, or the gap outlived it")
        if (
            not hmac.compare_digest(record.digest, token_digest(token))
            or record.hub != endpoint.backplane_name
        ):
            return refuse("the record is another connection's")
        state = record.state
        owner = state.get("user") if state is not None else None
        user = principal.identifier if principal is not None else None
        if owner is not None and user is None:
            return 401, ""
        if user is not None and owner != user:
            return 403, texts.RESUME_OTHER_USER
        if state is None:
            return refuse("its state could not be written", 409)
        if record.gapped:
            return refuse("its journal has a hole (Redis was unreachable while it was written)")
        if record.holder != self.takeovers.server_name and not await self._holder_gone(record.holder):
            return refuse("its instance is alive but did not hand it over", 409)
        if not await store.lock(cid):
            return refuse("another instance is recovering it", 409)
        try:
            # read again: it may have changed while the lease ran out (never act on an old one)
            fresh = await store.read_record(cid)
            if fresh is None or fresh.holder != record.holder or fresh.gapped or fresh.state is None:
                return refuse("its record changed while its instance's lease ran out")
            return await self._recover_locked(resume, fresh)
        finally:
            with contextlib.suppress(Exception):
                await store.unlock(cid)

    async def _holder_gone(self, holder: str) -> bool:
        """Wait (bounded by the lease TTL) until the holder's lease is gone: never two holders."""
        deadline = time.monotonic() + self.backplane.lease_ttl + 1.0
        while await self.backplane.instance_alive(holder):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def _recover_locked(self, resume: _Resume, record: Record) -> Connection | tuple[int, str]:
        endpoint, verified, token, request, principal = resume
        store = self.backplane.durable
        assert store is not None and record.state is not None
        cid = verified.connection_id
        conn = self.connections.adopt(verified, token, principal)
        try:
            # subscribed first: what is published from now on arrives live; before, it is in a history
            await endpoint.import_moved(conn, record.state)
            replay = conn.outbox.replay
            assert replay is not None
            entries = await store.read_journal(cid, 100_000)
            if any(seq != entries[0][0] + i for i, (seq, _, _) in enumerate(entries)):
                raise _Unrecoverable("its journal has a hole")
            first_id = entries[0][0] if entries else record.acked + 1
            marks = dict(record.marks)
            delivered: set[Tag] = set()
            for _, _, tag in entries:
                if tag is not None:
                    delivered.add(tag)
                    key = mark_key(tag[0], tag[2])
                    marks[key] = max(marks.get(key, 0), tag[1])
            user = record.state.get("user")
            groups = record.state.get("groups") or []
            channels = endpoint.channels_of(cid, user if isinstance(user, str) else None, groups)
            protocol = str(record.state.get("protocol"))
            since = record.written_ms - _HISTORY_MARGIN_MS
            has_user = isinstance(user, str)
            budget = _RECOVERY_READ_BYTES - sum(len(data) for _, data, _ in entries)
            per_origin = await self._missed(
                store, cid, channels, protocol, since, marks, record.joined, has_user, budget
            )
            # what arrived live meanwhile, unless a history or the journal had it: the newest of all
            # (after the barrier every live copy of what the histories held is in, tagged)
            await store.bus.barrier(self.takeovers.timeout)
            mine = replay.taken()
            tags = conn.outbox.tags if conn.outbox.tags is not None else [None] * len(mine)
            if len(tags) != len(mine):
                raise _Unrecoverable("its live messages and their ids do not match")
            seen = delivered | {item[2] for items in per_origin.values() for item in items}
            now_ms = int(time.time() * 1000)
            untagged: list[bytes] = []
            for data, tag in zip(mine, tags, strict=True):
                if tag is None:
                    untagged.append(data)  # no id (a .NET sender): as it came
                elif tag not in seen:
                    seen.add(tag)
                    per_origin.setdefault(tag[0], []).append((now_ms, tag[1], tag, data))
            # each sender's messages in its own order whichever way they came; senders by time
            missed = self._merge(per_origin)
            delivered = seen
            frames = [data for _, data, _ in entries] + [data for _, data in missed] + untagged
            replay.restore(ReplayState(first_id, frames, record.next_receive_id, record.latest_received), [])
            await endpoint.finish_moved_in(conn, delivered)
            conn.outbox.tags = None
        except Exception as exc:  # what Redis holds is untrusted: anything unexpected is a refusal
            if not isinstance(exc, (_Unrecoverable, ValueError)):
                log.exception("durable resume of %s failed", cid)
            await self._undo(endpoint, conn)
            log.warning(
                "cannot resume %s after its instance died (%s): the client starts afresh",
                cid,
                exc,
                extra={"connection_id": cid, "event": "resume_refused"},
            )
            return 404, texts.NO_CONNECTION
        except BaseException:
            await self._undo(endpoint, conn)
            raise
        self.connections.activate(conn, websocket.FEATURES, request, principal)
        await self.backplane.reclaim_connection(cid)
        self.recovered += 1
        log.warning(
            "connection %s resumed here after its instance died (%d journaled, %d from channel histories)",
            cid,
            len(entries),
            len(missed),
            extra={"connection_id": cid, "event": "recovered"},
        )
        return conn

    @staticmethod
    async def _missed(
        store: DurableStore,
        connection_id: str,
        channels: list[str],
        protocol: str,
        since_ms: int,
        marks: dict[str, int],
        joined: dict[str, int],
        has_user: bool,
        budget: int,
    ) -> dict[str, list[tuple[int, int, Tag, bytes]]]:
        """History messages of the connection's channels its dead holder never delivered.

        A (sender, channel) pair's messages reached the holder in order, so the
        ones after the last delivered were not; for a pair never delivered from,
        those after the connection joined the channel. In order per sender.
        """
        per_origin: dict[str, list[tuple[int, int, Tag, bytes]]] = {}
        # the connection's own channel and its user's (exclusions name other connections of sends
        # to all or to groups only)
        personal = set(channels[1 : 3 if has_user else 2])
        for channel in channels:
            history = await store.read_history(channel, since_ms)
            if history is None:
                raise _Unrecoverable(f"the history of {channel} since then is longer than the read bound")
            budget -= sum(len(envelope) for _, envelope in history)
            if budget < 0:
                raise _Unrecoverable("its journal and histories are larger than the read bound")
            individual = channel in personal
            for ms, envelope in history:
                try:
                    inv = decode_invocation(envelope)
                except InvalidDataError:
                    continue
                if inv.origin is None or inv.seq is None or inv.invocation_id is not None:
                    continue  # no id to tell (a .NET sender), or a client-result request (timed out)
                if connection_id in inv.excluded and not individual:
                    continue
                mark = marks.get(mark_key(inv.origin, channel))
                if mark is not None and inv.seq <= mark:
                    continue
                if mark is None and ms < joined.get(channel, 0):
                    continue  # sent before the connection joined the channel
                data = inv.serializations.get(protocol)
                if data is None:
                    continue
                tag = (inv.origin, inv.seq, channel)
                per_origin.setdefault(inv.origin, []).append((ms, inv.seq, tag, data))
        return per_origin

    @staticmethod
    def _merge(per_origin: dict[str, list[tuple[int, int, Tag, bytes]]]) -> list[tuple[Tag, bytes]]:
        """Each sender's messages in the order of its numbers; senders interleaved by time."""
        queues = [sorted(items, key=lambda item: item[1]) for items in per_origin.values()]
        out: list[tuple[Tag, bytes]] = []
        heads = [(queue[0][0], n, 0) for n, queue in enumerate(queues) if queue]
        heapq.heapify(heads)
        while heads:
            _, n, i = heapq.heappop(heads)
            item = queues[n][i]
            out.append((item[2], item[3]))
            if i + 1 < len(queues[n]):
                heapq.heappush(heads, (queues[n][i + 1][0], n, i + 1))
        return out

    async def _undo(self, endpoint: ConnectionApplication, conn: Connection) -> None:
        self._moved_from.pop(conn.connection_id, None)
        try:
            await endpoint.abandon_moved(conn)
        finally:
            self.connections.drop_adopted(conn)
