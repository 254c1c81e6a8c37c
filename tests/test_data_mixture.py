"""Source mixtures by tokens (``longctx.data.mixture``): the achieved token fractions match the
weights, long-document upsampling raises the long documents' share by its formula, the plan is
seeded, and a mixed loader resumes mid-epoch at the same batch."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from longctx.data.config import DataConfig, LongUpsampling
from longctx.data.corpus import InMemoryCorpus
from longctx.data.dataset import build_datasets, load_corpus
from longctx.data.loader import PackedLoader
from longctx.data.mixture import plan_mixture
from longctx.data.tokenizer import load_tokenizer, train_tokenizer

# Rounding a document's draw count moves its source's tokens by at most its length; over
# thousands of documents the achieved fraction stays within this of the weight.
FRACTION_TOLERANCE = 0.01


def _corpus(rng: np.random.Generator, count: int, low: int, high: int) -> InMemoryCorpus:
    return InMemoryCorpus([np.zeros(n, dtype=np.int64) for n in rng.integers(low, high, count)])


def _achieved(plan, corpora) -> np.ndarray:
    lengths = [c.document_lengths() for c in corpora]
    tokens = np.zeros(len(corpora))
    for source, document in zip(plan.sources, plan.documents):
        tokens[source] += lengths[source][document]
    return tokens / tokens.sum()


@pytest.mark.parametrize("weights", [(0.6, 0.4), (0.1, 0.9), (0.25, 0.25, 0.5)])
def test_achieved_token_fractions_match_the_weights(weights):
    rng = np.random.default_rng(5)
    # Sources of very different sizes and document lengths: books, web pages, snippets.
    shapes = [(300, 2000, 8000), (4000, 50, 400), (2500, 20, 120)][: len(weights)]
    corpora = [_corpus(rng, *shape) for shape in shapes]
    plan = plan_mixture(corpora, weights, None, np.random.default_rng(1), ["a", "b", "c"])
    achieved = _achieved(plan, corpora)
    expected = np.asarray(weights) / sum(weights)
    assert np.abs(achieved - expected).max() < FRACTION_TOLERANCE
    # The epoch holds as many tokens as the sources together (up to rounding).
    natural = sum(int(c.document_lengths().sum()) for c in corpora)
    assert plan.drawn_tokens.sum() == pytest.approx(natural, rel=FRACTION_TOLERANCE)
    assert np.array_equal(plan.drawn_tokens / plan.drawn_tokens.sum(), achieved)


@pytest.mark.parametrize("factor", [3.0, 0.5])
def test_upsampling_scales_the_long_documents_share_by_the_formula(factor):
    rng = np.random.default_rng(9)
    lengths = np.concatenate([rng.integers(100, 900, 3000), rng.integers(1000, 5000, 300)])
    corpus = InMemoryCorpus([np.zeros(n, dtype=np.int64) for n in lengths])
    upsampling = LongUpsampling(min_tokens=1000, factor=factor)
    plan = plan_mixture([corpus], [1.0], upsampling, np.random.default_rng(2), ["one"])
    long_natural = float(lengths[lengths >= 1000].sum())
    short_natural = float(lengths[lengths < 1000].sum())
    expected = factor * long_natural / (factor * long_natural + short_natural)
    drawn = lengths[plan.documents]
    assert drawn[drawn >= 1000].sum() / drawn.sum() == pytest.approx(expected, abs=0.01)
    assert plan.drawn_long_tokens == drawn[drawn >= 1000].sum()
    assert drawn.sum() == pytest.approx(lengths.sum(), rel=0.01)


def test_the_plan_is_a_function_of_the_seed():
    rng = np.random.default_rng(3)
    corpora = [_corpus(rng, 200, 10, 100), _corpus(rng, 50, 100, 400)]
    up = LongUpsampling(min_tokens=200, factor=2.0)

    def plan(seed):
        return plan_mixture(corpora, [0.7, 0.3], up, np.random.default_rng(seed), ["a", "b"])

    first, again, other = plan(4), plan(4), plan(5)
    assert np.array_equal(first.sources, again.sources)
    assert np.array_equal(first.documents, again.documents)
    assert not np.array_equal(first.documents, other.documents)


def test_weights_are_validated():
    bad = {
        "negative": [{"path": "a", "weight": -1.0}, {"path": "b", "weight": 2.0}],
        "sum to 0": [{"path": "a", "weight": 0.0}, {"path": "b", "weight": 0.0}],
        "some missing": [{"path": "a", "weight": 1.0}, "b"],
    }
    needles = {"negative": "negative", "sum to 0": "sum to 0", "some missing": "every entry"}
    for case, sources in bad.items():
        with pytest.raises(ValidationError, match=needles[case]):
            DataConfig(sources=sources)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Books (few long documents of one vocabulary) and web pages (many short ones of another),
    and a tokenizer trained on both."""
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    books = root / "books.jsonl"
    web = root / "web.jsonl"
    books_words, web_words = ["mountain", "forest"], ["click", "login"]
    books.write_text(
        "".join(
            json.dumps({"text": " ".join(rng.choice(books_words, rng.integers(300, 900)))}) + "\n"
            for _ in range(40)
        )
    )
    web.write_text(
        "".join(
            json.dumps({"text": " ".join(rng.choice(web_words, rng.integers(10, 60)))}) + "\n"
            for _ in range(400)
        )
    )
    out = root / "tokenizer.model"
    train_tokenizer([str(books), str(web)], 300, str(out))
    return books, web, load_tokenizer(str(out))


