"""``longctx data prepare`` and prepared corpora: the shards hold exactly the tokenizer's ids of
every source format; training rows from a prepared directory equal the rows from the raw
sources (and resume exactly); an interrupted prepare keeps its finished shards; bad inputs are
one line, exit 2, nothing written."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from longctx.data.config import DataConfig
from longctx.data.corpus import PreparedCorpus
from longctx.data.dataset import PackedDataset, build_datasets
from longctx.data.loader import PackedLoader
from longctx.data.packing import pack_layout
from longctx.data.prepare import prepare
from longctx.data.tokenizer import load_tokenizer, train_tokenizer
from longctx.launch.cli import main

TEXTS = [
    f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 53}" for j in range(20 + 13 * i))
    for i in range(40)
]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(["builtin"], 1000, str(out))
    return str(out)


def _documents(corpus: PreparedCorpus) -> list[list[int]]:
    return [corpus.document(i).tolist() for i in range(corpus.num_documents)]


def _write_sources(root: Path) -> dict[str, str]:
    jsonl = root / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "n": 1}) + "\n" for t in TEXTS))
    gz = root / "a.jsonl.gz"
    with gzip.open(gz, "wt") as handle:
        handle.write(jsonl.read_text())
    parquet = root / "a.parquet"
    pq.write_table(pa.table({"body": TEXTS}), parquet)
    import datasets

    disk = root / "saved"
    datasets.Dataset.from_dict({"body": TEXTS}).save_to_disk(str(disk))
    return {"jsonl": str(jsonl), "gz": str(gz), "parquet": str(parquet), "disk": str(disk)}


def test_every_source_format_prepares_to_the_tokenizer_ids(tmp_path, tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    expected = tokenizer.encode_batch(TEXTS)
    for name, source in _write_sources(tmp_path).items():
        out = tmp_path / f"out-{name}"
        manifest = prepare(
            [source],
            tokenizer_path,
            str(out),
            field="body",
            num_proc=2,
            docs_per_shard=7,
            show_progress=False,
        )
        corpus = PreparedCorpus(out)
        corpus.verify()
        assert _documents(corpus) == expected, name
        assert corpus.dtype == np.uint16 and len(manifest["shards"]) == 6
        assert manifest["tokens"] == sum(map(len, expected)) == int(corpus.document_lengths().sum())


def test_interrupted_prepare_keeps_finished_shards(tmp_path, tokenizer_path):
    source = _write_sources(tmp_path)["parquet"]
    out = tmp_path / "out"
    prepare(
        [source], tokenizer_path, str(out), field="body", docs_per_shard=10, show_progress=False
    )
    reference = _documents(PreparedCorpus(out))
    # Simulate an interruption: the manifest and the last shard never got written.
    (out / "manifest.json").unlink()
    (out / "shard_00003.bin").unlink()
    finished = (out / "shard_00000.bin").stat().st_mtime_ns
    manifest = prepare(
        [source], tokenizer_path, str(out), field="body", docs_per_shard=10, show_progress=False
    )
    assert (out / "shard_00000.bin").stat().st_mtime_ns == finished
    assert manifest["throughput"]["new_tokens"] == manifest["shards"][3]["tokens"]
    assert _documents(PreparedCorpus(out)) == reference


def _config(source: str, **overrides) -> DataConfig:
    fields = {
        "seq_len": 256,
        "tasks": {"text": 1.0},
        "sources": [source],
        "seed": 3,
        "eval_fraction": 0.1,
    }
    fields.update(overrides)
    return DataConfig(**fields)


def test_prepared_rows_equal_raw_rows_and_resume_exactly(tmp_path, tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    source = tmp_path / "docs.jsonl"  # unique texts: raw sources drop exact duplicates
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "prepared"
    prepare(
        [str(source)], tokenizer_path, str(out), num_proc=2, docs_per_shard=6, show_progress=False
    )
    raw = build_datasets(_config(str(source), seq_len=64), tokenizer)
    prepared = build_datasets(_config(str(out), seq_len=64), tokenizer)
    for split in ("train", "eval"):
        a, b = getattr(raw, split), getattr(prepared, split)
        assert a.num_rows == b.num_rows > 0
        for index in range(a.num_rows):
            assert all(
                np.array_equal(a.row(0, index)[k], b.row(0, index)[k]) for k in a.row(0, index)
            )
    assert _reference_rows(raw.train) == [
        [d.ids.tolist() for d in raw.train._text_row(i)] for i in range(raw.train.num_rows)
    ]

    loader = PackedLoader(prepared.train, 2, dp_rank=1, dp_size=2)
    expected = list(itertools.islice(iter(loader), loader.batches_per_epoch + 2))
    first = PackedLoader(
        build_datasets(_config(str(out), seq_len=64), tokenizer).train, 2, dp_rank=1, dp_size=2
    )
    before = list(itertools.islice(iter(first), 3))
    resumed = PackedLoader(
        build_datasets(_config(str(out), seq_len=64), tokenizer).train, 2, dp_rank=1, dp_size=2
    )
    resumed.load_state_dict(first.state_dict())
    after = list(itertools.islice(iter(resumed), len(expected) - 3))
    assert all(
        all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(before + after, expected, strict=True)
    )


def _reference_rows(dataset: PackedDataset) -> list[list[list[int]]]:
    """The text rows ``pack_layout`` makes from the shuffled, materialized documents."""
    documents = [dataset._text_documents[int(i)] for i in dataset._text_order]
    layout = pack_layout([len(d) for d in documents], dataset.seq_len)
    return [[documents[p.doc].slice(p.start, p.end).ids.tolist() for p in row] for row in layout]


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_bad_inputs_are_one_line_exit_2_nothing_written(tmp_path, tokenizer_path, capsys):
    sources = _write_sources(tmp_path)
    out = tmp_path / "never"
    base = ["data", "prepare", "--tokenizer", tokenizer_path, "--out", str(out)]
    assert "has no 'text' field" in _cli_error(capsys, [*base, sources["parquet"]])
    assert "not strings" in _cli_error(capsys, [*base, "--field", "n", sources["jsonl"]])
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "fine"}\n{"text": 5}\n')
    assert "mixed.jsonl" in _cli_error(capsys, [*base, str(mixed)])
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert "not valid UTF-8" in _cli_error(capsys, [*base, str(latin)])
    latin_jsonl = tmp_path / "latin.jsonl"
    latin_jsonl.write_bytes(b'{"text": "caf\xe9"}\n')
    assert "latin.jsonl" in _cli_error(capsys, [*base, str(latin_jsonl)])
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "  "}\n{"text": ""}\n')
    assert "no non-blank" in _cli_error(capsys, [*base, str(blank)])
    assert not out.exists()


def test_prepared_directory_checks(tmp_path, tokenizer_path, capsys):
    out = tmp_path / "p"
    prepare(["builtin"], tokenizer_path, str(out), docs_per_shard=40, show_progress=False)
    other = tmp_path / "other.model"
    train_tokenizer(["builtin"], 600, str(other))
    with pytest.raises(ValueError, match="tokenized with tokenizer"):
        build_datasets(_config(str(out)), load_tokenizer(str(other)))
    shard = out / "shard_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        PreparedCorpus(out)
    shard.unlink()
    with pytest.raises(ValueError, match="missing shard file"):
        PreparedCorpus(out)


def _rows(splits) -> list[list[np.ndarray]]:
    """Every row of both splits of ``splits`` (epoch 0), each as its four arrays."""
    datasets = [splits.train] + ([splits.eval] if splits.eval is not None else [])
    return [
        [row[key] for key in sorted(row)]
        for dataset in datasets
        for row in (dataset.row(0, i) for i in range(dataset.num_rows))
    ]


def _same_rows(a, b) -> bool:
    rows_a, rows_b = _rows(a), _rows(b)
    return len(rows_a) == len(rows_b) > 0 and all(
        all(np.array_equal(x, y) for x, y in zip(p, q, strict=True))
        for p, q in zip(rows_a, rows_b, strict=True)
    )


def test_raw_sources_are_prepared_once_into_the_data_dir_and_reused(tmp_path, tokenizer_path):
    """A run's raw sources become one prepared directory under its data dir: the documents
    are the tokenizer's ids of the unique texts (exact duplicates dropped), a second build
    reuses the directory without writing, and a changed source gets a directory of its own."""
    tokenizer = load_tokenizer(tokenizer_path)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS + TEXTS[:5]))
    data_dir = tmp_path / "run" / "data"
    config = _config(str(source), seq_len=64)
    first = build_datasets(config, tokenizer, data_dir)
    (prepared,) = list(data_dir.iterdir())
    assert PreparedCorpus(prepared).num_documents == len(TEXTS) + 5
    corpus = first.corpus
    documents = [*corpus.train_documents, *corpus.eval_documents]
    expected = [[tokenizer.bos_id, *ids, tokenizer.eos_id] for ids in tokenizer.encode_batch(TEXTS)]
    assert sorted(d.ids.tolist() for d in documents) == sorted(expected)
    written = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}
    again = build_datasets(config, tokenizer, data_dir)
    assert list(data_dir.iterdir()) == [prepared]
    assert {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == written
    assert _same_rows(first, again)
    assert _same_rows(first, build_datasets(config, tokenizer))  # a temporary directory
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:30]))
    changed = build_datasets(config, tokenizer, data_dir)
    assert len(list(data_dir.iterdir())) == 2
    assert changed.train.num_rows < first.train.num_rows


def test_mixture_of_prepared_dirs_gives_the_batches_of_its_raw_sources(tmp_path, tokenizer_path):
    """Weighted sources with long-document upsampling: the mixture of two directories made by
    ``longctx data prepare`` (several shards, 2 processes) yields exactly the loader batches of
    the same mixture over the raw files."""
    tokenizer = load_tokenizer(tokenizer_path)
    rng = np.random.default_rng(4)
    raw = []
    for name, low, high, count in (("books", 150, 400, 12), ("web", 5, 40, 60)):
        path = tmp_path / f"{name}.jsonl"
        texts = [
            f"{name} {i}: " + " ".join(f"w{int(k)}" for k in rng.integers(0, 90, n))
            for i, n in enumerate(rng.integers(low, high, count))
        ]
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        raw.append(str(path))
    prepared = []
    for path in raw:
        out = tmp_path / f"prepared-{Path(path).stem}"
        assert main(["data", "prepare", path, "--tokenizer", tokenizer_path, "--out", str(out),
                     "--num-proc", "2"]) == 0  # fmt: skip
        prepared.append(str(out))

    def mixture(paths: list[str]):
        config = _config(
            paths[0],
            sources=[{"path": paths[0], "weight": 0.4}, {"path": paths[1], "weight": 0.6}],
            long_upsampling={"min_tokens": 300, "factor": 3.0},
            seq_len=64,
        )
        return build_datasets(config, tokenizer)

    from_raw, from_prepared = mixture(raw), mixture(prepared)
    assert "upsampled x3" in from_prepared.train.mixture_description
    assert _same_rows(from_raw, from_prepared)
    loaders = [PackedLoader(s.train, 2, dp_rank=1, dp_size=2) for s in (from_raw, from_prepared)]
    steps = loaders[0].batches_per_epoch + 2
    for x, y in zip(*(itertools.islice(iter(loader), steps) for loader in loaders), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("template", ["plain", "generation"])
def test_prepared_chat_corpus_holds_the_renderers_ids_and_assistant_mask(tmp_path, template):
    """``longctx data prepare --format chat``: every conversation's ids and loss mask equal
    what the chat renderer gives it in memory (the plain template of a sentencepiece tokenizer,
    and a tokenizer.json template with generation marks), and the packed rows of the prepared
    directory equal those of the raw chat file."""
    from test_sft import CONVERSATIONS, GENERATION_TEMPLATE, SFT_DATA, _write_json_tokenizer

    from longctx.data.chat import ChatRenderer, read_conversations

    if template == "plain":
        source = SFT_DATA
        texts = [m["content"] for c in read_conversations([str(source)]) for m in c.messages]
        tokenizer_path = str(tmp_path / "tokenizer.model")
        train_tokenizer([], 512, tokenizer_path, extra_texts=texts)
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        source = tmp_path / "chat.jsonl"
        source.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 3))
        tokenizer = _write_json_tokenizer(tmp_path / "json", GENERATION_TEMPLATE)
        tokenizer_path = tokenizer.path
    out = tmp_path / "prepared"
    argv = ["data", "prepare", str(source), "--tokenizer", tokenizer_path, "--out", str(out)]
    assert main([*argv, "--format", "chat", "--num-proc", "2"]) == 0
    corpus = PreparedCorpus(out)
    corpus.verify()
    conversations = read_conversations([str(source)])
    assert corpus.kind == "chat" and corpus.num_documents == len(conversations)
    renderer = ChatRenderer(tokenizer)
    for index, conversation in enumerate(conversations):
        document = renderer.render(conversation)
        assert corpus.document(index).tolist() == document.ids.tolist()
        assert np.array_equal(corpus.document_mask(index), document.scored)
        assert document.scored.any() and not document.scored.all()

    def splits(path: str):
        config = DataConfig(
            sources=[{"path": path, "format": "chat"}], seq_len=256, eval_fraction=0.2, seed=1
        )
        return build_datasets(config, tokenizer)

    assert _same_rows(splits(str(source)), splits(str(out)))


def test_the_cli_driver_prepares_raw_sources_into_the_run_and_opens_prepared_ones(
    tmp_path, tokenizer_path
):
    """``validate_run`` in the driver (no process group): raw sources are prepared into
    ``RUN/data`` (where the workers find them), a prepared directory is used as it is, and too
    little data is refused with nothing left on disk."""
    from trainer_helpers import tiny_recipe

    from longctx.checkpoint.run_dir import PREPARED_DATA_DIR, validate_run

    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    prepared = tmp_path / "prepared"
    prepare([str(source)], tokenizer_path, str(prepared), show_progress=False)
    for name, corpus in (("raw", source), ("prepared", prepared)):
        run = tmp_path / name
        validate_run(tiny_recipe(corpus, Path(tokenizer_path), run, model_vocab=1024), run, None)
        made = sorted(p.name for p in (run / PREPARED_DATA_DIR).glob("*")) if run.exists() else []
        assert len(made) == (1 if name == "raw" else 0), name
    short = tmp_path / "short.txt"
    short.write_text("A very short document.")
    run = tmp_path / "short"
    recipe = tiny_recipe(short, Path(tokenizer_path), run, model_vocab=1024)
    with pytest.raises(ValueError, match="rows"):
        validate_run(recipe, run, None)
    assert not run.exists()
