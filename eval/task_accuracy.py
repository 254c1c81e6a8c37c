"""Answer accuracy on the algorithmic tasks: counting, selective copy and flip-flop (SPECS 4).

These tasks test what a position encoding lets a model do with its context (count occurrences,
copy sparse items in order, track the last write), not where a fact sits, so their grid has one
axis: the context length. A model trained at one length is evaluated there and at 2x, 4x, ...
(the CoPE studies, ``recipes/studies/cope_*.yaml``).

Per length, ``samples`` held-out examples come from the training generators
(``make_eval_example``: example ``k`` uses seed ``seed + k``, so every model sees the same
examples, and the stream differs from the training rows). Scoring is teacher-forced, as for
the retrieval tasks (``eval/evaluate.py``): one forward over ``prompt + answer``, the argmax
at every answer position. Two numbers per length:

- ``token_accuracy``: answer tokens predicted right / answer tokens (a selective-copy answer of
  8 words earns partial credit, a two-digit count one digit);
- ``accuracy``: examples whose every answer token is right, which is exactly when greedy
  decoding reproduces the answer.

Registered as eval tasks ``counting``, ``selective_copy`` and ``flip_flop`` of ``longctx eval
--task`` and ``trainer.eval_tasks`` (``eval/report.py`` runs and records them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from longctx.data import Tokenizer, make_eval_example
from longctx.data.config import TaskParams
from longctx.data.sample import TargetTooShort
from longctx.errors import LongctxError
from longctx.eval.evaluate import ALGORITHMIC_TASKS, score_answer
from longctx.eval.sequence_scorer import SequenceScorer
from longctx.model import Transformer

if TYPE_CHECKING:
    from longctx.parallel.batch import BatchTransform
    from longctx.parallel.mesh import ParallelMesh


@dataclass
class TaskAccuracyResult:
    """Accuracy of one algorithmic task per length: ``accuracy[i]`` (exact match) and
    ``token_accuracy[i]`` (answer tokens right) at ``lengths[i]``, each over ``samples``
    examples; ``examples`` lists every scored example."""

    task: str
    lengths: list[int]
    samples: int
    seed: int
    accuracy: list[float]
    token_accuracy: list[float]
    examples: list[dict] = field(default_factory=list)

    @property
    def mean_accuracy(self) -> float:
        return float(np.mean(self.accuracy))

    @property
    def mean_token_accuracy(self) -> float:
        return float(np.mean(self.token_accuracy))

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "mean_accuracy": self.mean_accuracy,
            "mean_token_accuracy": self.mean_token_accuracy,
        }


def check_task_lengths(
    task: str,
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    samples: int,
    *,
    seed: int = 0,
    params: TaskParams | None = None,
) -> None:
    """One-line errors for an unusable evaluation of ``task`` (before any model work): an
    unknown task, no lengths, no samples, or a length too short for one of its examples."""
    if task not in ALGORITHMIC_TASKS:
        raise LongctxError(f"unknown algorithmic task {task!r}; choose one of {ALGORITHMIC_TASKS}")
    if not lengths or min(lengths) < 2:
        raise LongctxError(f"eval lengths {list(lengths)} must be a non-empty list of >= 2 tokens")
    if samples < 1:
        raise LongctxError(f"eval samples={samples} must be at least 1")
    for length in lengths:
        for k in range(samples):  # each example's fixed text differs with its seed
            try:
                make_eval_example(task, tokenizer, length, seed=seed + k, params=params)
            except TargetTooShort as short:
                raise LongctxError(
                    f"eval length {length} is too short for task {task!r}: its example needs at "
                    f"least {short.needed} tokens; use eval lengths >= {short.needed}"
                ) from None


def score_length(
    scorer: SequenceScorer,
    tokenizer: Tokenizer,
    task: str,
    length: int,
    *,
    samples: int,
    seed: int,
    params: TaskParams | None,
) -> list[dict]:
    """The ``samples`` examples of ``task`` at ``length``, each scored: its seed, answer and
    answer token ids, the teacher-forced argmax tokens, hits, exactness and answer NLL."""
    examples = []
    for k in range(samples):
        sample = make_eval_example(task, tokenizer, length, seed=seed + k, params=params)
        predicted, nll = score_answer(scorer, sample.prompt_ids, sample.answer_ids)
        hits = sum(p == a for p, a in zip(predicted, sample.answer_ids))
        examples.append(
            {
                "length": length,
                "seed": seed + k,
                "tokens": len(sample),
                "answer": sample.answer,
                "answer_ids": list(sample.answer_ids),
                "predicted_ids": predicted,
                "predicted": tokenizer.decode(predicted),
                "hits": hits,
                "correct": hits == len(sample.answer_ids),
                "answer_nll": nll,
            }
        )
    return examples


def task_accuracy(
    model: Transformer,
    tokenizer: Tokenizer,
    task: str,
    lengths: Sequence[int],
    *,
    samples: int = 8,
    seed: int = 0,
    params: TaskParams | None = None,
    mesh: ParallelMesh | None = None,
    transform: BatchTransform | None = None,
) -> TaskAccuracyResult:
    """Accuracy of ``task`` (counting | selective_copy | flip_flop) at each of ``lengths``,
    ``samples`` examples per length (see the module docstring). ``params``: the recipe's
    ``data.task_params``; ``mesh``: score over the sequence-parallel mesh ``model`` runs on;
    ``transform``: the attention core's batch transform (``SequenceScorer``). The caller puts ``model`` in eval mode (``run_eval_suite`` does)."""
    check_task_lengths(task, tokenizer, lengths, samples, seed=seed, params=params)
    scorer = SequenceScorer(model, mesh, transform=transform)
    accuracy, token_accuracy, examples = [], [], []
    for length in lengths:
        scored = score_length(
            scorer, tokenizer, task, length, samples=samples, seed=seed, params=params
        )
        answer_tokens = sum(len(example["answer_ids"]) for example in scored)
        accuracy.append(sum(example["correct"] for example in scored) / samples)
        token_accuracy.append(sum(example["hits"] for example in scored) / answer_tokens)
        examples += scored
    return TaskAccuracyResult(
        task, list(lengths), samples, seed, accuracy, token_accuracy, examples
    )


