"""The short soak (``python -m bench.soak`` for 18 s with 200 connections; the 10-minute run is manual).

Churn of 20 connects and disconnects a second, broadcasts and group sends throughout, over the
Redis backplane: no delivery due to a connected client may be lost or disordered, no client dropped,
and afterwards the server is back to its baseline (no connection, its own tasks and subscriptions
only, as Redis also counts them); RSS may not grow more than 20 MB after the warm-up.
"""

from __future__ import annotations

import json
import os
import subprocess

from .conftest import PYTHON, ROOT, RedisServer

SECONDS = 18
CONNECTIONS = 200


def test_short_soak(redis_server: RedisServer) -> None:
    args = [
        "--seconds",
        str(SECONDS),
        "--connections",
        str(CONNECTIONS),
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
        "--serving",
        os.environ.get("HUBWIRE_SERVING", "native"),
    ]
    done = subprocess.run(
        [PYTHON, "-m", "bench.soak", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.stdout, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["problems"] == [], (report, done.stderr[-3000:])
    assert done.returncode == 0
    assert report["lost"] == 0 and report["disordered"] == 0 and report["dropped_by_server"] == 0
    # the load ran (at least one send of each kind a second: a tenth and a twentieth of the rates asked,
    # so a slow machine passes), and what was due follows from what was actually sent: each send was
    # addressed to the clients connected when it started, of which those that joined during it or left
    # within the grace are not due (churn 20/s x 2 s of 200 clients: about a fifth); never under half
    assert report["broadcasts_sent"] >= SECONDS and report["group_sends"] >= SECONDS, report
    assert report["addressed"] >= report["broadcasts_sent"] * CONNECTIONS // 2, report
    assert report["due"] >= 0.5 * report["addressed"], report
    assert report["deliveries"] >= report["due"]  # nothing was lost: everything due arrived
    # every client opened was closed again: the first 200 and one per churn cycle (at least one a second)
    assert report["churn_cycles"] >= SECONDS, report
    assert report["connects"] == report["disconnects"] == CONNECTIONS + report["churn_cycles"], report
    assert report["server_connections_after_close"] == 0
    assert report["tasks"]["after_close"] <= report["tasks"]["baseline"]
    subs = report["subscriptions"]
    assert subs["after_close"] == subs["baseline"] == subs["redis_after_close"]
    assert report["rss_growth_after_warmup_mb"] < 20
