"""The short soak (``python -m bench.soak`` for 25 s with 200 connections; the 10-minute run is manual).

Churn of 20 connects and disconnects a second, broadcasts and group sends throughout, over the
Redis backplane: no delivery due to a connected client may be lost or disordered, no client dropped,
and afterwards the server is back to its baseline (no connection, its own tasks and subscriptions
only, as Redis also counts them); RSS may not grow more than 20 MB after the warm-up.
"""

from __future__ import annotations

import json
import subprocess

from .conftest import PYTHON, ROOT, RedisServer


def test_short_soak(redis_server: RedisServer) -> None:
    args = [
        "--seconds",
        "25",
        "--connections",
        "200",
        "--churn",
        "20",
        "--broadcast-rate",
        "10",
        "--group-rate",
        "20",
        "--groups",
        "10",
        "--redis",
        redis_server.url,
    ]
    done = subprocess.run(
        [PYTHON, "-m", "bench.soak", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.stdout, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["problems"] == [], (report, done.stderr[-3000:])
    assert done.returncode == 0
    assert report["lost"] == 0 and report["disordered"] == 0 and report["dropped_by_server"] == 0
    assert report["due"] > 100_000 * 0.3  # 200 clients x (10 + 2) messages a second, minus churn
    assert report["connects"] >= 200 + 20 * 25 * 0.8
    assert report["server_connections_after_close"] == 0
    assert report["tasks"]["after_close"] <= report["tasks"]["baseline"]
    subs = report["subscriptions"]
    assert subs["after_close"] == subs["baseline"] == subs["redis_after_close"]
    assert report["rss_growth_after_warmup_mb"] < 20