def format_task_table(result: TaskAccuracyResult) -> str:
    """One row per length: exact-match and answer-token accuracy, for the terminal."""
    header = f"{result.task:>14} | {'exact':>7} {'tokens':>7}  ({result.samples} per length)"
    lines = [header, "-" * len(header)]
    for length, exact, tokens in zip(result.lengths, result.accuracy, result.token_accuracy):
        lines.append(f"{length:>14} | {exact:>7.3f} {tokens:>7.3f}")
    return "\n".join(lines)


def accuracy_figure(result: TaskAccuracyResult) -> Figure:
    """Exact-match and answer-token accuracy against the context length (log2 axis)."""
    figure = Figure(figsize=(6, 3.6))
    axes = figure.subplots()
    axes.plot(result.lengths, result.accuracy, "o-", label="exact match")
    axes.plot(result.lengths, result.token_accuracy, "s--", label="answer tokens")
    axes.set_xscale("log", base=2)
    axes.set_xticks(result.lengths, [str(n) for n in result.lengths])
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("accuracy")
    axes.set_title(f"{result.task} accuracy ({result.samples} per length)")
    axes.legend()
    figure.tight_layout()
    return figure


def task_scalars(result: TaskAccuracyResult) -> dict[str, float]:
    """TensorBoard scalars: ``eval_{task}/accuracy``, ``eval_{task}/token_accuracy`` (means
    over lengths) and both per length (``eval_{task}/L{length}/...``)."""
    prefix = f"eval_{result.task}"
    scalars = {
        f"{prefix}/accuracy": result.mean_accuracy,
        f"{prefix}/token_accuracy": result.mean_token_accuracy,
    }
    for length, exact, tokens in zip(result.lengths, result.accuracy, result.token_accuracy):
        scalars[f"{prefix}/L{length}/accuracy"] = exact
        scalars[f"{prefix}/L{length}/token_accuracy"] = tokens
    return scalars
