"""Long-context evaluation: perplexity by position bucket, passkey and multi-key needle accuracy.

Every sequence is scored by a ``SequenceScorer`` (``eval/sequence_scorer.py``): one
``forward_hidden`` over the whole sequence and the ``lm_head`` in tiles of positions, so
``[T, vocab]`` logits never exist at once. With a ``mesh`` (``parallel.ulysses x ring > 1`` and a
``parallelize``d model) the sequence is sharded over the sequence-parallel group as in training
and the per-token results are gathered in global order, so the results equal the
single-process evaluation while each rank holds only ``T / sp`` tokens: evaluation runs at the
full extended length. Every rank of the world makes the same calls and gets the same results
(data-parallel groups all evaluate every sequence: under ZeRO-3 each forward is a collective of
the whole world).

- **Perplexity by position** (``position_perplexity``): the held-out documents are joined into
  one token stream (each keeps its ``bos``/``eos``), cut into windows of ``length`` tokens with
  positions ``0..length-1``, and the NLL of predicting token ``t`` (from tokens ``< t``) is
  averaged over windows inside buckets of ``t`` (``position_buckets``): 0-1k, 1k-2k, 2k-4k, ...
  so that a model that uses its whole context shows a loss that stays flat (or falls) at the
  long positions.
- **Retrieval accuracy** (``retrieval_accuracy``, ``passkey_accuracy``): per (length, depth)
  cell, ``samples`` generated examples (``make_eval_example``, reproducible by seed). Scoring is
  teacher-forced: one forward over ``prompt + answer`` and the argmax at every answer position.
  An example is correct when every argmax equals the answer token, which is exactly when greedy
  decoding of ``len(answer)`` tokens reproduces the answer (if all teacher-forced argmaxes
  match, greedy decoding walks the same prefixes), at the cost of one forward instead of one per
  answer token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from longctx.data import TokenDocument, Tokenizer, make_eval_example
from longctx.data.config import TaskParams
from longctx.errors import LongctxError
from longctx.eval.sequence_scorer import SequenceScorer
from longctx.model import Transformer

if TYPE_CHECKING:
    from longctx.parallel.batch import BatchTransform
    from longctx.parallel.mesh import ParallelMesh

RETRIEVAL_TASKS = ("passkey", "niah")
ALGORITHMIC_TASKS = ("counting", "selective_copy", "flip_flop")  # eval/task_accuracy.py
EVAL_TASKS = ("ppl", *RETRIEVAL_TASKS, *ALGORITHMIC_TASKS)
_FIRST_BUCKET = 1024  # tokens in the first bucket at full scale (0-1k, 1k-2k, 2k-4k, ...)
_SMALL_BUCKETS = 8  # lengths below 8k: the first bucket is length / 8 (then doubling)
_CURVE_POINTS = 256  # the loss-by-position curve kept in the results, at most this many points


def position_buckets(length: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of predicted-token positions for windows of ``length`` tokens.

    Doubling buckets after a first one of ``min(1024, length // 8)`` tokens (at least 2), the
    last cut at ``length``: 8192 -> 0-1k, 1k-2k, 2k-4k, 4k-8k; 64 -> 0-8, 8-16, 16-32, 32-64.
    Position 0 is never predicted, so the first bucket scores positions ``1..end-1``.
    """
    if length < 2:
        raise LongctxError(f"eval length {length} is too short; use at least 2 tokens")
    first = max(2, min(_FIRST_BUCKET, length // _SMALL_BUCKETS))  # (0, 1) would score nothing
    edges = [0, first]
    while edges[-1] < length:
        edges.append(min(2 * edges[-1], length))
    return list(zip(edges[:-1], edges[1:]))


def held_out_windows(documents: Sequence[TokenDocument], length: int, windows: int) -> Tensor:
    """Up to ``windows`` consecutive windows ``[n, length]`` of the joined held-out documents;
    a ``LongctxError`` when they hold fewer than ``length`` tokens in total."""
    stream = np.concatenate([doc.ids for doc in documents]) if documents else np.zeros(0)
    count = min(windows, len(stream) // length)
    if count == 0:
        raise LongctxError(
            f"the held-out documents hold {len(stream)} tokens, fewer than the eval length "
            f"{length}; lower the eval lengths or raise data.eval_fraction (or add text)"
        )
    return torch.from_numpy(stream[: count * length].astype(np.int64)).view(count, length)


@dataclass
class PerplexityResult:
    """Mean NLL per position bucket over ``windows`` windows of ``length`` tokens; ``curve`` is
    the mean NLL per position averaged over ``curve_step`` consecutive positions (plot data)."""

    length: int
    windows: int
    buckets: list[dict[str, float]]
    curve: list[float]
    curve_step: int
    mean_nll: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def position_perplexity(
    model: Transformer,
    documents: Sequence[TokenDocument],
    length: int,
    *,
    windows: int = 4,
    mesh: ParallelMesh | None = None,
    transform: BatchTransform | None = None,
) -> PerplexityResult:
    """Perplexity by position bucket on held-out ``documents`` at ``length`` tokens (see the
    module docstring). Each bucket: ``start``, ``end``, ``tokens`` scored, ``nll`` (mean),
    ``ppl`` (its exp). ``mesh``: score over the sequence-parallel mesh ``model`` runs on;
    ``transform``: the attention core's batch transform (``SequenceScorer``)."""
    scorer = SequenceScorer(model, mesh, transform=transform)
    rows = held_out_windows(documents, length, windows)  # [n, L]
    nll_sum = torch.zeros(length - 1, dtype=torch.float64)  # [L-1], per predicted position
    for row in rows:
        nll_sum += scorer.token_nll(row)
    per_position = nll_sum / rows.shape[0]  # [L-1]: position t+1 at index t
    buckets = []
    for start, end in position_buckets(length):
        values = per_position[max(start, 1) - 1 : end - 1]
        nll = float(values.mean())
        buckets.append(
            {"start": start, "end": end, "tokens": values.numel() * rows.shape[0], "nll": nll}
        )
        buckets[-1]["ppl"] = float(np.exp(nll))
    step = max(1, -(-(length - 1) // _CURVE_POINTS))
    curve = [float(per_position[i : i + step].mean()) for i in range(0, length - 1, step)]
    return PerplexityResult(length, rows.shape[0], buckets, curve, step, float(per_position.mean()))


@dataclass
class RetrievalResult:
    """Accuracy of one retrieval task on a grid: ``accuracy[i][j]`` (the answer's content text
    predicted exactly, ``score_example``) and ``token_accuracy[i][j]`` (content tokens right) at ``lengths[i]``, ``depths[j]``, each over
    ``samples`` examples; ``examples`` lists every scored example."""

    task: str
    lengths: list[int]
    depths: list[float]
    samples: int
    seed: int
    accuracy: list[list[float]]
    token_accuracy: list[list[float]]
    examples: list[dict] = field(default_factory=list)

    @property
    def mean_accuracy(self) -> float:
        return float(np.mean(self.accuracy))

    def to_dict(self) -> dict:
        return {**asdict(self), "mean_accuracy": self.mean_accuracy}


@dataclass
class ExampleScore:
    """One retrieval example scored on its answer's content: ``correct`` when the text the
    model predicts at the content tokens equals the answer's (the digits of a passkey, a
    needle's value), ``hits`` of ``tokens`` content tokens right, the content's summed NLL."""

    correct: bool
    hits: int
    tokens: int
    predicted: str
    answer_nll: float


def separator_tokens(tokenizer: Tokenizer, answer_ids: list[int]) -> int:
    """How many leading answer tokens are only the separator between the prompt and the answer
    (a byte-level BPE's lone space token before digits, a sentencepiece ``▁``): tokens whose
    text is whitespace. They belong to the prompt's natural tokenization, not to the answer: a
    model that writes " the 12345" knows the key, so they are teacher-forced, never scored."""
    lead = 0
    while lead < len(answer_ids) - 1 and not tokenizer.decode(answer_ids[: lead + 1]).strip():
        lead += 1
    return lead


def score_example(
    scorer: SequenceScorer, tokenizer: Tokenizer, prompt_ids: list[int], answer_ids: list[int]
) -> ExampleScore:
    """Score one example as RULER compares strings, in one teacher-forced forward: the
    separator tokens (``separator_tokens``) join the prompt, and the model's argmax at each
    content token is decoded and compared with the answer's content text (both stripped)."""
    lead = separator_tokens(tokenizer, answer_ids)
    content = answer_ids[lead:]
    predicted, nll = score_answer(scorer, [*prompt_ids, *answer_ids[:lead]], content)
    text = tokenizer.decode(predicted).strip()
    return ExampleScore(
        correct=text == tokenizer.decode(content).strip(),
        hits=sum(p == a for p, a in zip(predicted, content)),
        tokens=len(content),
        predicted=text,
        answer_nll=nll,
    )


def score_answer(
    scorer: SequenceScorer, prompt_ids: list[int], answer_ids: list[int]
) -> tuple[list[int], float]:
    """Teacher-forced argmax tokens at the answer positions and the answer's summed NLL: one
    forward over ``prompt + answer``; the output at the prompt's last position predicts the
    first answer token."""
    ids = torch.tensor([*prompt_ids, *answer_ids])  # [P + A]
    return scorer.answer_scores(ids, len(prompt_ids) - 1, len(answer_ids))


def check_grid(task: str, lengths: Sequence[int], depths: Sequence[float], samples: int) -> None:
    """One-line errors for an unusable grid (before any model work)."""
    if task not in RETRIEVAL_TASKS:
        raise LongctxError(f"unknown retrieval task {task!r}; choose one of {RETRIEVAL_TASKS}")
    if not lengths or any(length < 2 for length in lengths):
        raise LongctxError(f"eval lengths {list(lengths)} must be a non-empty list of >= 2 tokens")
    if not depths or any(not 0.0 <= depth <= 1.0 for depth in depths):
        raise LongctxError(f"eval depths {list(depths)} must be non-empty fractions in [0, 1]")
    if samples < 1:
        raise LongctxError(f"eval samples={samples} must be at least 1")


def retrieval_accuracy(
    model: Transformer,
    tokenizer: Tokenizer,
    task: str,
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    samples: int = 2,
    seed: int = 0,
    params: TaskParams | None = None,
    mesh: ParallelMesh | None = None,
    transform: BatchTransform | None = None,
) -> RetrievalResult:
    """Accuracy of ``task`` (passkey | niah) on the ``lengths x depths`` grid, ``samples`` per
    cell; example ``k`` of a cell uses seed ``seed + k`` (the same examples for every model).
    ``mesh``: score over the sequence-parallel mesh ``model`` runs on; ``transform``: the
    attention core's batch transform (``SequenceScorer``)."""
    check_grid(task, lengths, depths, samples)
    scorer = SequenceScorer(model, mesh, transform=transform)
    accuracy, token_accuracy, examples = [], [], []
    for length in lengths:
        exact_row, token_row = [], []
        for depth in depths:
            exact, right, total = 0, 0, 0
            for k in range(samples):
                sample = make_eval_example(
                    task, tokenizer, length, seed=seed + k, depth=depth, params=params
                )
                score = score_example(scorer, tokenizer, sample.prompt_ids, sample.answer_ids)
                exact += score.correct
                right, total = right + score.hits, total + score.tokens
                examples.append(
                    {
                        "length": length,
                        "depth": depth,
                        "seed": seed + k,
                        "answer": sample.answer,
                        "predicted": score.predicted,
                        "correct": score.correct,
                        "answer_nll": score.answer_nll,
                    }
                )
            exact_row.append(exact / samples)
            token_row.append(right / total)
        accuracy.append(exact_row)
        token_accuracy.append(token_row)
    return RetrievalResult(
        task, list(lengths), list(depths), samples, seed, accuracy, token_accuracy, examples
    )


def passkey_accuracy(
    model: Transformer,
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int = 2,
    seed: int = 0,
    *,
    params: TaskParams | None = None,
    mesh: ParallelMesh | None = None,
    transform: BatchTransform | None = None,
) -> RetrievalResult:
    """Passkey accuracy table (``result.accuracy[length][depth]``, exact match of the digits,
    ``samples`` per cell) of ``model`` in eval mode; ``format_table`` prints it. ``params``: the
    recipe's ``data.task_params`` (key digits), defaults otherwise; ``mesh``: score over the
    sequence-parallel mesh ``model`` runs on; ``transform``: the attention core's batch
    transform."""
    was_training = model.training
    model.eval()
    try:
        return retrieval_accuracy(
            model,
            tokenizer,
            "passkey",
            lengths,
            depths,
            samples=samples,
            seed=seed,
            params=params,
            mesh=mesh,
            transform=transform,
        )
    finally:
        model.train(was_training)


def format_table(result: RetrievalResult) -> str:
    """The accuracy grid as text: one row per length, one column per depth."""
    header = f"{result.task:>10} | " + " ".join(f"d={depth:<5.2f}" for depth in result.depths)
    lines = [header, "-" * len(header)]
    for length, row in zip(result.lengths, result.accuracy):
        lines.append(f"{length:>10} | " + " ".join(f"{value:<7.2f}" for value in row))
    return "\n".join(lines)


def format_perplexity(result: PerplexityResult) -> str:
    """The position buckets as text: range, tokens, mean NLL, perplexity."""
    lines = [f"perplexity by position at length {result.length} ({result.windows} windows)"]
    for bucket in result.buckets:
        lines.append(
            f"{bucket['start']:>8}-{bucket['end']:<8} tokens {bucket['tokens']:>7} "
            f"nll {bucket['nll']:.4f} ppl {bucket['ppl']:.2f}"
        )
    return "\n".join(lines)
