"""longctx.data: tokenizer, corpus sources, packing, synthetic long-context tasks and the
resumable data-parallel loader.

Typical use (the trainer's)::

    tokenizer = resolve_tokenizer(recipe.data, run_dir)
    splits = build_datasets(recipe.data, tokenizer)
    loader = PackedLoader(splits.train, micro_batch_size, dp_rank, dp_size)
    for batch in loader:  # {input_ids, labels, position_ids, doc_ids}: [B, T] LongTensors
        ...
"""

from longctx.data.config import DataConfig
from longctx.data.dataset import Corpus, DataSplits, PackedDataset, build_datasets, load_corpus
from longctx.data.loader import PackedLoader
from longctx.data.packing import IGNORE_INDEX, TokenDocument, pack_row
from longctx.data.sample import Sample
from longctx.data.sources import Document, read_documents
from longctx.data.tasks import build_task, make_eval_example
from longctx.data.tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer, train_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "Corpus",
    "DataConfig",
    "DataSplits",
    "Document",
    "PackedDataset",
    "PackedLoader",
    "Sample",
    "TokenDocument",
    "Tokenizer",
    "build_datasets",
    "build_task",
    "load_corpus",
    "load_tokenizer",
    "make_eval_example",
    "pack_row",
    "read_documents",
    "resolve_tokenizer",
    "train_tokenizer",
]
