"""bench/report.py builds REPORT.md from the benchmarks' JSON; bench/memory.py's fit; the
``longctx bench`` command line.

References: the committed bench/results JSON files (every section must parse them), hand-made
variations of them whose verdicts are known, and ``numpy.polyfit`` for the least-squares fit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from longctx.bench.memory import fit_line
from longctx.bench.report import (
    OPTIONAL,
    RESULTS_DIR,
    SECTIONS,
    collect_rows,
    render,
    write_markdown,
)
from longctx.bench.suite import BENCHES, check_names
from longctx.errors import LongctxError
from longctx.launch.cli import main as cli_main

SP = {
    "ring": {
        "seq_len": 16384, "heads": 4, "head_dim": 64, "single_seconds": 4.0,
        "ring2_seconds": 3.0, "time_ratio": 0.75, "single_peak_bytes": 100 * 2**20,
        "ring2_peak_bytes_per_rank": 60 * 2**20, "memory_ratio": 0.6,
        "block_bytes": 8 * 2**20, "floor_blocks": {"q, k, v, dout": 4, "visiting k, v": 2},
        "floor_bytes_per_rank": 48 * 2**20, "floor_ratio": 0.48,
    },
    "model_step": {
        "seq_len": 16384, "single_seconds": 10.0, "ring2_seconds": 6.0, "time_ratio": 0.6,
        "single_peak_bytes": 2**30, "ring2_peak_bytes_per_rank": 2**29, "memory_ratio": 0.5,
    },
    "balance": {
        "seq_len": 16384, "world": 2, "zigzag_causal_pairs_ratio": 1.0,
        "contiguous_causal_pairs_ratio": 3.0, "zigzag_scheduled_ratio": 1.0,
        "contiguous_scheduled_ratio": 2.33,
    },
    "tiled_loss": {
        "seq_len": 65536, "vocab": 32768, "hidden_dim": 64, "tiled_peak_bytes": 2**30,
        "tiled_seconds": 60.0, "plain_measured_seq_len": 8192,
        "plain_measured_peak_bytes": 3 * 2**30, "plain_peak_bytes_at_seq_len": 24 * 2**30,
        "memory_ratio": 1 / 24,
    },
}  # fmt: skip


def _write(folder: Path, name: str, data) -> None:
    (folder / f"{name}.json").write_text(json.dumps(data))


def _row(rows, bench: str, starts: str):
    matches = [r for r in rows if r.bench == bench and r.measure.startswith(starts)]
    assert len(matches) == 1, [r.measure for r in rows if r.bench == bench]
    return matches[0]


def test_every_committed_result_parses_into_rows():
    present = {p.stem for p in RESULTS_DIR.glob("*.json")} & set(SECTIONS)
    assert present, "bench/results holds no benchmark JSON"
    assert collect_rows(RESULTS_DIR)
    for name in sorted(present):  # each JSON on its own: some share a parser (peer_long)
        rows = SECTIONS[name](json.loads((RESULTS_DIR / f"{name}.json").read_text()))
        assert any(row.ratio is not None for row in rows), name


def test_verdicts_follow_the_targets(tmp_path):
    _write(tmp_path, "sp", SP)
    rows = collect_rows(tmp_path)
    memory = _row(rows, "sp", "ring P=2 peak memory")
    assert (memory.ratio, memory.op, memory.target, memory.met) == (0.6, "<=", 0.55, False)
    assert "floor of a whole-block ring" in memory.note and "0.48x" in memory.note
    assert _row(rows, "sp", "ring P=2 fwd+bwd time").met is True
    assert _row(rows, "sp", "tiled loss").met is True
    assert _row(rows, "sp", "model step peak").met is None  # context, no target

    SP["ring"]["memory_ratio"] = 0.5
    try:
        _write(tmp_path, "sp", SP)
        assert _row(collect_rows(tmp_path), "sp", "ring P=2 peak memory").met is True
    finally:
        SP["ring"]["memory_ratio"] = 0.6


def test_missing_results_are_rows_saying_not_run(tmp_path):
    rows = collect_rows(tmp_path)
    not_run = {r.bench for r in rows if r.measure.startswith("not run")}
    assert not_run == set(SECTIONS) - set(OPTIONAL)


def test_peer_rows_judge_only_the_checkpointing_cases_against_their_length_targets(tmp_path):
    def case(side, checkpointing, wall_s, cpu_s, peak):
        return {"seq_len": 16384, "checkpointing": checkpointing, "side": side,
                "wall_s": wall_s, "time_s": cpu_s, "peak_bytes": peak}  # fmt: skip

    results = [case("transformers", ck, 10.0, 16.0, 1000) for ck in (False, True)]
    results += [case("longctx", ck, 7.5, 15.0, 250) for ck in (False, True)]
    _write(tmp_path, "peer", {"targets": {"16384": {"time": 0.8, "memory": 0.3}},
                              "results": results})  # fmt: skip
    rows = collect_rows(tmp_path)
    with_ck = _row(rows, "peer", "step time vs transformers, T=16384, with checkpointing")
    # Judged on wall time (0.75), not CPU time (0.94); both are shown.
    assert (with_ck.ratio, with_ck.op, with_ck.target, with_ck.met) == (0.75, "<=", 0.8, True)
    assert with_ck.values == "7.5 vs 10.0 wall s (CPU 15.0 vs 16.0 s)"
    memory = _row(rows, "peer", "step memory vs transformers, T=16384, with checkpointing")
    assert (memory.ratio, memory.met) == (0.25, True)
    assert _row(rows, "peer", "step time vs transformers, T=16384, without").met is None


def test_sparse_speedups_are_judged_at_the_longest_length(tmp_path):
    cases = []
    for length, dense_s, nsa_s in ((4096, 1.0, 2.0), (8192, 4.0, 1.0)):
        cases += [
            {"case": "dense", "length": length, "inputs": "random", "seconds": dense_s,
             "peak_bytes": 100},
            {"case": "nsa", "length": length, "inputs": "random", "seconds": nsa_s,
             "peak_bytes": 90},
        ]  # fmt: skip
    _write(tmp_path, "sparse_nsa_mosa", cases)
    speed = _row(collect_rows(tmp_path), "sparse_nsa_mosa", "NSA fwd+bwd speedup")
    assert speed.ratio == pytest.approx(4.0) and speed.met is True
    assert "4k 0.50x, 8k 4.00x" in speed.values


def test_mosa_layer_speedup_is_judged_from_16k(tmp_path):
    cases = []
    for length, dense_s, mosa_s in ((8192, 1.0, 2.0), (16384, 4.0, 2.0)):
        for case, seconds, flops in (("dense", dense_s, 4e6), ("mosa", mosa_s, 1e6)):
            cases.append(
                {"case": case, "length": length, "seconds": seconds, "peak_bytes": 100 * 2**20,
                 "formula_projection_flops_per_token": flops / 2,
                 "formula_attention_flops_per_token": flops / 2,
                 "counted_flops_per_token": flops / 2}
            )  # fmt: skip
    _write(tmp_path, "mosa_layer", cases)
    rows = collect_rows(tmp_path)
    short = _row(
        rows, "mosa_layer", "MoSA attention layer fwd+bwd speedup over the dense layer, T=8192"
    )
    assert (short.ratio, short.met) == (0.5, None)
    long = _row(
        rows, "mosa_layer", "MoSA attention layer fwd+bwd speedup over the dense layer, T=16384"
    )
    assert (long.ratio, long.op, long.target, long.met) == (2.0, ">=", 1.0, True)
    flops = _row(
        rows,
        "mosa_layer",
        "MoSA attention layer FLOPs per token vs the dense layer (formula), T=16384",
    )
    assert flops.ratio == pytest.approx(0.25)


def test_render_has_environment_counts_and_table(tmp_path):
    for path in RESULTS_DIR.glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    _write(tmp_path, "sp", SP)
    text = render(tmp_path)
    for needle in ("- Machine: ", "- Versions: Python", "torch ", "- Report generated: "):
        assert needle in text
    judged = [r for r in collect_rows(tmp_path) if r.met is not None]
    assert f"Targets met: {sum(r.met for r in judged)} of {len(judged)}." in text
    assert "| sp | ring P=2 peak memory per rank vs 1 process, T=16384 |" in text
    assert "Missed: " in text and "ring P=2 peak memory" in text.split("Missed: ")[1]
    assert write_markdown(tmp_path).read_text().startswith("# longctx benchmark report")


def test_fit_line_matches_numpy_polyfit():
    gen = np.random.default_rng(0)
    xs = [4096.0, 8192.0, 16384.0, 32768.0]
    ys = [3e8 + 9000.0 * x + gen.normal(0, 1e6) for x in xs]
    slope, intercept = np.polyfit(xs, ys, 1)
    got_intercept, got_slope = fit_line(xs, ys)
    assert got_slope == pytest.approx(slope, rel=1e-9)
    assert got_intercept == pytest.approx(intercept, rel=1e-9)


def test_bench_names_are_checked():
    assert check_names([]) == list(BENCHES)
    assert check_names(["positional", "sp"]) == ["sp", "positional"]  # suite order
    with pytest.raises(LongctxError, match="unknown benchmark nope"):
        check_names(["nope"])


def test_cli_rejects_unknown_bench_with_one_line(capfd):
    assert cli_main(["bench", "nope"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: unknown benchmark nope") and err.count("\n") == 1


def test_suite_timings_appear_in_the_report(tmp_path):
    suite = {
        "started": "2026-01-01 10:00", "seconds": 1200.0, "load_average": [3.0, 5.0],
        "note": "shared machine",
        "runs": [{"name": "sp", "seconds": 600.0, "cpu_seconds": 300.0},
                 {"name": "memory", "seconds": 600.0, "cpu_seconds": 420.0}],
    }  # fmt: skip
    _write(tmp_path, "suite", suite)
    lines = render(tmp_path).splitlines()
    line = next(x for x in lines if x.startswith("- Last full `longctx bench` run"))
    assert "20.0 min wall, 12.0 min CPU in all" in line
    assert "sp 10.0 min (5.0 min CPU)" in line and "load average 3 at the start" in line
    assert not any(x.startswith("- Later partial run") for x in lines)
    # a later run of one benchmark is shown next to the full suite's time, not instead of it
    partial = {**suite, "started": "2026-01-02 09:00", "seconds": 60.0, "runs": suite["runs"][:1]}
    _write(tmp_path, "suite_partial", partial)
    lines = render(tmp_path).splitlines()
    assert any(x.startswith("- Last full `longctx bench` run") and "20.0 min" in x for x in lines)
    partial_line = next(x for x in lines if x.startswith("- Later partial run"))
    assert "2026-01-02 09:00 UTC, 1.0 min wall" in partial_line


def test_peft_rows_judge_longlora_memory_at_8k(tmp_path):
    def result(method: str, peak: float, fraction: float) -> dict:
        return {
            "method": method, "seq_len": 8192, "layers": 30, "trainable_fraction": fraction,
            "peak_bytes": peak * 2**30, "time_s": 10.0, "wall_s": 11.0,
            "memory_ratio": peak / 3.0, "time_ratio": 1.0,
        }  # fmt: skip

    results = [result("full", 3.0, 1.0), result("lora", 1.5, 0.002), result("longlora", 1.7, 0.2)]
    config = {"layers": 30, "lengths": [8192]}
    goal = {"method": "longlora", "seq_len": 8192, "memory_ratio": 0.6}
    _write(tmp_path, "peft", {"config": config, "goal": goal, "results": results})
    rows = collect_rows(tmp_path)
    longlora = _row(rows, "peft", "longlora peak memory")
    assert longlora.ratio == pytest.approx(1.7 / 3.0) and longlora.met is True
    assert "20.00% of the weights" in longlora.values
    assert _row(rows, "peft", "lora peak memory").met is None  # context, no target


def test_peft_zero3_rows_judge_the_partitioned_init_against_its_bound(tmp_path):
    config = {"model": "SmolLM2-360M shape", "parameters": 362e6, "world": 2}
    cases = {
        "one_copy": {"peak_bytes": 1500 * 2**20, "parameter_bytes": 690 * 2**20},
        "partitioned": {"peak_bytes": 500 * 2**20, "parameter_bytes": 345 * 2**20},
    }
    report = {"config": config, "cases": cases, "memory_ratio": 1 / 3, "bound_bytes": 800 * 2**20}
    _write(tmp_path, "peft_zero3", report)
    rows = collect_rows(tmp_path)
    bound = _row(rows, "peft_zero3", "ZeRO-3 LongLoRA init peak per rank vs its bound")
    assert bound.ratio == pytest.approx(500 / 800) and bound.met is True
    whole = _row(rows, "peft_zero3", "ZeRO-3 LongLoRA init peak per rank vs a whole base")
    assert whole.ratio == pytest.approx(1 / 3) and whole.met is None


CHECKPOINT = {
    "full_fp32_state_bytes": 12 * 100 * 2**20,
    "results": [
        {
            "workers": 2,
            "ranks": [
                {
                    "rank": 0, "step_peak_bytes": 1000 * 2**20, "save_peak_bytes": 1700 * 2**20,
                    "save_seconds": 3.0, "restore_peak_bytes": 1900 * 2**20,
                    "restore_seconds": 2.0, "init_added_bytes": 300 * 2**20, "init_seconds": 1.0,
                    "save_target_bytes": (1000 + 600 + 256) * 2**20,
                    "init_target_bytes": (200 + 50 + 256) * 2**20,
                }
            ],
        }
    ],
}  # fmt: skip


def test_checkpoint_rows_compare_each_phase_with_its_bound(tmp_path):
    _write(tmp_path, "checkpoint", CHECKPOINT)
    rows = collect_rows(tmp_path)
    save = _row(rows, "checkpoint", "peak RSS during save, ZeRO-3, W=2, rank 0")
    assert save.ratio == pytest.approx(1700 / 1856) and save.met is True
    assert "step 1000 + state/W 600 + 256 MiB" in save.values
    restore = _row(rows, "checkpoint", "peak RSS during restore")
    assert restore.ratio == pytest.approx(1900 / 1856) and restore.met is False
    init = _row(rows, "checkpoint", "RSS added by HF init")
    assert init.ratio == pytest.approx(300 / 506) and init.met is True
    failed = {**CHECKPOINT, "results": [{"workers": 4, "error": "error: out of memory"}]}
    _write(tmp_path, "checkpoint", failed)
    row = _row(collect_rows(tmp_path), "checkpoint", "ZeRO-3, W=4: did not complete")
    assert row.values == "error: out of memory" and row.met is None
    zero2 = {**CHECKPOINT, "results": [{**CHECKPOINT["results"][0], "zero_stage": 2}]}
    _write(tmp_path, "checkpoint", zero2)
    rows = collect_rows(tmp_path)
    save = _row(rows, "checkpoint", "peak RSS during save, ZeRO-2, W=2, rank 0")
    assert save.ratio == pytest.approx(1700 / 1856) and save.met is True
    assert "fp32 model + largest tensor" in _row(rows, "checkpoint", "RSS added by HF init").values


def test_data_rows_judge_the_differences_between_the_corpora(tmp_path):
    corpus = {"prepare_tokens_per_s": 9e5, "num_proc": 2}
    small = {**corpus, "tokens": 2e7, "rss_mib": 530.0, "launch_s": 50.0}
    large = {**corpus, "tokens": 4e8, "rss_mib": 700.0, "launch_s": 55.0}
    data = {"corpora": {"small": small, "large": large}, "rss_diff_mib": 170.0,
            "launch_diff_s": 5.0, "goal_rss_diff_mib": 100.0, "goal_launch_diff_s": 10.0}  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps(data))
    rows = [r for r in collect_rows(tmp_path) if r.bench == "data"]
    assert [r.met for r in rows] == [False, True]
    assert "20M vs 400M tokens" in rows[0].measure and "900,000" in rows[0].note


def test_measured_dates_come_from_the_written_index_not_file_times(tmp_path):
    """``write_report`` records when and on which CPU each JSON was written; a checkout's fresh
    file times do not change the report's "measured" line, which groups results by CPU."""
    from longctx.bench.measure import write_report
    from longctx.bench.report import WRITTEN_INDEX, _result_dates, cpu_name

    write_report(tmp_path / "sp.json", [{"case": "x"}])
    _write(tmp_path, "memory", [])  # no index entry: falls back to the file's time
    _write(tmp_path, "s2", [])
    index = tmp_path / WRITTEN_INDEX
    written = json.loads(index.read_text())
    written["s2"] = "2026-11-01 10:00"  # an entry from before the CPU was recorded
    index.write_text(json.dumps(written))
    os.utime(tmp_path / "sp.json", (0, 0))  # as a clone would leave it, say
    line = _result_dates(tmp_path)
    assert written["sp"]["cpu"] == cpu_name()
    this_cpu, unrecorded = line.split("; on a CPU not recorded: ")
    assert this_cpu.endswith(f"on {cpu_name()}: sp {written['sp']['written']}")
    assert "memory 20" in unrecorded and "s2 2026-11-01 10:00" in unrecorded
