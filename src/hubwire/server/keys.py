"""The key of connection tokens and relay messages, agreed by every instance of the app.

Why a readiness state: an instance that cannot agree on the key (Redis
unreachable at startup, no ``HUBWIRE_SECRET``) would otherwise sign with a key
of its own, and connections negotiated on it would be refused elsewhere (404).
Instead it is not ready: negotiate and transport requests get ``503`` with a
clear text, a health endpoint says so, and it keeps trying until it agrees.
"""

from __future__ import annotations

import asyncio
import logging

from ..backplane.base import Backplane, BackplaneUnavailable
from ..connections.tasks import cancel_and_wait
from ..connections.tokens import TokenIssuer

__all__ = ["KeyAgreement"]

log = logging.getLogger("hubwire.server")


class KeyAgreement:
    """Applies the backplane's token keys to the token issuer and the relay; knows if it could."""

    def __init__(self, backplane: Backplane, issuer: TokenIssuer, retry_interval: float = 1.0) -> None:
        self.backplane = backplane
        self.issuer = issuer
        self.retry_interval = retry_interval
        self.ready = True
        #: why not ready (empty when ready)
        self.reason = ""
        self._retrying: asyncio.Task[None] | None = None

    async def agree(self) -> bool:
        """Get the keys and use them; False (and not ready) when the backplane cannot tell now."""
        try:
            keys = await self.backplane.token_keys()
        except BackplaneUnavailable as exc:
            if self.ready:
                log.error("not ready: %s; retrying every %gs", exc, self.retry_interval)
            self.ready, self.reason = False, str(exc)
            return False
        if keys:
            self.issuer.use_keys(keys)
        relay = self.backplane.relay
        if relay is not None:  # relay messages are sealed with the app's key
            relay.set_keys((self.issuer.secret, *self.issuer.previous))
        takeovers = self.backplane.takeovers
        if takeovers is not None:  # and so are connection take-overs
            takeovers.set_keys((self.issuer.secret, *self.issuer.previous))
        if not self.ready:
            log.warning("ready: the token key is agreed")
        self.ready, self.reason = True, ""
        return True

    def retry_in_background(self) -> None:
        """Keep asking until the keys are agreed; :meth:`stop` ends it (shutdown waits on no Redis)."""
        if self._retrying is None or self._retrying.done():
            loop = asyncio.get_running_loop()
            self._retrying = loop.create_task(self.until_agreed(), name="token key agreement")

    async def stop(self) -> None:
        if self._retrying is not None:
            await cancel_and_wait([self._retrying], what="token key agreement")
            self._retrying = None

    async def until_agreed(self) -> None:
        """Retry until the keys are agreed (a background task of a server that is not ready)."""
        while True:
            try:
                if await self.agree():
                    return
            except Exception:  # never end silently: the server would stay not ready for good
                log.exception("token key agreement failed; retrying")
            await asyncio.sleep(self.retry_interval)
