"""Corpus scale: prepare throughput, and a rank's memory and launch time on a small and a large
prepared corpus (issue 19).

Run: ``python -m longctx.bench.data [--small-tokens N] [--large-tokens N] [--cache DIR]``.
Prints a table and writes ``bench/results/data.json``. Goal: between the two corpora, rank 0's
resident set at the first step differs by <= 100 MiB and launch-to-first-step time by <= 10 s.

Corpora are generated from offline text: the paragraphs of CPython's ``pydoc_data.topics``
(~465k characters), shuffled with a seed per document and grouped into documents of 20-400
paragraphs, written as parquet until about the requested token count (estimated from the
tokenizer's characters per token on the topics). Each corpus is prepared with
``longctx.data.prepare.prepare`` into ``--cache`` (default ``~/.cache/longctx-bench``) and kept
there, so a rerun reuses it (its prepare throughput is then the one measured when it was made).

Each corpus is then trained on through ``longctx train recipes/tiny.yaml --workers 2`` with
``data.sources`` set to the prepared directory and text only, 1 step: launch-to-first-step is
the wall time from starting the command to the first printed step line, the memory is rank 0's
peak resident set at that step (``mem`` on that line, see ``trainer/metrics.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from longctx.bench.measure import write_report
from longctx.data.prepare import prepare
from longctx.data.tokenizer import load_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "data.json"
RSS_GOAL_MIB, LAUNCH_GOAL_S = 100.0, 10.0
_STEP_LINE = re.compile(r"step 1/\d+.*mem ([0-9.]+) GiB")
_ROWS_PER_FILE = 2000


def _paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    return [p for name in sorted(topics) for p in topics[name].split("\n\n") if p.strip()]


def generate_corpus(directory: Path, tokens: int, chars_per_token: float) -> None:
    """Parquet files of documents of shuffled topic paragraphs, about ``tokens`` tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    paragraphs = _paragraphs()
    target_chars, written, seed, part = tokens * chars_per_token, 0, 0, 0
    while written < target_chars:
        rows = []
        for _ in range(_ROWS_PER_FILE):
            rng = np.random.default_rng([19, seed])
            seed += 1
            picks = rng.choice(len(paragraphs), size=int(rng.integers(20, 401)))
            text = "\n\n".join(paragraphs[i] for i in picks)
            rows.append(text)
            written += len(text)
            if written >= target_chars:
                break
        pq.write_table(pa.table({"text": rows}), directory / f"part_{part:05d}.parquet")
        part += 1


def prepared_corpus(cache: Path, tokens: int, tokenizer_path: str, num_proc: int) -> dict:
    """The prepared corpus of about ``tokens`` tokens in ``cache`` (made once), with its
    prepare throughput."""
    out = cache / f"prepared_{tokens}"
    record = cache / f"prepared_{tokens}.json"
    if record.is_file() and (out / "manifest.json").is_file():
        return json.loads(record.read_text())
    tokenizer = load_tokenizer(tokenizer_path)
    sample = "\n\n".join(_paragraphs())
    chars_per_token = len(sample) / len(tokenizer.encode(sample))
    raw = cache / f"raw_{tokens}"
    if not raw.is_dir():
        generate_corpus(raw, tokens, chars_per_token)
    manifest = prepare([str(raw)], tokenizer_path, str(out), num_proc=num_proc)
    result = {
        "directory": str(out),
        "tokens": manifest["tokens"],
        "documents": manifest["documents"],
        "prepare_tokens_per_s": manifest["throughput"]["tokens_per_s"],
        "num_proc": num_proc,
    }
    record.write_text(json.dumps(result))
    return result


def first_step(directory: str, tokenizer_path: str, run_dir: Path) -> dict:
    """Launch-to-first-step seconds and rank 0's resident set (MiB) there, 2 workers."""
    command = [
        sys.executable, "-m", "longctx.launch", "train", str(REPO / "recipes" / "tiny.yaml"),
        "--workers", "2",
        "--set", f"data.sources=[{directory}]",
        "--set", "data.tasks={text: 1.0}",
        "--set", f"data.tokenizer.path={tokenizer_path}",
        "--set", "trainer.steps=2", "--set", "trainer.eval_every=0",
        "--set", "trainer.ckpt_every=1000", "--set", f"trainer.run_dir={run_dir}",
    ]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )
    found = None
    lines = []
    for line in process.stdout:
        lines.append(line)
        match = _STEP_LINE.search(line)
        if match and found is None:
            found = {"launch_s": time.perf_counter() - start, "rss_mib": float(match[1]) * 1024}
    process.wait()
    if process.returncode or found is None:
        raise RuntimeError("longctx train failed:\n" + "".join(lines[-30:]))
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-tokens", type=float, default=20e6)
    parser.add_argument("--large-tokens", type=float, default=400e6)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "longctx-bench"))
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer_path = cache / "tokenizer_512.model"
    if not tokenizer_path.is_file():
        train_tokenizer(["builtin"], 512, str(tokenizer_path))
    corpora = {}
    for label, tokens in (("small", int(args.small_tokens)), ("large", int(args.large_tokens))):
        corpus = prepared_corpus(cache, tokens, str(tokenizer_path), args.num_proc)
        with tempfile.TemporaryDirectory() as run_dir:
            corpus.update(first_step(corpus["directory"], str(tokenizer_path), Path(run_dir)))
        corpora[label] = corpus
    small, large = corpora["small"], corpora["large"]
    report = {
        "corpora": corpora,
        "rss_diff_mib": large["rss_mib"] - small["rss_mib"],
        "launch_diff_s": large["launch_s"] - small["launch_s"],
        "goal_rss_diff_mib": RSS_GOAL_MIB,
        "goal_launch_diff_s": LAUNCH_GOAL_S,
    }
    print(
        f"{'corpus':8} {'tokens':>12} {'prepare tok/s':>14} {'rank0 RSS MiB':>14} {'launch s':>9}"
    )
    for label, c in corpora.items():
        print(
            f"{label:8} {c['tokens']:>12,} {c['prepare_tokens_per_s']:>14,.0f} "
            f"{c['rss_mib']:>14.0f} {c['launch_s']:>9.1f}"
        )
    write_report(RESULTS, report)
    return report


if __name__ == "__main__":
    main()
