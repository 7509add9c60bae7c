"""The long fuzz run (not part of the test suite): every fuzz suite against live servers for N minutes.

    python -m tests.fuzz_long --minutes 10                # both serving modes, every suite
    python -m tests.fuzz_long --minutes 2 --serving asgi --suite upgrade

Rounds of ``--examples`` generated cases per suite run in turn until the time is up; after each
round a newcomer must be served, every fuzzed connection must be disposed and the server log
must be free of tracebacks (see tests/fuzzkit.py). Exits 1 with the failing example on the first
failure (the server log is kept and its path printed), 0 with the counts otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback

from .fuzzkit import SUITES, Target, run_suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz_long", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--serving", choices=("native", "asgi", "both"), default="both")
    parser.add_argument("--suite", action="append", choices=SUITES, help="repeatable; default: all")
    parser.add_argument("--examples", type=int, default=200, help="examples per suite per round")
    args = parser.parse_args(argv)
    modes = ("native", "asgi") if args.serving == "both" else (args.serving,)
    suites = args.suite or list(SUITES)
    deadline = time.monotonic() + args.minutes * 60
    targets = {mode: Target(mode) for mode in modes}
    counts: dict[str, int] = {}
    started = time.monotonic()
    try:
        while time.monotonic() < deadline:
            for mode, target in targets.items():
                for suite in suites:
                    if time.monotonic() >= deadline:
                        break
                    name = f"{mode}/{suite}"
                    try:
                        run_suite(suite, target, args.examples)
                        target.finish()
                    except BaseException:
                        traceback.print_exc()
                        kept = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept for the reader
                            prefix=f"hubwire-fuzz-{mode}-", suffix=".log", delete=False
                        )
                        kept.close()
                        shutil.copy(target.server.log.name, kept.name)
                        print(
                            f"FAILED {name} after {time.monotonic() - started:.0f}s; server log: {kept.name}"
                        )
                        return 1
                    counts[name] = counts.get(name, 0) + args.examples
                    print(f"{time.monotonic() - started:6.0f}s  {name}: {counts[name]} examples", flush=True)
    finally:
        for target in targets.values():
            target.close()
    total = sum(counts.values())
    print(f"OK: {total} examples in {time.monotonic() - started:.0f}s, no failure: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
