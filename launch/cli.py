"""The ``longctx`` command line.

    longctx train RECIPE [--set k=v ...] [--resume latest|PATH] [--workers N] [--address A]
                         [--placement PACK|SPREAD|STRICT_SPREAD] [--until-stage N]
                         [--dry-run]
    longctx tokenizer train --input FILES... --vocab-size N --out PATH
    longctx eval RUN_OR_CHECKPOINT|HF_DIR|RECIPE --task ppl|passkey|niah|counting|... [--lengths N ...]
                 [--depths F ...] [--samples N] [--windows N] [--out DIR] [--set k=v ...]
                 [--workers N] [--address A]
    longctx export RUN_OR_CHECKPOINT --hf OUT [--dtype fp32|bf16] [--max-shard-size 5GB]   (adapters merged in)
    longctx export RUN_OR_CHECKPOINT --peft OUT                   (the adapters, peft's format)
    longctx bench [NAME ...] [--report-only]
    longctx convert --gguf FILE --out DIR

Every user mistake (a bad recipe, a bad flag, a missing file) ends the same way: one line
``error: ...`` on stderr and exit code 2, with nothing written to disk. The heavy parts (Ray,
DeepSpeed, sentencepiece training) are imported only by the command that needs them, so
``--dry-run`` and ``--help`` stay quick.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from longctx.config.recipe_errors import single_line
from longctx.errors import LongctxError
from longctx.launch.ray_cluster import PLACEMENT_STRATEGIES

USAGE_ERROR = 2


class _UsageError(Exception):
    """argparse's complaint about the command line, reported as one line."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints the usage block and exits on a bad command line; this raises instead so
    that ``main`` prints a single ``error:`` line (and returns 2, argparse's own exit code)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message}; see '{self.prog} --help'")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _train(args: argparse.Namespace) -> int:
    """Validate the recipe; with --dry-run print it and the plan, else start the run."""
    from longctx.config.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    if args.dry_run:
        from longctx.config.stages import plan_stages
        from longctx.launch.plan import print_plan

        stages = plan_stages(recipe)  # a staged recipe: one plan per stage (layout, memory)
        layouts = [stage.recipe.parallel.resolve(args.workers) for stage in stages]
        console = Console(highlight=False)
        console.out(recipe.resolved_yaml(), end="")
        for stage, layout in zip(stages, layouts):
            if len(stages) > 1:
                console.print(f"{stage.label()}: steps {stage.start_step + 1}-{stage.end_step}")
            print_plan(stage.recipe, layout, console)
        return 0
    from longctx.launch.train import run_training

    return run_training(recipe, args)


def _train_tokenizer(args: argparse.Namespace) -> int:
    """Train a sentencepiece tokenizer on text files."""
    from longctx.data.tokenizer import train_tokenizer

    written = train_tokenizer(list(args.input), args.vocab_size, args.out)
    print(f"tokenizer written to {written}")
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    """Tokenize sources once into memory-mapped token shards (``longctx.data.prepare``)."""
    from longctx.data.prepare import prepare

    manifest = prepare(
        list(args.sources),
        args.tokenizer,
        args.out,
        field=args.field,
        num_proc=args.num_proc,
        kind=args.format,
    )
    rate = manifest["throughput"]
    print(
        f"prepared {manifest['documents']} documents, {manifest['tokens']} tokens in "
        f"{len(manifest['shards'])} shards into {args.out}; tokenized {rate['new_tokens']} new "
        f"tokens in {rate['seconds']:.1f} s ({rate['tokens_per_s']:,.0f} tokens/s)"
    )
    return 0


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a fraction in [0, 1]")
    return value


def _eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint or model (here or on Ray workers); write JSON + PNG, print the
    tables."""
    from longctx.launch.eval_run import run_eval

    return run_eval(args)


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def shard_size(text: str) -> int:
    """``"5GB"`` -> 5e9 bytes (decimal KB/MB/GB as transformers reads them, binary KiB/MiB/GiB,
    or plain bytes); ``argparse.ArgumentTypeError`` (exit 2, one line) for anything else."""
    number = text.strip().lower().rstrip("bgikm")
    unit = text.strip().lower()[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _SIZE_UNITS or value <= 0 or int(value * _SIZE_UNITS[unit]) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive size; write e.g. 5GB, 500MB, 2GiB or a byte count"
        )
    return int(value * _SIZE_UNITS[unit])


def _export(args: argparse.Namespace) -> int:
    """Export a checkpoint as a Hugging Face model directory (adapters merged into the base),
    and / or an adapter checkpoint's adapters in peft's format."""
    from longctx.checkpoint.saved_model import export_hf, export_peft

    if args.hf is None and args.peft is None:
        raise LongctxError("longctx export needs --hf OUT, --peft OUT or both")
    if args.hf is not None:
        out = export_hf(args.run_or_checkpoint, args.hf, args.dtype, args.max_shard_size)
        print(f"exported to {out}")
    if args.peft is not None:
        print(f"exported the adapters to {export_peft(args.run_or_checkpoint, args.peft)}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    """Convert a GGUF checkpoint into a Hugging Face model directory."""
    from longctx.launch.convert import convert_gguf

    out = convert_gguf(args.gguf, args.out)
    print(f"converted {args.gguf} to {out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Run the benchmarks (all, or those named) and write bench/results/REPORT.md; 1 if one
    failed, 2 for an unknown name. The suite runs as ``python -m longctx.bench.suite``: bench
    sits above launch in the import graph, so the CLI starts it instead of importing it."""
    command = [sys.executable, "-m", "longctx.bench.suite", *args.names]
    if args.report_only:
        command.append("--report-only")
    return subprocess.run(command, check=False).returncode


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``longctx`` and its subcommands."""
    parser = _OneLineParser(
        prog="longctx",
        description="Distributed long-context training for decoder language models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train (or --dry-run) a recipe")
    train.add_argument("recipe", metavar="RECIPE", help="path to a YAML recipe")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set trainer.lr=3e-4 (value parsed as YAML); "
        "repeatable",
    )
    train.add_argument(
        "--resume", metavar="latest|PATH", help="continue from the latest or a given checkpoint"
    )
    train.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="number of ranks (default: parallel.dp x ulysses x ring; dp 'auto' -> 1 group)",
    )
    train.add_argument(
        "--address", metavar="A", help="Ray cluster to join ('auto', 'ray://...'); default: local"
    )
    train.add_argument(
        "--placement",
        type=str.upper,
        choices=PLACEMENT_STRATEGIES,
        default="PACK",
        help="how Ray places the workers: PACK fills a node first (default), SPREAD spreads "
        "them, STRICT_SPREAD puts each on a different node",
    )
    train.add_argument(
        "--until-stage",
        type=_positive_int,
        metavar="N",
        help="train a staged recipe up to and including stage N (1-based), then stop; "
        "'--resume latest' later continues with stage N+1",
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved recipe and the plan (layout, parameters, memory); run nothing",
    )
    train.set_defaults(handler=_train)

    tokenizer = commands.add_parser("tokenizer", help="tokenizer tools")
    tokenizer_commands = tokenizer.add_subparsers(
        dest="tokenizer_command", required=True, metavar="COMMAND"
    )
    tokenizer_train = tokenizer_commands.add_parser(
        "train", help="train a sentencepiece tokenizer on text files"
    )
    tokenizer_train.add_argument(
        "--input", nargs="+", required=True, metavar="FILE", help=".txt / .jsonl files or dirs"
    )
    tokenizer_train.add_argument("--vocab-size", type=_positive_int, required=True, metavar="N")
    tokenizer_train.add_argument(
        "--out", required=True, metavar="PATH", help="where to write the tokenizer.model"
    )
    tokenizer_train.set_defaults(handler=_train_tokenizer)

    data = commands.add_parser("data", help="corpus tools")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    data_prepare = data_commands.add_parser(
        "prepare", help="tokenize sources once into memory-mapped token shards"
    )
    data_prepare.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help=".txt/.jsonl/.jsonl.gz/.parquet files, dataset directories, or 'builtin'",
    )
    data_prepare.add_argument("--tokenizer", required=True, metavar="PATH")
    data_prepare.add_argument("--out", required=True, metavar="DIR")
    data_prepare.add_argument("--field", default="text", help="the text field (default: text)")
    data_prepare.add_argument("--num-proc", type=_positive_int, default=1, metavar="N")
    data_prepare.add_argument(
        "--format",
        choices=("text", "chat"),
        default="text",
        help="text documents (default) or chat conversations ('messages' rows rendered with "
        "the tokenizer's chat template, loss on assistant tokens only)",
    )
    data_prepare.set_defaults(handler=_prepare_data)

    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint or model (ppl, passkey, niah), optionally sharded"
    )
    evaluate.add_argument(
        "run_or_checkpoint",
        metavar="TARGET",
        help="a run directory, a checkpoint, a Hugging Face model directory, or a recipe "
        "whose model.init is hf:PATH",
    )
    evaluate.add_argument(
        "--task",
        nargs="+",
        required=True,
        choices=("ppl", "passkey", "niah", "counting", "selective_copy", "flip_flop"),
        metavar="TASK",
        help="ppl (perplexity by position), passkey, niah (multi-key needles), counting, "
        "selective_copy, flip_flop (answer accuracy by length); several allowed",
    )
    evaluate.add_argument(
        "--lengths",
        nargs="+",
        type=_positive_int,
        metavar="N",
        help="context lengths (default: the recipe's trainer.eval_lengths, else data.seq_len)",
    )
    evaluate.add_argument(
        "--depths",
        nargs="+",
        type=_fraction,
        metavar="F",
        help="fact depths in [0, 1] (default: the recipe's trainer.eval_depths)",
    )
    evaluate.add_argument("--samples", type=_positive_int, metavar="N", help="examples per cell")
    evaluate.add_argument(
        "--windows", type=_positive_int, metavar="N", help="held-out windows per ppl length"
    )
    evaluate.add_argument(
        "--out", type=Path, metavar="DIR", help="output directory (default RUN/eval/step_N)"
    )
    evaluate.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set model.rope_scaling='{rope_type: yarn, "
        "factor: 4}' or --set parallel.ring=2; repeatable",
    )
    evaluate.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="ranks (Ray workers when more than 1; default parallel.dp x ulysses x ring, "
        "dp 'auto' -> 1); sequences are sharded over parallel.ulysses x ring",
    )
    evaluate.add_argument(
        "--address", metavar="A", help="Ray cluster to join ('auto', 'ray://...'); default: local"
    )
    evaluate.set_defaults(handler=_eval)

    export = commands.add_parser("export", help="export a checkpoint as a Hugging Face model")
    export.add_argument("run_or_checkpoint", metavar="RUN_OR_CHECKPOINT")
    export.add_argument(
        "--hf", metavar="OUT", help="new or empty directory for the (merged) Hugging Face model"
    )
    export.add_argument(
        "--peft", metavar="OUT", help="new or empty directory for the adapters in peft's format"
    )
    export.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    export.add_argument(
        "--max-shard-size",
        type=shard_size,
        default="5GB",
        metavar="SIZE",
        help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB or bytes (default 5GB, as "
        "transformers); more than one shard gets model.safetensors.index.json",
    )
    export.set_defaults(handler=_export)

    convert = commands.add_parser(
        "convert", help="convert a GGUF Llama-family checkpoint to a Hugging Face directory"
    )
    convert.add_argument(
        "--gguf", required=True, metavar="FILE", help="the .gguf file (quantized or not)"
    )
    convert.add_argument(
        "--out", required=True, metavar="DIR", help="new or empty directory to write"
    )
    convert.set_defaults(handler=_convert)

    bench = commands.add_parser(
        "bench", help="run the benchmarks and write bench/results/REPORT.md (15-20 min)"
    )
    bench.add_argument(
        "names", nargs="*", metavar="NAME", help="benchmarks to run (default: all of them)"
    )
    bench.add_argument(
        "--report-only", action="store_true", help="rebuild REPORT.md from the JSON files only"
    )
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``longctx`` with ``argv`` (default: the process arguments); returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except (_UsageError, LongctxError) as error:
        print(f"error: {single_line(str(error))}", file=sys.stderr)
        return USAGE_ERROR
