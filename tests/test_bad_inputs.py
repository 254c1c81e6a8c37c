"""The bad-input battery: every user mistake through the real ``longctx`` command line.

Each case runs ``longctx ...`` in its own process, as a user would, and must end with exit code 2,
exactly one stderr line ``error: ...`` that names the problem and the fix (checked by words of
both), no traceback, and no change on disk: names, bytes and modification times of every file
under the case's directory and the shared data directory are the same afterwards.

Cases cover the recipe (keys, types, ranges, incompatible settings, sequence-parallel and head
divisibility, stage order, YAML, mixture weights, peft targets and rank, S2 groups), the data
(missing, empty, binary, not UTF-8, JSON lines without ``text``, chat rows without messages,
with an unknown role or no assistant turn, too little text for one batch), the tokenizer (larger than the model's vocabulary,
missing), checkpoints (missing, foreign directory, another model shape, damaged, a run
directory that already holds a run) and the command line (bad ``--set``, unknown command or
flag, bad ``--workers``). Recipe mistakes are caught by ``--dry-run``; the others by the checks
``longctx train`` makes before it starts Ray (``trainer.run_dir.validate_run``).

All cases run concurrently in one module fixture, each a separate short process forked from one
driver that has imported torch already (``cli_forked.py``), so the battery costs about as much
as its slowest few cases plus one torch import.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from trainer_helpers import deepspeed_env, job, make_data, tiny_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"
FORKED = Path(__file__).resolve().parent / "cli_forked.py"
PARALLEL_CASES = 4


@dataclass(frozen=True)
class Case:
    """``argv`` after ``longctx`` ({data}, {case} and {checkpoint} are filled in), words the
    error line must contain (the problem and the fix), and files the case creates first."""

    argv: tuple[str, ...]
    needles: tuple[str, ...]
    files: tuple[tuple[str, bytes], ...] = ()


def _train(*settings: str, dry_run: bool = True, recipe: str = str(TINY)) -> tuple[str, ...]:
    argv = ["train", recipe, "--set", "trainer.run_dir={case}/run"]  # a setting may override
    for setting in settings:
        argv += ["--set", setting]
    return (*argv, "--dry-run") if dry_run else tuple(argv)


def _on_data(*settings: str, sources: str = "[{data}/corpus.txt]") -> tuple[str, ...]:
    """A real ``train`` (no --dry-run) of the tiny recipe on the shared test data."""
    return _train(
        f"data.sources={sources}",
        "data.tasks={{text: 1.0}}",  # braces doubled: argv is format()ted
        "data.tokenizer.path={data}/tokenizer_320.model",
        *settings,
        dry_run=False,
    )


STAGES_SHRINKING = b"""name: staged
stages:
  - data: {seq_len: 256}
  - data: {seq_len: 128}
