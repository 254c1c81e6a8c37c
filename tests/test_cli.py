"""The ``longctx`` command line as a user runs it (subprocesses of the installed entry points):
one-line errors with exit code 2 that leave the disk untouched, and the --dry-run plan.

The plan's numbers are checked against hand arithmetic of the memory model in
``longctx.launch.plan`` and against ``ModelConfig.num_parameters`` (itself checked against
transformers in test_recipe.py).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from longctx.config.recipe import load_recipe
from longctx.errors import LongctxError
from longctx.launch.cli import main
from longctx.launch.plan import activation_bytes, estimate_memory, human_bytes
from longctx.parallel.config import ParallelConfig

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
LONGCTX = Path(sys.executable).parent / "longctx"  # the console script of this environment


def start_longctx(args: list[str], cwd: Path, module: bool = False) -> subprocess.Popen:
    """Start the CLI in ``cwd`` with its output piped; ``module`` uses ``python -m
    longctx.launch`` instead of the console script."""
    command = [sys.executable, "-m", "longctx.launch"] if module else [str(LONGCTX)]
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.Popen(
        [*command, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_longctx(args: list[str], cwd: Path, module: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI in ``cwd`` to its end, output captured."""
    return finish(start_longctx(args, cwd, module))


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``directory`` with its bytes and modification time."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


BAD_RECIPES = {
    "unknown key": ("trainer:\n  lrr: 0.1\n", "did you mean 'trainer.lr'?"),
    "wrong type": ("trainer:\n  steps: ten\n", "trainer.steps = 'ten' (str) is invalid"),
    "heads not divisible": (
        "model:\n  hidden_size: 384\n  num_attention_heads: 6\n  num_key_value_heads: 4\n",
        "num_attention_heads=6 is not divisible by num_key_value_heads=4",
    ),
    "bad rope_scaling": (
        "model:\n  rope_scaling: {rope_type: yarnn, factor: 4.0}\n",
        "did you mean 'yarn'?",
    ),
    "missing file": (None, "bad.yaml does not exist"),
    "yaml syntax": ("name: x\ntrainer:\n  lr: : 1\n", "bad.yaml:3:"),
}


BAD_COMMAND_LINES = {
    "unknown command": (["fly"], "invalid choice: 'fly'"),
    "unknown flag": (["train", "x.yaml", "--bogus"], "unrecognized arguments: --bogus"),
    "no workers": (["train", "x.yaml", "--workers", "0"], "0 must be at least 1"),
    "no command": ([], "the following arguments are required: COMMAND"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> dict[str, tuple[Path, dict, subprocess.CompletedProcess]]:
    """Every bad recipe (``train bad.yaml --dry-run``) and bad command line, each in its own
    directory and process, all started at once: the interpreters' start-ups (seconds of
    imports each) overlap instead of queueing. -> {case: (directory, files before, result)}."""
    started = {}
    cases = {
        case: (text, ["train", "bad.yaml", "--dry-run"]) for case, (text, _) in BAD_RECIPES.items()
    }
    cases |= {case: (None, args) for case, (args, _) in BAD_COMMAND_LINES.items()}
    for case, (text, args) in cases.items():
        directory = tmp_path_factory.mktemp("bad")
        if text is not None:
            (directory / "bad.yaml").write_text(text)
        started[case] = (directory, snapshot(directory), start_longctx(args, directory))
    return {
        case: (path, before, finish(process)) for case, (path, before, process) in started.items()
    }


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipe_exits_2_with_one_line_and_leaves_disk_unchanged(case, bad_runs):
    directory, before, result = bad_runs[case]
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert BAD_RECIPES[case][1] in lines[0]
    assert result.stdout == ""
    assert snapshot(directory) == before


@pytest.mark.parametrize("case", list(BAD_COMMAND_LINES))
def test_bad_command_line_exits_2_with_one_line(case, bad_runs):
    result = bad_runs[case][2]
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: longctx"), result.stderr
    assert BAD_COMMAND_LINES[case][1] in lines[0]


# The remaining cases call ``main`` in this process: the same code path without paying the
# interpreter and torch start-up once more per case.


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--set", "trainer.lr"], "--set 'trainer.lr' has no '='"),
        (["--set", "trainer.lrr=1"], "did you mean 'trainer.lr'?"),
        (
            ["--set", "parallel.dp=2", "--set", "parallel.ring=2", "--workers", "3"],
            "--workers 3 is not a multiple of parallel.ulysses x ring = 1 x 2 = 2",
        ),
    ],
)
def test_bad_overrides_and_worker_counts_exit_2(extra, fragment, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_bytes(TINY.read_bytes())
    before = snapshot(tmp_path)
    assert main(["train", str(recipe), "--dry-run", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1 and fragment in captured.err
    assert snapshot(tmp_path) == before


def split_dry_run(stdout: str) -> tuple[dict, str]:
    """(the resolved recipe YAML as a dict, the plan table text)."""
    yaml_text, _, table = stdout.partition("plan for '")
    return yaml.safe_load(yaml_text), table


def test_dry_run_prints_resolved_recipe_and_plan(tmp_path):
    result = run_longctx(
        ["train", str(TINY), "--dry-run", "--workers", "2"], cwd=tmp_path, module=True
    )
    assert result.returncode == 0, result.stderr
    printed, table = split_dry_run(result.stdout)
    recipe = load_recipe(TINY)
    # A one-stage recipe prints without a stages key (``stages: []`` in a file is refused), and
    # a full fine-tuning recipe without a peft key.
    assert printed == recipe.model_dump(mode="json", exclude={"stages", "peft"})
    layout = recipe.parallel.resolve(2)
    assert "dp 2 x ulysses 1 x ring 1 = 2 ranks" in table
    assert f"{recipe.model.num_parameters():,}" in table
    assert human_bytes(estimate_memory(recipe, layout).total) in table
    assert recipe.recipe_hash() in table
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_dry_run_applies_set_with_type_conversion(capsys):
    argv = [
        "train",
        str(TINY),
        "--dry-run",
        "--set",
        "trainer.lr=3e-4",
        "--set",
        "trainer.micro_batch_size=4",
        "--set",
        "model.rope_scaling={rope_type: yarn, factor: 4, original_max_position_embeddings: 128}",
    ]
    assert main(argv) == 0
    printed, _ = split_dry_run(capsys.readouterr().out)
    assert printed["trainer"]["lr"] == 3e-4
    assert printed["trainer"]["micro_batch_size"] == 4
    assert printed["model"]["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4,
        "original_max_position_embeddings": 128,
    }
    assert "lr: 1e-3" in TINY.read_text()  # the recipe file keeps its own value


def random_corpus(path: Path, seed: int = 0, lines: int = 400) -> None:
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
        for _ in range(300)
    ]
    path.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(lines)) + "\n")


