"""Connection ids and tokens that any instance sharing the secret can verify.

Why: behind a round-robin load balancer, negotiate may land on instance A and
the transport request on instance B. Instead of sharing negotiate state (or
requiring sticky sessions), the id/token handed out by negotiate is signed, so
B can check that some instance of this app issued it recently and take the
connection over. Secrets are per app (the Redis backplane shares one per
channel prefix), so tokens of one app are useless in another.

Formats (base64url, no padding):

* negotiate v1 ``connectionId``: 16 random bytes (22 chars), public.
  ``connectionToken``: ``id(16) | issued(4) | mac(16)`` (48 chars), secret;
  the connection id is *inside* the token, but the token cannot be derived
  from the id without the secret.
  A connection granted stateful reconnect at negotiate gets
  ``id(16) | issued(4) | flags(1) | mac(16)`` (50 chars) instead, so the
  instance that takes it over knows it may resume (the flag is signed).
* negotiate v0 (Python clients) uses the id as the token, so the id itself is
  verifiable: ``issued(4) | random(6) | mac(6)`` (22 chars).

Tokens are accepted by other instances only within ``max_age`` seconds of
issue (the window in which a client connects after negotiating).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
import time
from dataclasses import dataclass

__all__ = ["TokenIssuer", "VerifiedToken", "derive_key"]


def derive_key(secret: bytes, channel_prefix: str) -> bytes:
    """The token key of one app (channel prefix) from a configured secret (HKDF-SHA256, RFC 5869).

    Why: one ``HUBWIRE_SECRET`` may serve several apps; each gets its own key, so a token of one
    app is refused by another, and the secret itself is never used (or stored) as a key.
    """
    prk = hmac.new(b"hubwire token key v1", secret, hashlib.sha256).digest()  # extract
    return hmac.new(prk, b"tokens:" + channel_prefix.encode() + b"\x01", hashlib.sha256).digest()  # expand


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        return None


#: token flag: negotiate granted stateful reconnect
FLAG_STATEFUL = 0x01


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """What a valid token says: which connection, which negotiate version, stateful reconnect."""

    connection_id: str
    negotiate_version: int
    stateful: bool = False


class TokenIssuer:
    """Issues and verifies connection ids/tokens with an HMAC key."""

    def __init__(self, secret: bytes | None = None, max_age: float = 30.0) -> None:
        self.secret = secret or secrets.token_bytes(32)
        #: keys still accepted for verification while a new secret rolls out (rotation)
        self.previous: tuple[bytes, ...] = ()
        self.max_age = max_age

    def use_keys(self, keys: tuple[bytes, ...]) -> None:
        """Sign with ``keys[0]``; accept tokens signed with any of them."""
        self.secret, self.previous = keys[0], tuple(keys[1:])

    def _mac(self, data: bytes, size: int) -> bytes:
        return hmac.new(self.secret, data, hashlib.sha256).digest()[:size]

    def issue(
        self, negotiate_version: int, now: float | None = None, stateful: bool = False
    ) -> tuple[str, str]:
        """A fresh ``(connection_id, token)``; for v0 both are the same string.

        ``stateful`` (v1 only) marks the token of a connection granted stateful reconnect.
        """
        issued = struct.pack(">I", int(now if now is not None else time.time()) & 0xFFFFFFFF)
        if negotiate_version > 0:
            raw_id = secrets.token_bytes(16)
            body = raw_id + issued + (bytes((FLAG_STATEFUL,)) if stateful else b"")
            return _b64(raw_id), _b64(body + self._mac(body, 16))
        body = issued + secrets.token_bytes(6)
        connection_id = _b64(body + self._mac(body, 6))
        return connection_id, connection_id

    def verify(self, token: str, now: float | None = None, check_age: bool = True) -> VerifiedToken | None:
        """The connection a token stands for, or None (forged, foreign, expired, malformed).

        ``check_age=False`` only checks the signature: enough to route a request to
        the instance that already holds the connection, never to create one.
        """
        if len(token) not in (22, 48, 50):
            return None
        raw = _unb64(token)
        if raw is None or _b64(raw) != token:  # only the canonical spelling: one string per token
            return None
        flags = 0
        if len(raw) in (36, 37):
            body, mac, issued, version = raw[:-16], raw[-16:], raw[16:20], 1
            connection_id = _b64(raw[:16])
            if len(raw) == 37:
                flags = raw[20]
                if flags != FLAG_STATEFUL:
                    return None
        elif len(raw) == 16:
            body, mac, issued, version = raw[:10], raw[10:], raw[:4], 0
            connection_id = token
        else:
            return None
        if not any(
            hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest()[: len(mac)], mac)
            for key in (self.secret, *self.previous)
        ):
            return None
        age = (now if now is not None else time.time()) - struct.unpack(">I", issued)[0]
        if check_age and not -5 <= age <= self.max_age:
            return None
        return VerifiedToken(connection_id, version, bool(flags & FLAG_STATEFUL))
