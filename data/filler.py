"""The project's own filler text: grammatical English sentences from a small grammar.

Retrieval tasks hide a fact inside long filler. The filler must be (a) plain English so a
pretrained model reads it as ordinary text, (b) free of digits and of the task phrases so it
never looks like a needle, and (c) deterministic from a ``numpy.random.Generator`` so that a
sample is a pure function of its seed. The word lists and templates below were written for this
project; the grammar is a handful of sentence templates over them.
"""

from __future__ import annotations

import numpy as np

ADJECTIVES = (
    "quiet",
    "patient",
    "old",
    "young",
    "careful",
    "curious",
    "calm",
    "busy",
    "clever",
    "humble",
    "tall",
    "tired",
    "cheerful",
    "gentle",
    "brave",
    "kind",
    "thoughtful",
    "friendly",
    "shy",
    "wise",
)
PEOPLE = (
    "teacher",
    "baker",
    "farmer",
    "painter",
    "sailor",
    "carpenter",
    "traveler",
    "musician",
    "fisherman",
    "gardener",
    "shepherd",
    "miller",
    "weaver",
    "potter",
    "student",
    "doctor",
    "captain",
    "poet",
    "merchant",
    "nurse",
    "blacksmith",
    "librarian",
    "courier",
    "tailor",
)
COMMUNITIES = (
    "village",
    "harbor town",
    "valley",
    "school",
    "workshop",
    "market",
    "guild",
    "choir",
    "household",
    "crew",
    "neighborhood",
    "orchestra",
)
MOODS = ("calm", "bright", "quiet", "cold", "warm", "grey", "peaceful", "windy", "mild", "clear")
PLACES = (
    "the hill",
    "the square",
    "the shore",
    "the old mill",
    "the quiet lane",
    "the harbor wall",
    "the edge of town",
    "the wide field",
    "the stone bridge",
    "the little chapel",
    "the orchard",
    "the train station",
    "the river bank",
    "the market hall",
    "the pine woods",
    "the valley floor",
)
VERBS_PAST = (
    "walked",
    "waited",
    "rested",
    "worked",
    "sang",
    "wandered",
    "looked around",
    "listened",
    "stayed",
    "paused",
    "smiled",
    "read quietly",
    "kept watch",
    "cleaned up",
    "planted seeds",
)
ADVERBS = (
    "slowly",
    "happily",
    "carefully",
    "quietly",
    "again",
    "for a while",
    "without a word",
    "as usual",
    "once more",
    "with great care",
    "in silence",
    "all morning",
    "until noon",
)
TIMES = (
    "in the morning",
    "at dusk",
    "after the rain",
    "before sunrise",
    "on a cold day",
    "during the summer",
    "in the spring",
    "late at night",
    "after lunch",
    "at the end of autumn",
    "on market day",
    "when the bells rang",
    "as the wind rose",
    "under a grey sky",
)
WEATHER = (
    "the air was still",
    "a light wind moved the leaves",
    "the sky was clear",
    "clouds gathered over the hills",
    "rain fell softly on the roofs",
    "the sun warmed the stones",
    "fog covered the fields",
    "the evening light turned orange",
    "snow lay on the paths",
)
THOUGHTS = (
    "that patience is a kind of strength",
    "that every road leads somewhere",
    "that small things matter",
    "that the seasons always return",
    "that good work takes time",
    "that kindness is rarely wasted",
    "that the river never hurries",
    "that old friends are rare",
)

_TEMPLATES = (
    "The {adj} {person} {verb} {adv} near {place}.",
    "{Time}, the {adj} {person} {verb} by {place}.",
    "Near {place}, {weather}.",
    "The {person} and the {person2} {verb} together {time}.",
    "Everyone in the {community} knew {thought}.",
    "{Weather_cap}, and the {adj} {person} {verb} {adv}.",
    "It was {mood} {time}, so the {person} {verb} near {place}.",
    "The {adj} {person} believed {thought}.",
)


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


def _capitalize(phrase: str) -> str:
    return phrase[:1].upper() + phrase[1:]


def filler_sentence(rng: np.random.Generator) -> str:
    """One sentence of filler, a pure function of the generator's state."""
    template = _pick(rng, _TEMPLATES)
    time = _pick(rng, TIMES)
    weather = _pick(rng, WEATHER)
    return template.format(
        adj=_pick(rng, ADJECTIVES),
        person=_pick(rng, PEOPLE),
        person2=_pick(rng, PEOPLE),
        community=_pick(rng, COMMUNITIES),
        mood=_pick(rng, MOODS),
        verb=_pick(rng, VERBS_PAST),
        adv=_pick(rng, ADVERBS),
        place=_pick(rng, PLACES),
        time=time,
        Time=_capitalize(time),
        weather=weather,
        Weather_cap=_capitalize(weather),
        thought=_pick(rng, THOUGHTS),
    )


def filler_sentences(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` filler sentences in order."""
    return [filler_sentence(rng) for _ in range(count)]
