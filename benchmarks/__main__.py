"""Run every benchmark in turn: ``python -m benchmarks [name ...]`` (``make bench``).

Each prints its own Markdown table with the comparison measured in the same run.
"""
from __future__ import annotations

import importlib
import sys
import time

BENCHMARKS = ("bench_main", "bench_transport", "bench_results", "bench_operators", "bench_kombu_contract",
              "bench_batching", "bench_web", "bench_scale", "bench_growth", "bench_delayed")
#: Arguments a benchmark gets here (its full sizes take hours: run it directly for those).
ARGUMENTS = {"bench_growth": ["--quick"], "bench_delayed": ["--quick"]}


def main(names: list[str]) -> None:
    for name in names or BENCHMARKS:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
            continue
        print(f"\n== {name} ==", file=sys.stderr, flush=True)
        started = time.monotonic()
        module.main(ARGUMENTS.get(name, []))
        print(f"({name} took {time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
