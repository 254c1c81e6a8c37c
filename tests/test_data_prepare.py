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
from longctx.data.corpus import InMemoryCorpus, PreparedCorpus, TokenCorpus
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


def _documents(corpus: TokenCorpus) -> list[list[int]]:
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
    assert _documents(InMemoryCorpus(expected)) == expected


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
    assert "no field 'text'" in _cli_error(capsys, [*base, sources["parquet"]])
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
