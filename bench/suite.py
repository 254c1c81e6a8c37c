"""Run the benchmark suite and write bench/results/REPORT.md (``longctx bench``, ``make bench``).

Each benchmark runs as ``python -m longctx.bench.NAME`` in its own process with its default
(quick) settings, writes ``bench/results/NAME.json`` and prints its table; the report is then
rebuilt from every JSON file present (``bench/report.py``), so benchmarks not run this time keep
their last results. The whole default suite took 18 minutes on a 2-core AVX-512 CPU (2026-12-04)
and takes 48 on a 2-core AVX2 one, whose attention kernels run ~4x slower: most of that is the
16k/32k dense baselines and the 16k peer step that the targets are stated at (51.5 minutes
before 2026-12-06, when three benchmarks stopped repeating runs that added nothing: the full-
length warm-up of sparse_power, mosa_layer's full-length FLOP count and sparse_nsa_mosa's
second input kind, now behind ``--inputs``). Three benchmarks run only by hand
(their committed JSON stays in the report): ``python -m longctx.bench.data`` (prepares a
400M-token corpus), ``python -m longctx.bench.peft`` (10-15 minutes) and ``python -m
longctx.bench.peft_zero3`` (memory only, ~1 minute; kept out to bound the default run); the
other long measurements sit behind each benchmark's own flags (``python -m
longctx.bench.memory --longest`` runs real 128k/256k training steps, ~12 minutes more; ``peer
--long``, ``checkpoint --zero 2`` and ``checkpoint --workers 2 4``).

``bench/results/suite.json`` records when the whole suite last ran and how long each benchmark
took, in wall time and in CPU time of its processes (on a shared machine the wall time says more
about the other jobs than about the benchmark); a run of some benchmarks only writes
``suite_partial.json`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from longctx.bench.report import RESULTS_DIR, write_markdown
from longctx.errors import LongctxError

# Sequence parallelism and memory first (the issue-10 targets), the slowest last.
BENCHES = (
    "sp",
    "memory",
    "sparse_power",
    "s2",
    "attention",
    "sparse_nsa_mosa",
    "mosa_layer",
    "train_overhead",
    "checkpoint",
    "peer",
    "positional",
)
NOTE = (
    "the machine may be shared: other jobs inflate wall times (the ratios use CPU time where "
    "the module says so) and any ratio timed in wall time"
)


def check_names(names: list[str]) -> list[str]:
    """``names`` in suite order (all of them when empty); unknown names are an error."""
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        raise LongctxError(
            f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHES)}"
        )
    return [name for name in BENCHES if not names or name in names]


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process (and theirs) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_suite(names: list[str], results_dir: Path = RESULTS_DIR) -> str | None:
    """Run the benchmarks ``names`` (all when empty) one after another, then write the report.

    A benchmark that fails stops the suite (its output is already on the terminal) and its
    name is returned (None when all succeeded); the report is rebuilt from what exists either
    way."""
    selected = check_names(names)
    started, runs, load_start = datetime.now(UTC), [], os.getloadavg()[0]
    suite_start = time.perf_counter()
    failed = None
    for name in selected:
        print(f"== bench {name}", flush=True)
        start, cpu_start = time.perf_counter(), _children_cpu_seconds()
        done = subprocess.run([sys.executable, "-m", f"longctx.bench.{name}"], check=False)
        runs.append(
            {
                "name": name,
                "seconds": time.perf_counter() - start,
                "cpu_seconds": _children_cpu_seconds() - cpu_start,
            }
        )
        if done.returncode != 0:
            failed = name
            break
    summary = {
        "started": f"{started:%Y-%m-%d %H:%M}",
        "seconds": time.perf_counter() - suite_start,
        "runs": runs,
        "load_average": [load_start, os.getloadavg()[0]],
        "note": NOTE,
    }
    # The whole suite's record is kept apart from a partial run's, so that rerunning one
    # benchmark does not replace the time of the full suite.
    name = "suite" if selected == list(BENCHES) else "suite_partial"
    (results_dir / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {write_markdown(results_dir)}")
    return failed


def main(argv: list[str] | None = None) -> int:
    """``longctx bench [NAME ...] [--report-only]``: 0 when every benchmark ran, 1 when one
    failed (its output is above), 2 with one ``error:`` line for an unknown name."""
    parser = argparse.ArgumentParser(prog="longctx bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks (default: all)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild REPORT.md")
    args = parser.parse_args(argv)
    try:
        check_names(args.names)
    except LongctxError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.report_only:
        print(f"wrote {write_markdown()}")
        return 0
    failed = run_suite(args.names)
    if failed is not None:
        print(f"error: benchmark {failed} failed; its output is above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
