"""The passkey line ``longctx train`` prints at the end of a local run that trains on passkey.

Scoring is ``longctx.eval.evaluate.passkey_accuracy`` (teacher-forced argmax over the answer
tokens, exact when greedy decoding would write the key); this module only picks the grid (the
trained length, evenly spread depths) and says it in one line next to the chance levels: a
``d``-digit key without a leading zero is one of ``9 x 10^(d-1)``, a digit one of ten.
"""

from __future__ import annotations

from pathlib import Path

from longctx.checkpoint.saved_model import load_trained_model, open_checkpoint
from longctx.eval.evaluate import passkey_accuracy

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
