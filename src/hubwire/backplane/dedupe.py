"""Which (origin, sequence number) pairs a receiver has already seen: drop backplane duplicates.

Why duplicates happen at all: the bus removes a message from its outage
buffer only once Redis has answered its PUBLISH. When the answer is lost (a
timeout, a connection reset, Redis killed after fanning the batch out but
before replying) the batch is published again, and subscribers that got the
first copy get a second one. Each envelope therefore carries its origin (the
sending instance's server name) and a per-origin sequence number, and a
receiver remembers the numbers it has seen.

Bounded memory: per origin a bitmap of ``2 * window`` bits (16 KiB for the
default 65,536) covering at least the last ``window`` sequence numbers below
the highest seen; numbers older than that cannot be told apart and are
accepted (at least once, never lost: a re-published batch is at most one batch
behind, 1,000 messages in today's bus, far inside the window). Origins not
heard from for ``forget_after`` seconds (to a quarter more) are forgotten (an
instance that stopped, or restarted under a new server name), so a repeat
arriving later than that, after an outage of over an hour, would be delivered
again. At most ``max_origins`` are kept (the least recently heard goes first):
16 MiB at the very most with the defaults, 16 KiB per live instance in
practice. Gaps in the numbers are normal: an instance only receives the
channels it subscribes to.

Sans-I/O except for the injectable clock; one instance per id space (e.g. a
hub's invocations, a hub's group commands).
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Deduplicator"]


class _Window:
    """Seen bits for sequence numbers ``base .. base + 8 * len(bits) - 1`` of one origin."""

    __slots__ = ("base", "bits", "heard")

    def __init__(self, base: int, size_bits: int, heard: float) -> None:
        self.base = base
        self.bits = bytearray(size_bits // 8)
        self.heard = heard


class Deduplicator:
    """``first_time(origin, seq)`` is True once per pair within the window, False for repeats."""

    def __init__(
        self,
        window: int = 65_536,
        *,
        forget_after: float = 3600.0,
        max_origins: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window <= 0 or window % 8:
            raise ValueError("window must be a positive multiple of 8")
        self.window = window
        self.forget_after = forget_after
        self.max_origins = max_origins
        self._clock = clock
        self._origins: dict[str, _Window] = {}
        self._sweep_every = forget_after / 4
        self._next_sweep = clock() + self._sweep_every
        #: repeats dropped, and numbers accepted because they were older than the window
        self.duplicates = 0
        self.too_old = 0

    def __len__(self) -> int:
        """How many origins are remembered."""
        return len(self._origins)

    def first_time(self, origin: str, seq: int) -> bool:
        """Record ``seq`` of ``origin``; False when it was recorded before (a duplicate)."""
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        win = self._origins.get(origin)
        if win is None:
            win = self._new_window(origin, seq, now)
        win.heard = now
        index = seq - win.base
        if index < 0:
            self.too_old += 1
            return True
        if index >= 8 * len(win.bits):
            self._advance(win, seq)
            index = seq - win.base
        byte, mask = index >> 3, 1 << (index & 7)
        if win.bits[byte] & mask:
            self.duplicates += 1
            return False
        win.bits[byte] |= mask
        return True

    def _new_window(self, origin: str, seq: int, now: float) -> _Window:
        if len(self._origins) >= self.max_origins:
            oldest = min(self._origins, key=lambda o: self._origins[o].heard)
            del self._origins[oldest]
        # byte-aligned base a window below the first number, so late ones below it are tracked too
        win = _Window(((seq - self.window) // 8) * 8, 2 * self.window, now)
        self._origins[origin] = win
        return win

    def _advance(self, win: _Window, seq: int) -> None:
        """Slide so ``seq`` sits a window above the base (keeping the window below it)."""
        new_base = ((seq - self.window) // 8) * 8
        shift = (new_base - win.base) // 8
        size = len(win.bits)
        if shift >= size:
            win.bits[:] = bytes(size)
        else:
            win.bits[: size - shift] = win.bits[shift:]
            win.bits[size - shift :] = bytes(shift)
        win.base = new_base

    def _sweep(self, now: float) -> None:
        """Forget origins silent for ``forget_after`` (looked for every quarter of that period)."""
        self._next_sweep = now + self._sweep_every
        for origin in [o for o, w in self._origins.items() if now - w.heard >= self.forget_after]:
            del self._origins[origin]