def _mixed_config(books, web, **overrides) -> DataConfig:
    fields = {
        "sources": [
            {"path": str(books), "weight": 0.3},
            {"path": str(web), "weight": 0.7},
        ],
        "tasks": {"text": 1.0},
        "seq_len": 128,
        "eval_fraction": 0.1,
        "long_upsampling": {"min_tokens": 400, "factor": 2.0},
        "seed": 7,
    }
    return DataConfig(**{**fields, **overrides})


def test_packed_rows_hold_the_sources_in_the_weighted_proportions(two_sources):
    """Counted on the packed rows: the tokens of the web vocabulary make 70% of the scored
    tokens (within the stated tolerance plus the document-level rounding of 40 books)."""
    books, web, tokenizer = two_sources
    config = _mixed_config(books, web, long_upsampling=None)
    splits = build_datasets(config, tokenizer)
    web_ids = {i for word in ("click", "login") for i in tokenizer.encode(word)}
    book_ids = {i for word in ("mountain", "forest") for i in tokenizer.encode(word)}
    assert not web_ids & book_ids
    ids = np.concatenate(
        [splits.train.row(0, i)["input_ids"] for i in range(splits.train.num_rows)]
    )
    web_tokens = np.isin(ids, list(web_ids)).sum()
    book_tokens = np.isin(ids, list(book_ids)).sum()
    assert web_tokens / (web_tokens + book_tokens) == pytest.approx(0.7, abs=0.03)
    line = splits.train.mixture_description
    assert "web.jsonl" in line and "books.jsonl" in line and "weight 0.70" in line
    # Every source keeps held-out documents of its own.
    corpus = load_corpus(config, tokenizer)
    assert corpus.eval_documents and set(corpus.train_source_ids.tolist()) == {0, 1}


def test_mixed_loader_resumes_mid_epoch_at_the_same_batch(two_sources):
    books, web, tokenizer = two_sources
    config = _mixed_config(books, web)

    def loader():
        return PackedLoader(build_datasets(config, tokenizer).train, 2, dp_rank=0, dp_size=2)

    uninterrupted = loader()
    steps = uninterrupted.batches_per_epoch + 2
    stop = uninterrupted.batches_per_epoch // 2
    expected = list(itertools.islice(iter(uninterrupted), steps))
    first = loader()
    before = list(itertools.islice(iter(first), stop))
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    after = list(itertools.islice(iter(resumed), steps - stop))
    for got, want in zip(before + after, expected, strict=True):
        assert all(torch.equal(got[key], want[key]) for key in want)
    assert "upsampled x2" in resumed.dataset.mixture_description
