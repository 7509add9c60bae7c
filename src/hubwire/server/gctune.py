"""The cyclic garbage collector's thresholds for a serving process (``HUBWIRE_GC_THRESHOLD``).

Why: a server holding many connections has a large, long-lived object graph (some 25 tracked
objects per connection: its transport, protocol, outbox, context, parser...). CPython collects
the oldest generation whenever a tenth of the young collections have run *and* what moved to it
since the last full collection is a quarter of what lives there, so while connections are
arriving it walks the whole graph again and again: measured on one instance holding 10,000 of
20,000 bench clients, one full collection took 0.24 s of CPU and paused the event loop for
0.2-0.5 s, six of them ran while the clients connected and joined their rooms, and they were a
fifth of the instance's CPU in that time. Requiring 100 middle-generation collections between
two full ones (``700,10,100`` instead of Python's ``700,10,10``) let none run then: 0.3 s of
collection in all instead of 1.25 s, no pause above 35 ms, and about 20 % less server CPU for
connecting and joining (``bench/RESULTS.md``). Young collections are unchanged, so short-lived
cycles are freed as soon as before; garbage that reached the oldest generation waits longer.

``hubwire run`` sets the variable (``--gc-threshold``, default ``700,10,100``); any process
serving a :class:`~hubwire.HubServer` applies it when the server starts, so a plain ``uvicorn``
run can opt in by setting it. Unset, or ``python``, leaves Python's own thresholds; so does an
app that set its own after importing hubwire (its choice wins), and so does Python 3.14 and
later, whose collector is incremental and ignores the third threshold.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

__all__ = ["DEFAULT_GC_THRESHOLD", "apply_env_gc_threshold", "parse_gc_threshold"]

log = logging.getLogger("hubwire.server")

DEFAULT_GC_THRESHOLD = "700,10,100"
_KEEP = "python"
#: what gc.set_threshold takes (a C int)
_MAX = 2**31 - 1
#: the thresholds before the app was imported: different ones at startup are the app's own
_BEFORE_APP = gc.get_threshold()
#: 3.14's incremental collector ignores the third threshold, the one this is about
_APPLIES = sys.version_info < (3, 14)


def parse_gc_threshold(raw: str) -> tuple[int, int, int] | None:
    """``G0,G1,G2`` as three positive integers, or None for ``python`` (keep Python's).

    Zero is refused: ``gc.set_threshold(0)`` turns automatic collection off, and a server that
    never collects leaks every reference cycle it drops.
    """
    text = raw.strip()
    if text.lower() == _KEEP:
        return None
    parts = text.split(",")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1 or max(values) > _MAX:
        raise ValueError(
            f"a GC threshold is three positive integers G0,G1,G2 up to {_MAX} (e.g. "
            f"{DEFAULT_GC_THRESHOLD}) or {_KEEP!r}, got {raw!r}"
        )
    return values[0], values[1], values[2]


def apply_env_gc_threshold() -> tuple[int, int, int] | None:
    """Set the thresholds ``HUBWIRE_GC_THRESHOLD`` names; what was set, or None (left alone)."""
    raw = os.environ.get("HUBWIRE_GC_THRESHOLD")
    if not raw:
        return None
    try:
        threshold = parse_gc_threshold(raw)
    except ValueError as exc:
        log.warning("HUBWIRE_GC_THRESHOLD ignored: %s", exc)
        return None
    if threshold is None or not _APPLIES:
        return None
    current = gc.get_threshold()
    if current == threshold:
        return threshold
    if current != _BEFORE_APP:
        log.info("GC thresholds %s set by the app kept (HUBWIRE_GC_THRESHOLD %s not applied)", current, raw)
        return None
    gc.set_threshold(*threshold)
    log.info("GC thresholds %s,%s,%s (hubwire run --gc-threshold, HUBWIRE_GC_THRESHOLD)", *threshold)
    return threshold
