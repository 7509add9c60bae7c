"""PNG plots of one bench/run.py run, from the same results as its markdown table.

Why pictures: the table has a dozen ratio columns; a reader comparing servers wants to see at a
glance where each one spends CPU and how its latency is spread, not only its p99. Three files:

- ``bench-cpu.png``: server CPU µs per delivery, per server, for each client count of the fan-out
  and group phases (left, log scale) and each row of the rooms phase (right); values on the bars;
- ``bench-latency-cdf.png``: the delivery latency CDF of the fixed-rate latency phase, one panel
  per client count, one line per server;
- ``bench-rooms-cdf.png``: the same for each row of the rooms phase.

``python -m bench.plots REPORT.json [DIR]`` draws them again from the ``.json`` bench/run.py writes
next to its ``--output`` report (into DIR, default the JSON's directory).

The CDFs come from the load generators' quantile points (``LATENCY_POINTS`` per worker, weighted by
each worker's sample count), every point of the tail kept. matplotlib is a bench dependency
(bench/setup.sh), not one of hubwire's; it draws with the Agg backend (no display).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.run import Result, ServerReport

#: one colour per server, the same in every plot
COLOURS = {
    "hubwire": "#1f77b4",
    "socketio-node": "#ff7f0e",
    "socketio-py": "#2ca02c",
    "picows": "#7f7f7f",
    "picows-batch": "#17becf",
}


def _short(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 and n >= 1000 else str(n)


def write_plots(reports: list[ServerReport], args: argparse.Namespace, directory: Path) -> list[Path]:
    """Write the plots this run has data for into ``directory``; returns their paths."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    directory.mkdir(parents=True, exist_ok=True)
    subtitle = (
        f"{os.cpu_count()} cores, {args.duration:g}s phases, latency phase at {args.latency_rate:,.0f} "
        f"deliveries/s, rooms of {args.rooms_size} for {args.rooms_duration:g}s"
    )
    written: list[Path] = []

    # -- CPU per delivery ---------------------------------------------------------------------------
    broadcast_cats: list[tuple[str, Any]] = []
    for n in args.clients:
        broadcast_cats.append((f"fan-out {_short(n)}", lambda r, n=n: r.fanout.get(n)))
        broadcast_cats.append((f"group {_short(n)}", lambda r, n=n: r.group.get(n)))
    room_labels = [spec.label for spec in args.rooms]
    rooms_cats: list[tuple[str, Any]] = []
    for label in room_labels:
        clients, _, rate = label.partition("x")
        rooms_cats.append(
            (f"{_short(int(clients))} clients\n{rate}/s per room", lambda r, k=label: _rooms_result(r, k))
        )
    panels = []
    for title, cats in (
        ("fan-out / group: CPU µs per delivery", broadcast_cats),
        ("many small rooms: CPU µs per delivery", rooms_cats),
    ):
        cats = [(c, get) for c, get in cats if any(get(r) is not None for r in reports)]
        values = [
            get(r).us_per_delivery for r in reports for _, get in cats if get(r) and get(r).us_per_delivery
        ]
        if values:
            # log when one server is many times another (the Python reference): linear would flatten
            # the rest; the bars then start at 1 µs
            panels.append((title, cats, max(values) > 8 * min(values)))
    if panels:
        fig, axes = plt.subplots(
            1, len(panels), figsize=(7.5 * len(panels), 4.6), squeeze=False, constrained_layout=True
        )
        for ax, (title, cats, log) in zip(axes[0], panels, strict=True):
            shown = [r for r in reports if any(get(r) is not None for _, get in cats)]
            width = 0.8 / max(1, len(shown))
            for k, rep in enumerate(shown):
                xs, ys = [], []
                for i, (_, get) in enumerate(cats):
                    result = get(rep)
                    if result is not None and result.us_per_delivery is not None:
                        xs.append(i - 0.4 + width * (k + 0.5))
                        ys.append(result.us_per_delivery)
                bars = ax.bar(xs, ys, width, label=rep.name, color=COLOURS.get(rep.name))
                ax.bar_label(bars, labels=[f"{y:.3g}" for y in ys], fontsize=7, padding=1)
            ax.set_xticks(range(len(cats)), [c for c, _ in cats], fontsize=8)
            if log:
                ax.set_yscale("log")
                ax.set_ylim(bottom=1)
                ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_title(title + " (log)", fontsize=10)
            ax.set_ylabel("server CPU µs per delivery (both instances)")
            if not log:
                ax.set_title(title, fontsize=10)
            ax.grid(axis="y", alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.suptitle(f"hubwire bench: CPU per delivery\n{subtitle}", fontsize=8)
        path = directory / "bench-cpu.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)

    # -- latency CDFs -------------------------------------------------------------------------------
    latency_panels = [
        (f"{_short(n)} clients, {args.latency_rate:,.0f} deliveries/s", lambda r, n=n: r.latency.get(n))
        for n in args.clients
    ]
    path = _cdf_figure(
        plt, reports, latency_panels, directory / "bench-latency-cdf.png", subtitle, "fixed-rate phase:"
    )
    if path:
        written.append(path)
    rooms_panels = [
        (f"rooms {label.replace('x', ' clients, ')}/s per room", lambda r, k=label: _rooms_result(r, k))
        for label in room_labels
    ]
    path = _cdf_figure(plt, reports, rooms_panels, directory / "bench-rooms-cdf.png", subtitle, "rooms:")
    if path:
        written.append(path)
    return written


def merged_cdf(parts: list[tuple[list[int], int]], points: int = 400) -> list[tuple[float, float]]:
    """(latency ms, fraction of deliveries at or below it) from the workers' weighted quantile points."""
    items: list[tuple[int, float]] = []
    for values, count in parts:
        if values:
            w = count / len(values)
            items.extend((v, w) for v in values)
    if not items:
        return []
    items.sort()
    total = sum(w for _, w in items)
    out: list[tuple[float, float]] = []
    acc = 0.0
    step = max(1, len(items) // points)
    for k, (v, w) in enumerate(items):
        acc += w
        if k % step == 0 or k >= len(items) - 50:  # every point of the tail
            out.append((v / 1e6, acc / total))
    return out


def _has_latency(result: Result | None) -> bool:
    return result is not None and bool(result.latency_parts)


def _rooms_result(report: ServerReport, label: str) -> Result | None:
    rooms = report.rooms.get(label)
    return rooms.result if rooms is not None else None


def _cdf_figure(
    plt: Any, reports: list[ServerReport], panels: list[tuple[str, Any]], path: Path, subtitle: str, what: str
) -> Path | None:
    panels = [(t, get) for t, get in panels if any(_has_latency(get(r)) for r in reports)]
    if not panels:
        return None
    fig, axes = plt.subplots(
        2,
        len(panels),
        figsize=(5.2 * len(panels), 7.0),
        squeeze=False,
        constrained_layout=True,
        gridspec_kw={"height_ratios": [3, 2]},
    )
    for col, (title, get) in enumerate(panels):
        ax, tail = axes[0][col], axes[1][col]
        for rep in reports:
            result = get(rep)
            if result is None or not result.latency_parts:
                continue
            cdf = merged_cdf(result.latency_parts)
            if not cdf:
                continue
            xs = [max(x, 0.01) for x, _ in cdf]
            ys = [y for _, y in cdf]
            label = f"{rep.name} (p50 {result.p50_ms or 0:.1f}, p99 {result.p99_ms or 0:.1f} ms)"
            ax.plot(xs, ys, label=label, color=COLOURS.get(rep.name), linewidth=1.4)
            above = [(x, 1.0 - y) for x, y in zip(xs, ys, strict=True) if y < 1.0]
            if above:
                tail.plot(*zip(*above, strict=True), color=COLOURS.get(rep.name), linewidth=1.4)
        tail.set_xscale("log")
        tail.set_yscale("log")
        tail.axhline(0.01, color="black", linewidth=0.6, linestyle=":")
        tail.set_xlabel("delivery latency ms (log)")
        tail.set_ylabel("fraction slower (log)")
        tail.grid(alpha=0.3, which="both")
        ax.axhline(0.99, color="black", linewidth=0.6, linestyle=":")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.005)
        ax.set_ylabel("fraction of deliveries")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"hubwire bench: {what} latency CDF and its tail (dotted: p99)\n{subtitle}", fontsize=8)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def load(path: Path) -> tuple[list[ServerReport], argparse.Namespace]:
    """The reports and options of a run, from the JSON bench/run.py wrote next to its report."""
    import json

    from bench.run import Result, RoomSpec, RoomsResult, ServerReport

    data = json.loads(path.read_text())
    args = argparse.Namespace(**data["args"])
    args.rooms = [RoomSpec(int(c), float(r)) for c, r in data["args"]["rooms"]]

    def result(d: dict[str, Any]) -> Result:
        d = dict(d)
        d["latency_parts"] = [(list(points), count) for points, count in d.get("latency_parts", [])]
        return Result(**d)

    reports = []
    for raw in data["reports"]:
        rep = ServerReport(raw["name"])
        for phase in ("fanout", "group", "latency"):
            setattr(rep, phase, {int(n): result(r) for n, r in raw[phase].items()})
        rep.rooms = {k: RoomsResult(**(v | {"result": result(v["result"])})) for k, v in raw["rooms"].items()}
        for key, r in raw.get("deflate", {}).items():  # "variant:clients" (bench/run.py report_data)
            variant, _, n = key.rpartition(":")
            rep.deflate[(variant, int(n))] = result(r)
        rep.idle_kb, rep.errors = raw.get("idle_kb"), raw.get("errors", [])
        reports.append(rep)
    return reports, args


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description="Draw bench/run.py's plots again from its JSON results.")
    parser.add_argument("results", type=Path, help="the .json written next to bench/run.py's --output")
    parser.add_argument("directory", type=Path, nargs="?", help="where to write (default: the JSON's)")
    ns = parser.parse_args(argv)
    reports, args = load(ns.results)
    for path in write_plots(reports, args, ns.directory or ns.results.parent):
        print(path, file=sys.stdout)


if __name__ == "__main__":
    main()
