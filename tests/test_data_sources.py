"""Corpus sources and the tokenizer: reading .txt / .jsonl / directories / builtin, one-line
errors for every class of bad input, and sentencepiece train / load round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from longctx.data.config import DataConfig, TokenizerConfig
from longctx.data.filler import filler_sentences
from longctx.data.sources import read_documents
from longctx.data.tokenizer import load_tokenizer, resolve_tokenizer, train_tokenizer
from longctx.errors import LongctxError


def _corpus_files(root: Path, seed: int = 0) -> tuple[Path, Path, list[str]]:
    """A .txt document and a .jsonl file of three documents of generated English."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(filler_sentences(rng, 200)) for _ in range(4)]
    root.mkdir(parents=True, exist_ok=True)
    txt = root / "story.txt"
    txt.write_text(texts[0], encoding="utf-8")
    jsonl = root / "more.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts[1:])))
    return txt, jsonl, texts


def _assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_txt_jsonl_and_directory_give_documents_in_stable_order(tmp_path):
    txt, jsonl, texts = _corpus_files(tmp_path / "corpus")
    assert [d.text for d in read_documents([str(txt)])] == texts[:1]
    assert [d.text for d in read_documents([str(jsonl)])] == texts[1:]
    assert [d.name for d in read_documents([str(jsonl)])][1] == f"{jsonl}:2"
    # A directory is its files in sorted path order: more.jsonl before story.txt.
    assert [d.text for d in read_documents([str(tmp_path / "corpus")])] == texts[1:] + texts[:1]


def test_builtin_source_is_pydoc_topics():
    from pydoc_data.topics import topics

    documents = read_documents(["builtin"])
    assert [d.text for d in documents] == [topics[k] for k in sorted(topics)]


BAD_INPUTS = {
    # name: (file name, bytes or None for "do not create", expected fragment)
    "missing": ("nope.txt", None, "does not exist"),
    "empty_txt": ("empty.txt", b"  \n\n", "is empty"),
    "empty_jsonl": ("empty.jsonl", b'{"text": ""}\n\n', "is empty"),
    "jsonl_without_text": ("notext.jsonl", b'{"body": "hello"}\n', "has no 'text' field"),
    "jsonl_bad_json": ("broken.jsonl", b'{"text": "a"}\n{"text": \n', "is not valid JSON"),
    "jsonl_text_not_string": ("num.jsonl", b'{"text": 3}\n', "'text' of type int"),
    "binary": ("blob.txt", bytes(range(256)) * 4, "looks binary"),
    "not_utf8": ("latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"), "not valid UTF-8"),
    "unsupported_type": ("table.csv", b"a,b\n1,2\n", "unsupported type '.csv'"),
}


def _make_bad_input(tmp_path: Path, case: str) -> Path:
    name, content, _ = BAD_INPUTS[case]
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_source_is_a_one_line_error_naming_the_file(tmp_path, case):
    path = _make_bad_input(tmp_path, case)
    with pytest.raises(LongctxError) as err:
        read_documents([str(path)])
    _assert_one_line(err, str(path), BAD_INPUTS[case][2])


def test_jsonl_error_names_the_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "fine"}\n{"title": "x"}\n')
    with pytest.raises(LongctxError) as err:
        read_documents([str(path)])
    _assert_one_line(err, f"{path}:2", "'title'")