"""

CASES: dict[str, Case] = {
    # --- recipe: keys, types, ranges, combinations, layouts
    "unknown section": Case(_train("trainer_x.lr=1"), ("trainer_x", "trainer")),
    "unknown key": Case(
        _train("trainer.learning_rate=1e-3"),
        ("unknown key 'trainer.learning_rate'", "valid keys under 'trainer'"),
    ),
    "wrong type": Case(_train("trainer.steps=many"), ("trainer.steps", "many")),
    "negative lr": Case(_train("trainer.lr=-1"), ("trainer.lr", "greater than 0")),
    "zero stage out of range": Case(_train("trainer.zero_stage=4"), ("trainer.zero_stage", "4")),
    "unknown dtype": Case(_train("trainer.dtype=fp8"), ("trainer.dtype", "fp32")),
    "unknown attention variant": Case(_train("attention.variant=magic"), ("magic", "variant")),
    "min_lr above lr": Case(_train("trainer.min_lr=1.0"), ("min_lr", "lr")),
    "peft target module the model lacks": Case(
        _train("peft.target_modules=[q_proj,query_key_value]"),
        ("['query_key_value']", "does not have", "linear layers are"),
    ),
    "peft rank zero": Case(_train("peft.rank=0"), ("peft.rank", "greater than 0")),
    "s2 length not divisible by its group": Case(
        _train("attention.variant=s2", "attention.s2.group_size=48"),
        ("attention.s2.group_size=48", "use a multiple of 48"),
    ),
    "heads not divisible by kv heads": Case(
        _train("model.num_attention_heads=5"), ("num_attention_heads=5", "choose kv heads")
    ),
    "workers not a multiple of sp": Case(
        (*_train("parallel.ring=3"), "--workers", "2"), ("multiple", "ring")
    ),
    "query heads not divisible by ulysses": Case(
        (*_train("parallel.ulysses=3", dry_run=False), "--workers", "3"),
        ("not divisible by parallel.ulysses=3", "choose parallel.ulysses"),
    ),
    "stage order": Case(
        ("train", "{case}/staged.yaml", "--dry-run"),
        ("seq_len", "stage"),
        (("staged.yaml", STAGES_SHRINKING),),
    ),
    "recipe not yaml": Case(
        ("train", "{case}/broken.yaml", "--dry-run"),
        ("broken.yaml", "YAML"),
        (("broken.yaml", b"model: [unclosed\n"),),
    ),
    "recipe missing": Case(("train", "{case}/absent.yaml", "--dry-run"), ("absent.yaml",)),
    # --- data
    "data file missing": Case(_on_data(sources="[{case}/nothing.txt]"), ("nothing.txt", "path")),
    "data file empty": Case(
        _on_data(sources="[{case}/empty.txt]"), ("empty", "add text"), (("empty.txt", b"\n\n"),)
    ),
    "data file binary": Case(
        _on_data(sources="[{case}/blob.txt]"),
        ("binary", "UTF-8"),
        (("blob.txt", bytes(range(256)) * 8),),
    ),
    "data file not utf-8": Case(
        _on_data(sources="[{case}/latin.txt]"),
        ("not valid UTF-8", "iconv"),
        (("latin.txt", "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1")),),
    ),
    "jsonl without text": Case(
        _on_data(sources="[{case}/docs.jsonl]"),
        ("no 'text' field", '{"text": "..."}'),
        (("docs.jsonl", b'{"body": "a document"}\n'),),
    ),
    "documents too short for a batch": Case(
        _on_data(sources="[{case}/short.txt]"),
        ("rows", "add data"),
        (("short.txt", b"A very short document.\n"),),
    ),
    "data directory without text files": Case(
        _on_data(sources="[{case}/folder]"),
        (".txt or .jsonl", "add some"),
        (("folder/x.csv", b"a"),),
    ),
    "mixture weight negative": Case(
        _train("data.sources=[{{path: builtin, weight: -1}}, {{path: builtin, weight: 2}}]"),
        ("negative", "use >= 0"),
    ),
    "mixture weights sum to 0": Case(
        _train("data.sources=[{{path: builtin, weight: 0}}]"), ("sum to 0", "positive weight")
    ),
    "chat row without messages": Case(
        _on_data(sources="[{{path: {case}/chat_no_messages.jsonl, format: chat}}]"),
        ("no non-empty 'messages'", "each line must be like"),
        (("chat_no_messages.jsonl", b'{"text": "a document"}\n'),),
    ),
    "chat role unknown": Case(
        _on_data(sources="[{{path: {case}/chat_unknown_role.jsonl, format: chat}}]"),
        ("role 'tool'", "use one of system, user, assistant"),
        (("chat_unknown_role.jsonl", b'{"messages": [{"role": "tool", "content": "x"}]}\n'),),
    ),
    "chat without assistant turn": Case(
        _on_data(sources="[{{path: {case}/chat_no_assistant.jsonl, format: chat}}]"),
        ("no assistant turn", "add an assistant message"),
        (("chat_no_assistant.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n'),),
    ),
    # --- tokenizer
    "tokenizer larger than the model vocabulary": Case(
        _on_data("model.vocab_size=256"), ("320 tokens", "model.vocab_size >= 320")
    ),
    "tokenizer missing": Case(
        _on_data("data.tokenizer.path={case}/absent.model"), ("absent.model", "tokenizer")
    ),
    # --- checkpoints
    "resume latest without checkpoints": Case(
        (*_on_data(), "--resume", "latest"), ("no checkpoint yet", "without --resume")
    ),
    "resume path missing": Case(
        (*_on_data(), "--resume", "{case}/nowhere"), ("no such file", "latest")
    ),
    "resume a foreign directory": Case(
        (*_on_data(), "--resume", "{case}/foreign"),
        ("no manifest.json", "resume from another"),
        (("foreign/weights.bin", b"\x00" * 64),),
    ),
    "resume a checkpoint of another model shape": Case(
        (*_on_data(), "--resume", "{checkpoint}"),
        ("does not fit this recipe's model: model.", "recipe the checkpoint was trained"),
    ),
    "resume a damaged checkpoint": Case(
        (*_on_data("model.intermediate_size=96"), "--resume", "{damaged}"),
        ("sha256 of state_r00000_p00000.safetensors", "resume from another"),
    ),
    "resume a checkpoint missing a shard": Case(
        (*_on_data("model.intermediate_size=96"), "--resume", "{missing_shard}"),
        ("lacks 1 file(s)", "state_r00000_p00000.safetensors", "resume from another"),
    ),
    "resume a checkpoint holding another checkpoint's shard": Case(
        (*_on_data("model.intermediate_size=96"), "--resume", "{foreign_shard}"),
        ("belongs to another checkpoint", "resume from another"),
    ),
    "resume a checkpoint with a truncated shard": Case(
        (*_on_data("model.intermediate_size=96"), "--resume", "{truncated_shard}"),
        ("state_r00000_p00000.safetensors is truncated", "resume from another"),
    ),
    "resume a manifest listing a path outside the checkpoint": Case(
        (*_on_data("model.intermediate_size=96"), "--resume", "{escaping_manifest}"),
        ("a path outside the checkpoint", "resume from another"),
    ),
    "resume a checkpoint whose shard count differs from its index": Case(
        (*_on_data("model.intermediate_size=96"), "--resume", "{shard_count}"),
        ("shard count does not match the metadata", "resume from another"),
    ),
    "resume a checkpoint of the old full-state format": Case(
        (*_on_data("model.intermediate_size=96"), "--resume", "{old_format}"),
        ("checkpoint format 2 (full-state", "start a new run"),
    ),
    "run directory already holds a run": Case(
        _on_data("trainer.run_dir={existing}", "model.intermediate_size=96"),
        ("already holds a run", "--resume latest"),
    ),
    # --- command line
    "set without equals": Case(_train("trainer.lr"), ("trainer.lr", "=")),
    "set with an empty key": Case(_train("=3"), ("=3",)),
    "unknown command": Case(("frobnicate",), ("frobnicate", "--help")),
    "unknown flag": Case(("train", str(TINY), "--bogus"), ("--bogus", "--help")),
    "zero workers": Case(("train", str(TINY), "--workers", "0", "--dry-run"), ("--workers", "1")),
}


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root``: relative path -> (bytes, mtime in ns)."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _make_checkpoint(data: Path, tmp: Path) -> Path:
    """Real checkpoints of the test model (steps 1 and 2, one process), in their own run
    directory."""
    corpus, tokenizer = data / "corpus.txt", data / "tokenizer_320.model"
    recipe = tiny_recipe(corpus, tokenizer, tmp / "trained", steps=2, ckpt_every=1, eval_every=0)
    job_file = tmp / "job.json"
    job_file.write_text(json.dumps(job(recipe)))
    script = "import json,sys; from longctx.trainer.worker import train_worker; "
    script += "train_worker(json.loads(open(sys.argv[1]).read()))"
    env = {**os.environ, **deepspeed_env()}
    subprocess.run([sys.executable, "-c", script, str(job_file)], check=True, env=env, timeout=600)
    return tmp / "trained"


SHARD = "state_r00000_p00000.safetensors"


def _set_manifest(checkpoint: Path, **changes) -> None:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    (checkpoint / "manifest.json").write_text(json.dumps({**manifest, **changes}))


def _damaged_checkpoints(trained: Path, root: Path) -> dict[str, Path]:
    """Copies of the trained run, each with its step-2 checkpoint damaged one way; by name."""
    damaged = {}
    for name in (
        "damaged",
        "missing_shard",
        "foreign_shard",
        "truncated_shard",
        "escaping_manifest",
        "shard_count",
        "old_format",
    ):
        run = Path(shutil.copytree(trained, root / f"run_{name}"))
        damaged[name] = run / "checkpoints" / "step_000002"
    raw = bytearray((damaged["damaged"] / SHARD).read_bytes())
    raw[-7] ^= 0x10
    (damaged["damaged"] / SHARD).write_bytes(bytes(raw))
    (damaged["missing_shard"] / SHARD).unlink()
    foreign = (damaged["foreign_shard"].parent / "step_000001" / SHARD).read_bytes()
    (damaged["foreign_shard"] / SHARD).write_bytes(foreign)
    files = json.loads((damaged["foreign_shard"] / "manifest.json").read_text())["files"]
    _set_manifest(
        damaged["foreign_shard"], files={**files, SHARD: hashlib.sha256(foreign).hexdigest()}
    )
    raw = (damaged["truncated_shard"] / SHARD).read_bytes()
    (damaged["truncated_shard"] / SHARD).write_bytes(raw[: len(raw) // 2])
    files = json.loads((damaged["escaping_manifest"] / "manifest.json").read_text())["files"]
    _set_manifest(damaged["escaping_manifest"], files={**files, "../../../config.yaml": "0" * 64})
    (damaged["shard_count"] / SHARD).unlink()
    files = json.loads((damaged["shard_count"] / "manifest.json").read_text())["files"]
    _set_manifest(damaged["shard_count"], files={k: v for k, v in files.items() if k != SHARD})
    _set_manifest(damaged["old_format"], format=2)
    return damaged


def _run_cases(prepared: dict[str, tuple[Path, list[str]]], root: Path) -> dict:
    """Run every case's ``longctx`` command line in its case directory: each in its own
    process, forked from one driver that imports torch once (``cli_forked.py``), at most
    ``PARALLEL_CASES`` at a time; by name, their ``CompletedProcess``."""
    cases_file, results_file = root / "cases.json", root / "results.json"
    cases = {name: (str(case_dir), argv) for name, (case_dir, argv) in prepared.items()}
    cases_file.write_text(json.dumps(cases))
    env = {**os.environ, **deepspeed_env(), "COLUMNS": "200"}
    command = [sys.executable, str(FORKED), str(cases_file), str(results_file)]
    subprocess.run([*command, str(PARALLEL_CASES)], check=True, env=env, timeout=900)
    results = json.loads(results_file.read_text())
    return {
        name: subprocess.CompletedProcess(["longctx", *argv], *results[name])
        for name, (_, argv) in prepared.items()
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_inputs")
    data = root / "data"
    make_data(data)
    trained = _make_checkpoint(data, root)
    checkpoint = trained / "checkpoints" / "step_000002"
    damaged = _damaged_checkpoints(trained, root)
    places = {
        "data": str(data),
        "checkpoint": str(checkpoint),
        "existing": str(trained),
        **{name: str(path) for name, path in damaged.items()},
    }
    prepared = {}
    for name, case in CASES.items():
        case_dir = root / "cases" / name.replace(" ", "_")
        case_dir.mkdir(parents=True)
        for relative, content in case.files:
            (case_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            (case_dir / relative).write_bytes(content)
        argv = [part.format(case=case_dir, **places) for part in case.argv]
        prepared[name] = (case_dir, argv)
    shared = (data, trained, *(path.parent.parent for path in damaged.values()))
    shared_before = {path: snapshot(Path(path)) for path in shared}
    before = {name: snapshot(case_dir) for name, (case_dir, _) in prepared.items()}
    results = _run_cases(prepared, root)
    shared_after = {path: snapshot(Path(path)) for path in shared}
    return {
        "results": results,
        "unchanged": {
            name: before[name] == snapshot(case_dir) for name, (case_dir, _) in prepared.items()
        },
        "shared_unchanged": shared_before == shared_after,
    }


def test_the_battery_has_at_least_25_distinct_inputs():
    assert len(CASES) >= 25
    assert len({case.argv for case in CASES.values()}) == len(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(outcomes, name):
    result = outcomes["results"][name]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    for needle in CASES[name].needles:
        assert needle in lines[0], lines[0]
    assert outcomes["unchanged"][name], "files under the case directory changed"
    assert outcomes["shared_unchanged"], "the shared data or checkpoints changed"
