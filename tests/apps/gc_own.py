"""The stateful test app, plus thresholds of its own for the garbage collector (set on import, as an
app tuning its process would): ``hubwire run`` must keep them."""

import gc

from tests.apps.stateful import app

gc.set_threshold(1000, 15, 15)

__all__ = ["app"]
