"""The synthetic task registry: build a task by name, and make evaluation examples.

Training draws task samples through the loader; evaluation code calls ``make_eval_example``
with a length, a depth and a seed, and scores the model's continuation of ``prompt_ids``
against ``answer_ids`` / ``answer``. The same (task, length, depth, seed, params) always gives
the same example, so an evaluation grid is reproducible across runs and machines.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from longctx.data.algorithmic_tasks import (
    ALGORITHMIC_PHRASES,
    CountingTask,
    FlipFlopTask,
    SelectiveCopyTask,
)
from longctx.data.config import TaskParams
from longctx.data.retrieval_tasks import RETRIEVAL_PHRASES, KeyValueTask, NiahTask, PasskeyTask
from longctx.data.sample import Sample
from longctx.data.tokenizer import Tokenizer
from longctx.errors import LongctxError

GENERATED_TASKS = ("passkey", "niah", "kv_retrieval", "counting", "selective_copy", "flip_flop")
# A fixed stream id per task, so that an eval example of one task never shares its random
# stream with another task's example of the same seed.
_EVAL_STREAM = {name: 0xE7A1 + index for index, name in enumerate(GENERATED_TASKS)}


class Task(Protocol):
    """A deterministic generator of samples of one task."""

    name: str

    def sample(
        self,
        rng: np.random.Generator,
        target_tokens: int,
        tokenizer: Tokenizer,
        depth: float | None = None,
    ) -> Sample: ...


def build_task(name: str, params: TaskParams | None = None) -> Task:
    """The generator for task ``name`` with its parameters from ``params`` (defaults if None)."""
    params = params or TaskParams()
    builders = {
        "passkey": lambda: PasskeyTask(params.passkey),
        "niah": lambda: NiahTask(params.niah),
        "kv_retrieval": lambda: KeyValueTask(params.kv_retrieval),
        "counting": lambda: CountingTask(params.counting),
        "selective_copy": lambda: SelectiveCopyTask(params.selective_copy),
        "flip_flop": lambda: FlipFlopTask(params.flip_flop),
    }
    if name not in builders:
        raise LongctxError(f"unknown task {name!r}; choose one of {', '.join(GENERATED_TASKS)}")
    return builders[name]()


def make_eval_example(
    task: str,
    tokenizer: Tokenizer,
    length: int,
    *,
    seed: int,
    depth: float | None = None,
    params: TaskParams | None = None,
) -> Sample:
    """One evaluation example of ``task`` with at most ``length`` tokens (prompt + answer + eos).

    ``depth`` in [0, 1] places the fact for passkey / niah / kv_retrieval (None draws it). The
    example depends only on the arguments (and the tokenizer), never on training state.
    """
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise LongctxError(f"depth={depth} is outside [0, 1]; give a fraction of the context")
    generator = build_task(task, params)
    rng = np.random.default_rng([_EVAL_STREAM[task], seed, length])
    return generator.sample(rng, length, tokenizer, depth=depth)


def task_phrases() -> list[str]:
    """The fixed phrases and symbol words of every task, for tokenizer training."""
    return list(RETRIEVAL_PHRASES + ALGORITHMIC_PHRASES)