def test_directory_without_text_files_is_an_error(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.md").write_text("# not a corpus file")
    with pytest.raises(LongctxError) as err:
        read_documents([str(tmp_path / "data")])
    _assert_one_line(err, "has no .txt or .jsonl")


@pytest.mark.parametrize("case", ["missing", "empty_txt", "binary", "not_utf8"])
def test_tokenizer_training_rejects_bad_input_and_writes_nothing(tmp_path, case):
    path = _make_bad_input(tmp_path, case)
    out = tmp_path / "tok" / "tokenizer.model"
    with pytest.raises(LongctxError) as err:
        train_tokenizer([str(path)], 500, str(out))
    _assert_one_line(err, str(path), BAD_INPUTS[case][2])
    assert not out.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 600-piece tokenizer trained on a generated corpus (.txt + .jsonl)."""
    root = tmp_path_factory.mktemp("tokenizer")
    txt, jsonl, texts = _corpus_files(root / "corpus", seed=1)
    out = train_tokenizer([str(txt), str(jsonl)], 600, str(root / "tokenizer.model"))
    return Path(out), texts


def test_trained_tokenizer_round_trips_text(trained):
    path, _ = trained
    tokenizer = load_tokenizer(str(path))
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (600, 1, 2)
    # Unseen sentences of the same grammar, plus characters outside the corpus (byte fallback).
    text = " ".join(filler_sentences(np.random.default_rng(99), 20)) + " Zürich 42 {x}!"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    # split_digits: every digit is its own piece, so passkeys are spelled digit by digit.
    digit_pieces = [tokenizer.processor.id_to_piece(i) for i in tokenizer.encode("90210")]
    assert [p for p in digit_pieces if p != "\u2581"] == list("90210")


def test_trained_tokenizer_compresses_its_corpus(trained):
    path, texts = trained
    tokenizer = load_tokenizer(str(path))
    # A 600-piece BPE on English must beat 2 characters per token (bytes would give 1).
    assert len(texts[0]) / len(tokenizer.encode(texts[0])) > 2.0


def test_checkpoint_tokenizer_encodes_like_transformers(trained, tmp_path):
    """The independent reference for reading an HF checkpoint's tokenizer.model: transformers'
    LlamaTokenizer loaded from the same directory."""
    from transformers import LlamaTokenizer

    path, texts = trained
    checkpoint = tmp_path / "hf_checkpoint"
    checkpoint.mkdir()
    (checkpoint / "tokenizer.model").write_bytes(path.read_bytes())
    ours, reference = load_tokenizer(str(checkpoint)), LlamaTokenizer.from_pretrained(checkpoint)
    text = texts[2][:3000] + " The pass key is 48213. Zürich {x} été!"
    ids = ours.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert (ours.bos_id, ours.eos_id) == (reference.bos_token_id, reference.eos_token_id)
    assert ours.decode(ids) == reference.decode(ids)


def test_saved_tokenizer_loads_as_the_same_model(trained, tmp_path):
    path, texts = trained
    original = load_tokenizer(str(path))
    copy = load_tokenizer(original.save(str(tmp_path / "ckpt" / "tokenizer.model")))
    assert copy.model_bytes() == path.read_bytes()
    assert copy.encode(texts[2]) == original.encode(texts[2])


def test_training_refuses_to_overwrite(trained):
    path, _ = trained
    before = path.read_bytes()
    with pytest.raises(LongctxError) as err:
        train_tokenizer(["builtin"], 500, str(path))
    _assert_one_line(err, "already exists")
    assert path.read_bytes() == before


def test_vocab_too_large_for_corpus_is_a_one_line_error(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("a tiny corpus of a few words only")
    with pytest.raises(LongctxError) as err:
        train_tokenizer([str(small)], 5000, str(tmp_path / "t.model"))
    _assert_one_line(err, "vocab size 5000", "lower --vocab-size")


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: d / "absent.model", "does not exist"),
        (
            lambda d: (d / "garbage.model").write_bytes(b"not a model") and d / "garbage.model",
            "not a sentencepiece model",
        ),
        (lambda d: (d / "tokenizer.json").write_text("{}") and d, "is not a valid tokenizer.json"),
    ],
    ids=["missing", "garbage", "json_only_checkpoint"],
)
def test_load_errors_are_one_line(tmp_path, make, fragment):
    with pytest.raises(LongctxError) as err:
        load_tokenizer(str(make(tmp_path)))
    _assert_one_line(err, fragment)


def test_resolve_trains_once_into_the_run_dir_then_reuses_it(tmp_path):
    config = DataConfig(tokenizer=TokenizerConfig(vocab_size=700))
    first = resolve_tokenizer(config, str(tmp_path / "run"))
    model = tmp_path / "run" / "tokenizer.model"
    stamp = model.stat().st_mtime_ns
    second = resolve_tokenizer(config, str(tmp_path / "run"))
    assert model.stat().st_mtime_ns == stamp
    assert first.vocab_size == second.vocab_size == 700
    # The generated task phrases are in its training text: the passkey line is short.
    assert len(first.encode("The pass key is")) <= 6
    explicit = resolve_tokenizer(
        DataConfig(tokenizer=TokenizerConfig(path=str(model))), str(tmp_path / "other")
    )
    assert explicit.model_bytes() == first.model_bytes()
    assert not (tmp_path / "other").exists()