def test_tokenizer_train_writes_a_model_of_the_requested_size(tmp_path, monkeypatch):
    import sentencepiece

    monkeypatch.chdir(tmp_path)
    random_corpus(tmp_path / "corpus.txt")
    argv = [
        "tokenizer",
        "train",
        "--input",
        "corpus.txt",
        "--vocab-size",
        "320",
        "--out",
        "t.model",
    ]
    assert main(argv) == 0
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "t.model"))
    assert processor.vocab_size() == 320


def test_tokenizer_train_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    random_corpus(tmp_path / "corpus.txt")
    (tmp_path / "t.model").write_bytes(b"keep me")
    before = snapshot(tmp_path)
    argv = [
        "tokenizer",
        "train",
        "--input",
        "corpus.txt",
        "--vocab-size",
        "320",
        "--out",
        "t.model",
    ]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1 and "t.model" in error
    assert snapshot(tmp_path) == before


# --- the memory model, against hand arithmetic ------------------------------------------------
# tiny.yaml: V 512, d 64, I 172, L 2, Hq 4, Hkv 2, head dim 16, fp32, micro-batch 2 x 128 tokens.
# Parameters: per layer q,o 2*64*64 + k,v 2*64*32 + MLP 3*64*172 + norms 2*64 = 45312;
# 2 layers + embedding and lm_head 2*512*64 + final norm 64 = 156480.
TINY_PARAMS = 156480
# Activations per token and layer: 4*64 + 2*64 + 2*32 + 4*172 = 1136 elements.
TINY_LAYER_ACTIVATIONS = 1136


def test_tiny_parameter_count_by_hand():
    assert load_recipe(TINY).model.num_parameters() == TINY_PARAMS


def test_memory_estimate_fp32_zero0_by_hand():
    recipe = load_recipe(TINY)
    memory = estimate_memory(recipe, ParallelConfig(dp=1))
    tokens = 2 * 128
    # kept: 2 layers x 1136, plus the final hidden state (64); fp32; plus a 256 x 512 fp32 logits chunk
    activations = tokens * (2 * TINY_LAYER_ACTIVATIONS + 64) * 4 + tokens * 512 * 4
    assert (memory.weights, memory.gradients, memory.optimizer, memory.activations) == (
        4 * TINY_PARAMS,
        4 * TINY_PARAMS,
        8 * TINY_PARAMS,
        activations,
    )


def test_zero_stages_shard_states_over_the_world():
    layout = ParallelConfig(dp=4)
    stage = {
        s: estimate_memory(load_recipe(TINY, [f"trainer.zero_stage={s}"]), layout) for s in range(4)
    }
    assert (
        stage[1].optimizer == stage[0].optimizer // 4 and stage[1].gradients == stage[0].gradients
    )
    assert stage[2].gradients == stage[0].gradients // 4 and stage[2].weights == stage[0].weights
    assert stage[3].weights == stage[0].weights // 4


def test_bf16_uses_two_byte_weights_and_twelve_byte_optimizer_state():
    memory = estimate_memory(load_recipe(TINY, ["trainer.dtype=bf16"]), ParallelConfig(dp=1))
    assert (memory.weights, memory.gradients, memory.optimizer) == (
        2 * TINY_PARAMS,
        2 * TINY_PARAMS,
        12 * TINY_PARAMS,
    )


