"""bench/gpu_check.sh runs on a CPU-only machine in its dry mode: it parses, imports every check,
runs each on a tiny float32 problem (or skips it with its reason), writes every check's status
to its JSON and exits 0; a check that fails is recorded and does not stop the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longctx.bench import gpu
from longctx.bench.report import gpu_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_check_on_the_cpu(tmp_path):
    env = os.environ | {"OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dry run" in (tmp_path / "gpu_check.log").read_text()
    report = json.loads((tmp_path / "gpu_dry_run.json").read_text())
    assert report["dry_run"] is True
    checks = report["checks"]
    assert list(checks) == list(gpu.DEFAULT_CHECKS)
    assert all(check["status"] == "ok" for check in checks.values()), checks
    for name in ("parity", "packed"):  # float32 against the float64 reference
        errors = checks[name]["relative_max_error"]
        assert set(errors) == {"out", "dq", "dk", "dv"}
        assert max(errors.values()) <= gpu.TOLERANCE[gpu.torch.float32]["grad"]
    assert checks["packed"]["varlen"].startswith("skipped")
    assert [r["seq_len"] for r in checks["attention"]["lengths"]] == [64, 128]
    assert all(r["tflops"] > 0 for r in checks["attention"]["lengths"])
    assert report["gemm_tflops"] > 0
    for name in ("model", "peer"):
        (row,) = checks[name]["lengths"]
        assert row["tokens_per_second"] > 0 and row["mfu"] > 0
    assert checks["peer"]["attn_implementation"] == "sdpa"
    assert checks["peer"]["lengths"][0]["longctx_time_ratio"] > 0
    measures = [row.measure for row in gpu_rows(report)]  # REPORT.md rows of every check
    assert len(measures) == 2 + 2 + 1 + 1 and "T=64" in measures[-1]


def test_a_failing_check_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(setup):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(gpu, "check_parity", broken)
    out = tmp_path / "gpu.json"
    report = gpu.main(
        ["--dry-run", "--checks", "parity", "attention", "longest", "--out", str(out)]
    )
    checks = json.loads(out.read_text())["checks"]
    assert checks["parity"]["status"] == "failed"
    assert "RuntimeError: kernel exploded" in checks["parity"]["error"]
    assert checks["attention"]["status"] == "ok"
    assert checks["longest"]["status"] == "skipped" and "CUDA" in checks["longest"]["reason"]
    assert gpu.exit_code(report) == 1
    rows = gpu_rows(report)
    assert rows[0].measure == "check parity: failed" and rows[0].met is None
    assert [row.measure for row in rows[1:]] == [
        "attention fwd+bwd TFLOP/s vs bf16 GEMM, T=64",
        "attention fwd+bwd TFLOP/s vs bf16 GEMM, T=128",
        "check longest: skipped",
    ]
