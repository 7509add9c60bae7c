"""What both emitters share: targets, envelopes and group commands, made exactly as a server makes them.

Sans-I/O (the Redis side is in :mod:`.sync` and :mod:`.aio`). A send is framed once per protocol
with the server's own code (:class:`~hubwire.hubs.lifetime.SerializedMessage` over the built-in JSON
and MessagePack protocols) and put into the server's envelope
(:func:`~hubwire.protocol.backplane.encode_invocation`), so a server cannot tell an emitter's message
from another instance's.

Identity, and why it matters: every envelope carries ``origin`` (this emitter's own name) and a
sequence number, and every group command a (name, ack id) pair, because the servers drop a pair they
have already seen (``backplane/dedupe.py``). redis-py retries a command whose connection failed; a
retried PUBLISH repeats the same bytes, and the servers deliver it once. The name is made again in
a forked child (Celery's prefork pool forks workers after the app, and maybe its emitter, was
imported): two processes counting from the same name and number would have the second's messages
dropped as repeats of the first's.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..hubs.lifetime import SerializedMessage
from ..protocol.backplane import (
    GROUP_ADD,
    BackplaneChannels,
    GroupCommand,
    RedisInvocation,
    decode_ack,
    encode_group_command,
    encode_invocation,
)
from ..protocol.base import EncHook, HubProtocol
from ..protocol.errors import InvalidDataError
from ..protocol.json_protocol import JsonHubProtocol
from ..protocol.messagepack_protocol import MessagePackHubProtocol
from ..protocol.messages import InvocationMessage

__all__ = ["EmitterCore", "GroupRequest", "TargetFactory"]

#: Redis's answer to PUBLISH / SPUBLISH: how many subscriptions (server instances) got the message
Receivers = int
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class GroupRequest:
    """One group add/remove: the command to publish and the acknowledgement to wait for."""

    channel: str
    payload: bytes
    ack_channel: str
    ack_id: int
    action: int
    connection_id: str
    group: str

    def is_ack(self, data: object) -> bool:
        """``data`` (a message on the ack channel, from Redis: untrusted) acknowledges this request."""
        if not isinstance(data, bytes):
            return False
        try:
            return decode_ack(data) == self.ack_id
        except InvalidDataError:
            return False

    def timeout(self, seconds: float) -> TimeoutError:
        verb, where = ("add", "to") if self.action == GROUP_ADD else ("remove", "from")
        return TimeoutError(
            f"Could not {verb} connection '{self.connection_id}' {where} group '{self.group}': no server "
            f"instance acknowledged within {seconds:g}s (no instance holds that connection, it is in "
            "as many groups as it may be, or its instance cannot reach Redis)."
        )


def _ids(values: Iterable[str]) -> tuple[str, ...]:
    """One id or several, as the server's ``HubClients`` takes them (a lone string is one id)."""
    if isinstance(values, str):
        return (values,)
    return tuple(values)


class EmitterCore:
    """Channel names, this emitter's identity and counters, and the bytes to publish. Thread-safe."""

    def __init__(self, channel_prefix: str, hub: str, enc_hook: EncHook | None = None) -> None:
        if not hub:
            raise ValueError("hub must name the hub (its backplane name: the class name by default)")
        self.channels = BackplaneChannels(channel_prefix, hub)
        #: the protocols a server serializes for by default (HubOptions.supported_protocols)
        self.protocols: Sequence[HubProtocol] = (JsonHubProtocol(enc_hook), MessagePackHubProtocol(enc_hook))
        self._lock = threading.Lock()
        self._pid = 0
        self._name = ""
        self._seq = 0
        self._ack_id = 0

    def _identity(self) -> None:
        """A fresh name per process (called under the lock)."""
        pid = os.getpid()
        if pid != self._pid:
            self._pid = pid
            self._name = f"{socket.gethostname()}_emitter_{uuid.uuid4().hex}"
            self._seq = 0
            self._ack_id = 0

    @property
    def name(self) -> str:
        """The ``origin`` of this process's envelopes and the server name of its group commands."""
        with self._lock:
            self._identity()
            return self._name

    def invocations(
        self, channels: Sequence[str], method: str, args: Sequence[Any], excluded: Sequence[str] = ()
    ) -> list[tuple[str, bytes]]:
        """(channel, envelope) per channel: the message framed once per protocol, one number each
        (one instance getting two of them, a member of two groups, must not take one for a repeat)."""
        if not isinstance(method, str) or not method:
            raise ValueError("method must be a non-empty string (the client method's name)")
        if not channels:
            return []
        message = SerializedMessage(InvocationMessage(method, list(args)))
        serializations = message.serialize_all(self.protocols)
        out = []
        with self._lock:
            self._identity()
            for channel in channels:
                self._seq += 1
                envelope = RedisInvocation(serializations, list(excluded), origin=self._name, seq=self._seq)
                out.append((channel, encode_invocation(envelope)))
        return out

    def group_request(self, action: int, connection_id: str, group: str) -> GroupRequest:
        if not isinstance(connection_id, str) or not isinstance(group, str):
            raise TypeError("connection_id and group must be strings")
        with self._lock:
            self._identity()
            self._ack_id = (self._ack_id % 0x7FFFFFFF) + 1  # the servers' ack ids are int32
            name, ack_id = self._name, self._ack_id
        command = GroupCommand(ack_id, name, action, group, connection_id)
        return GroupRequest(
            self.channels.group_management,
            encode_group_command(command),
            self.channels.ack(name),
            ack_id,
            action,
            connection_id,
            group,
        )


class TargetFactory(Generic[T]):
    """The targets of ``hub_context.clients``, by name; subclasses say what a target is (``_target``).

    ``groups`` is not here: on an emitter it is both the ``groups(names)`` target and the group
    manager (``groups.add`` / ``groups.remove``), an object of each emitter's own.
    """

    _core: EmitterCore

    def _target(self, channels: tuple[str, ...], excluded: tuple[str, ...] = ()) -> T:
        raise NotImplementedError

    @property
    def all(self) -> T:
        """Every connection of the hub, on every instance."""
        return self._target((self._core.channels.all,))

    def all_except(self, connection_ids: Iterable[str]) -> T:
        return self._target((self._core.channels.all,), _ids(connection_ids))

    def client(self, connection_id: str) -> T:
        return self.clients((connection_id,))

    def clients(self, connection_ids: Iterable[str]) -> T:
        ids = dict.fromkeys(_ids(connection_ids))
        return self._target(tuple(self._core.channels.connection(cid) for cid in ids))

    def group(self, name: str) -> T:
        return self._group_target((name,))

    def group_except(self, name: str, connection_ids: Iterable[str]) -> T:
        return self._group_target((name,), _ids(connection_ids))

    def user(self, user_id: str) -> T:
        """Every connection of one user (the ``user_identifier`` the servers gave them)."""
        return self.users((user_id,))

    def users(self, user_ids: Iterable[str]) -> T:
        users = dict.fromkeys(_ids(user_ids))
        return self._target(tuple(self._core.channels.user(uid) for uid in users))

    def _group_target(self, names: Iterable[str], excluded: tuple[str, ...] = ()) -> T:
        """Groups as the server's ``send_groups`` takes them: each once, empty names skipped."""
        groups = [g for g in dict.fromkeys(_ids(names)) if g]
        return self._target(tuple(self._core.channels.group(g) for g in groups), excluded)