def test_activation_checkpointing_keeps_layer_inputs_attention_outputs_plus_one_layer():
    model = load_recipe(TINY).model
    tokens = 256
    logits_chunk = tokens * 512 * 4
    checkpointed = activation_bytes(model, tokens, "fp32", activation_checkpointing=True)
    # each of the 2 layers keeps its input and its attention output (4 heads x 16 = 64 each)
    assert checkpointed == tokens * (2 * (64 + 64) + TINY_LAYER_ACTIVATIONS + 64) * 4 + logits_chunk
    # the full mode keeps the layer inputs alone and recomputes attention
    full = activation_bytes(
        model, tokens, "fp32", activation_checkpointing=True, checkpoint_mode="full"
    )
    assert full == checkpointed - tokens * 2 * 64 * 4
    # the tiled MLP recomputes one 64-token chunk's four I-sized tensors, not all 256 tokens'
    tiled = activation_bytes(model, tokens, "fp32", activation_checkpointing=True, mlp_chunk=64)
    assert tiled == checkpointed - (tokens - 64) * 4 * model.intermediate_size * 4


def test_full_checkpointing_mode_reaches_the_planner_and_needs_checkpointing_on():
    on = ["trainer.activation_checkpointing=true"]
    selective = estimate_memory(load_recipe(TINY, on), ParallelConfig(dp=1))
    full = estimate_memory(
        load_recipe(TINY, [*on, "trainer.activation_checkpointing_mode=full"]), ParallelConfig(dp=1)
    )
    assert full.activations < selective.activations
    with pytest.raises(LongctxError) as info:
        load_recipe(TINY, ["trainer.activation_checkpointing_mode=full"])
    assert "needs activation_checkpointing: true" in str(info.value)
    assert "\n" not in str(info.value)


def test_sequence_parallelism_divides_the_tokens_per_rank():
    recipe = load_recipe(TINY, ["parallel.ring=2"])
    memory = estimate_memory(recipe, ParallelConfig(dp=1, ring=2))
    expected = activation_bytes(recipe.model, 2 * 128 // 2, "fp32", activation_checkpointing=False)
    assert memory.activations == expected


def test_adapters_count_only_trained_parameters_for_gradients_and_optimizer():
    """LongLoRA rank 4 on the tiny model, by hand: LoRA on q, o (64 -> 64) and k, v (64 -> 32)
    is 4 (128 + 128 + 96 + 96) = 1792 per layer, x 2 layers; the untied embedding 512 x 64 and
    5 RMSNorm gains of 64 also train. The frozen base counts only as weights (training dtype),
    and the planner's counts equal those of the real adapted model."""
    import torch

    from longctx.launch.plan import parameter_counts, phase_peaks
    from longctx.model.adapters import attach_adapters
    from longctx.model.transformer import Transformer

    recipe = load_recipe(TINY, ["peft.rank=4", "peft.trainable=[embed,norm]"])
    trained, total = 2 * 1792 + 512 * 64 + 5 * 64, TINY_PARAMS + 2 * 1792
    assert parameter_counts(recipe) == (trained, total)
    model = attach_adapters(
        Transformer(recipe.model, recipe.positional, recipe.attention), recipe.adapters
    )
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trained
    assert sum(p.numel() for p in model.parameters()) == total
    assert all(p.dtype == torch.float32 for p in model.parameters())
    fp32 = estimate_memory(recipe, ParallelConfig(dp=1))
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * total, 4 * trained, 8 * trained)
    peft = "peft.rank=4"
    bf16 = load_recipe(TINY, [peft, "trainer.dtype=bf16", "trainer.zero_stage=2"])
    lora_trained = 2 * 1792
    memory = estimate_memory(bf16, ParallelConfig(dp=2))
    assert (memory.weights, memory.gradients, memory.optimizer) == (
        2 * (TINY_PARAMS + lora_trained),
        2 * lora_trained // 2,
        12 * lora_trained // 2,
    )
    assert memory.zero_buffers == 2 * lora_trained + 2 * lora_trained  # reduce + all-gather
    peaks = phase_peaks(bf16, ParallelConfig(dp=2))
    assert peaks.save == memory.total + 12 * lora_trained // 2 + 256 * 2**20
    # ZeRO-3: the base partitioned like a full fine-tuning model's weights, the LoRA matrices
    # whole until they are partitioned too
    zero3 = [["trainer.dtype=bf16", "trainer.zero_stage=3"] + extra for extra in ([], [peft])]
    full3, adapted3 = (load_recipe(TINY, overrides) for overrides in zero3)
    full_init = phase_peaks(full3, ParallelConfig(dp=2)).init
    assert phase_peaks(adapted3, ParallelConfig(dp=2)).init == full_init + 2 * lora_trained
    assert full_init < 2 * TINY_PARAMS  # less than one bf16 copy of the base


def test_dry_run_prints_the_trained_parameters_of_adapters(capsys):
    assert main(["train", str(TINY), "--dry-run", "--set", "peft.rank=4"]) == 0
    out = capsys.readouterr().out
    assert "trained parameters" in out and f"{2 * 1792:,}" in out
