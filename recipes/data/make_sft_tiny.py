"""Write ``recipes/data/sft-tiny.jsonl``, the chat data of ``recipes/sft-tiny.yaml``:
64 long-context retrieval conversations, each a passage of CPython's pydoc topics with a code
word hidden in it, a question for the word and a follow-up about the passage's topic.

Deterministic (seeded); run from the repository root:
``.venv/bin/python recipes/data/make_sft_tiny.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from pydoc_data.topics import topics

CONVERSATIONS = 64
PASSAGE_WORDS = (80, 140)
WORDS = ["amber", "basalt", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo"]
OUT = Path(__file__).with_name("sft-tiny.jsonl")


def conversation(rng: random.Random, name: str, text: str) -> dict:
    """One chat row: system, a user passage with the code word, two assistant answers."""
    words = text.split()
    start = rng.randrange(max(1, len(words) - PASSAGE_WORDS[1]))
    passage = words[start : start + rng.randint(*PASSAGE_WORDS)]
    cut = rng.randrange(len(passage))
    word = rng.choice(WORDS)
    passage = " ".join([*passage[:cut], f"The code word is {word}.", *passage[cut:]])
    return {
        "messages": [
            {"role": "system", "content": "You answer questions about the text you are given."},
            {"role": "user", "content": f"{passage}\n\nWhat is the code word?"},
            {"role": "assistant", "content": f"The code word is {word}."},
            {"role": "user", "content": "Which documentation topic is the text from?"},
            {"role": "assistant", "content": f"It is from the topic {name}."},
        ]
    }


def main() -> None:
    rng = random.Random(0)
    names = rng.sample(sorted(topics), CONVERSATIONS)
    rows = [json.dumps(conversation(rng, name, topics[name])) for name in names]
    OUT.write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} conversations to {OUT}")


if __name__ == "__main__":
    main()
