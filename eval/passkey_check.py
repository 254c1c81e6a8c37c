"""The passkey results ``longctx train`` prints for a local run that trains on passkey.

Scoring is ``longctx.eval.evaluate.passkey_accuracy`` (teacher-forced argmax over the answer
tokens, exact when greedy decoding would write the key); this module only picks the grid (the
trained length, evenly spread depths) and says it: ``passkey_line`` in one line next to the
chance levels (a ``d``-digit key without a leading zero is one of ``9 x 10^(d-1)``, a digit one
of ten), ``format_passkey_rows`` as the before / after table of a staged run, one labelled row
per model setting with its mean and the 95% Wilson interval of that mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from longctx.checkpoint.saved_model import load_trained_model, open_checkpoint
from longctx.eval.evaluate import RetrievalResult, passkey_accuracy

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def passkey_line(checkpoint: str | Path, examples: int) -> str:
    """``passkey at 256 tokens: 78% keys retrieved (chance 0.11%), answer tokens 93% right
    (chance 10%)`` for the final checkpoint, over about ``examples`` prompts."""
    saved = open_checkpoint(checkpoint)
    recipe = saved.recipe
    params = recipe.data.task_params
    length = recipe.data.seq_len
    result = passkey_accuracy(
        load_trained_model(saved),
        saved.tokenizer,
        [length],
        list(DEPTHS),
        samples=max(1, examples // len(DEPTHS)),
        seed=recipe.data.seed + 1,
        params=params,
    )
    token_rate = sum(result.token_accuracy[0]) / len(DEPTHS)
    key_chance = 1.0 / (9 * 10 ** (params.passkey.digits - 1))
    return (
        f"passkey at {length} tokens: {result.mean_accuracy:.0%} keys retrieved "
        f"(chance {key_chance:.2%}), answer tokens {token_rate:.0%} right (chance 10%)"
    )


def wilson_interval(hits: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a rate of ``hits`` in ``total`` trials (95% for z = 1.96):
    unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or ``total``."""
    if total <= 0 or not 0 <= hits <= total:
        raise ValueError(f"wilson_interval needs 0 <= hits <= total, total > 0; got {hits}/{total}")
    rate, z2 = hits / total, z * z
    centre = (rate + z2 / (2 * total)) / (1 + z2 / total)
    half = z * math.sqrt(rate * (1 - rate) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def keys_retrieved(result: RetrievalResult) -> tuple[int, int]:
    """(keys retrieved exactly, prompts scored) over the whole grid of ``result``."""
    if result.examples:
        return sum(bool(e["correct"]) for e in result.examples), len(result.examples)
    cells = [value for row in result.accuracy for value in row]
    return round(sum(cells) * result.samples), len(cells) * result.samples


def format_passkey_rows(rows: Sequence[tuple[str, RetrievalResult]]) -> str:
    """One line per ``(label, result)``: the accuracy at each depth (one length per result),
    then the keys retrieved over all the row's prompts with the 95% Wilson interval::

        weights, RoPE at 1024 tokens        | d=0.10 d=0.30 d=0.50 d=0.70 d=0.90 | keys (95% CI)
        stage 1, plain RoPE (no scaling)    | 0.05   0.00   0.10   0.05   0.00   |   4% (2-10%)
    """
    if not rows:
        raise ValueError("format_passkey_rows needs at least one row")
    lengths = {length for _, result in rows for length in result.lengths}
    depths = rows[0][1].depths
    if len(lengths) != 1 or any(result.depths != depths for _, result in rows):
        raise ValueError("format_passkey_rows needs one length and the same depths in every row")
    title = f"weights, RoPE at {lengths.pop()} tokens"
    width = max(len(title), *(len(label) for label, _ in rows))
    cells = " ".join(f"d={depth:<5.2f}" for depth in depths)
    lines = [f"{title:<{width}} | {cells} | keys retrieved (95% CI)"]
    lines.append("-" * len(lines[0]))
    for label, result in rows:
        hits, total = keys_retrieved(result)
        low, high = wilson_interval(hits, total)
        values = " ".join(f"{value:<7.2f}" for value in result.accuracy[0])
        lines.append(
            f"{label:<{width}} | {values}| {hits / total:4.0%} ({low:.0%}-{high:.0%}) of {total}"
        )
    return "\n".join(lines)
