"""Long-context SFT (``longctx.data.chat``): conversations rendered with the tokenizer's chat
template score exactly the assistant tokens, checked against conversations assembled by hand
segment by segment; the packed loss equals a float64 loss masked by hand; the chat template
survives a checkpoint's tokenizer bundle; ``recipes/sft-tiny.yaml`` trains on 2 workers with
ring attention and its loss falls."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_launch_e2e import longctx_train

from longctx.data.chat import ChatRenderer, Conversation, read_conversations
from longctx.data.config import DataConfig
from longctx.data.dataset import build_datasets
from longctx.data.packing import IGNORE_INDEX, pack_row
from longctx.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from longctx.errors import LongctxError
from longctx.model import ModelConfig, Transformer
from longctx.trainer.engine import ModelWithLoss

REPO = Path(__file__).resolve().parents[1]
SFT_RECIPE = REPO / "recipes" / "sft-tiny.yaml"
SFT_DATA = REPO / "recipes" / "data" / "sft-tiny.jsonl"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NL = "{{ '\\n' }}"  # a newline the template engine keeps (trim_blocks eats the literal one)
# ChatML with {% generation %} around the assistant's content and end-of-turn token.
GENERATION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}" + NL + "{% if m['role'] == "
    "'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}" + NL + "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant" + NL + "{% endif %}"
)
# The same rendering without generation marks: the mask comes from rendering prefixes.
PLAIN_CHATML_TEMPLATE = GENERATION_TEMPLATE.replace("{% generation %}", "").replace(
    "{% endgeneration %}", ""
)
CONVERSATIONS = [
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "The river runs north. Where does the river run?"},
        {"role": "assistant", "content": "North, past the old mill."},
        {"role": "user", "content": "And the road?"},
        {"role": "assistant", "content": "The road runs south to the harbor."},
    ],
    [
        {"role": "user", "content": "Count the apples: apple apple pear apple."},
        {"role": "assistant", "content": "There are three apples."},
    ],
]


def _write_json_tokenizer(directory: Path, template: str | None) -> Tokenizer:
    """A byte-level BPE tokenizer.json (trained here) with ChatML special tokens."""
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HfTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [m["content"] for c in CONVERSATIONS for m in c] + ["system user assistant"]
    backend.train_from_iterator(texts * 20, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>"}
    if template is not None:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(str(directory))


def _by_hand(tokenizer: Tokenizer, messages, close_turn_scored: bool):
    """ids and assistant mask assembled segment by segment: ``<|im_start|>`` + ``role\\n`` +
    content + ``<|im_end|>`` + ``\\n`` per message (special tokens split the text, so encoding
    the segments apart gives the ids of the whole). Scored: an assistant's content and
    ``<|im_end|>``, and with ``close_turn_scored`` the newline closing its turn too."""
    backend = tokenizer.backend
    start, end = backend.token_to_id("<|im_start|>"), backend.token_to_id("<|im_end|>")

    def encode(text):
        return backend.encode(text, add_special_tokens=False).ids

    ids, mask = [], []
    for message in messages:
        header, content, newline = (
            encode(message["role"] + "\n"),
            encode(message["content"]),
            encode("\n"),
        )
        scored = message["role"] == "assistant"
        ids += [start, *header, *content, end, *newline]
        mask += [False] * (1 + len(header)) + [scored] * (len(content) + 1)
        mask += [scored and close_turn_scored] * len(newline)
    return np.asarray(ids), np.asarray(mask)


@pytest.mark.parametrize("template", ["generation", "prefixes"])
def test_template_mask_is_exactly_the_assistant_tokens(tmp_path, template):
    source = GENERATION_TEMPLATE if template == "generation" else PLAIN_CHATML_TEMPLATE
    tokenizer = _write_json_tokenizer(tmp_path / "tok", source)
    renderer = ChatRenderer(tokenizer)
    assert renderer.marks_generation == (template == "generation")
    for index, messages in enumerate(CONVERSATIONS):
        document = renderer.render(Conversation(f"c:{index}", tuple(messages)))
        ids, mask = _by_hand(tokenizer, messages, close_turn_scored=template == "prefixes")
        assert np.array_equal(document.ids, ids)
        assert np.array_equal(document.scored, mask)


def test_plain_template_scores_the_assistant_contents_and_their_eos(tmp_path):
    """A sentencepiece tokenizer (no template): the documented plain template."""
    out = tmp_path / "tokenizer.model"
    texts = tuple(m["content"] for c in CONVERSATIONS for m in c) * 30
    train_tokenizer([], 300, str(out), extra_texts=(*texts, "System: User: Assistant:"))
    tokenizer = load_tokenizer(str(out))
    messages = CONVERSATIONS[0]
    document = ChatRenderer(tokenizer).render(Conversation("c", tuple(messages)))
    expected_ids = [tokenizer.bos_id]
    for m in messages:
        expected_ids += tokenizer.encode(m["role"].capitalize() + ":") + tokenizer.encode(
            m["content"]
        )
        expected_ids += [tokenizer.eos_id] if m["role"] == "assistant" else []
    assert document.ids.tolist() == expected_ids
    scored = document.ids[document.scored].tolist()
    assert scored.count(tokenizer.eos_id) == 2
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert tokenizer.decode(scored) == " ".join(answers)
    assert "System: Answer briefly. User: The river" in tokenizer.decode(document.ids.tolist())


def test_packed_loss_is_the_hand_masked_assistant_loss(tmp_path):
    """Two conversations packed into one row: ``ModelWithLoss`` (tiled loss over the packed
    labels) equals float64 cross-entropy over the hand-built assistant positions only, and
    differs from the loss over every token."""
    tokenizer = _write_json_tokenizer(tmp_path / "tok", GENERATION_TEMPLATE)
    renderer = ChatRenderer(tokenizer)
    documents = [renderer.render(Conversation("c", tuple(c))) for c in CONVERSATIONS]
    seq_len = sum(len(d) for d in documents) + 5  # room for padding at the end
    row = pack_row(documents, seq_len, tokenizer.eos_id)
    batch = {key: torch.from_numpy(value)[None] for key, value in row.items()}

    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    )
    with torch.no_grad():
        loss = ModelWithLoss(model, zero_stage=0)(**batch)
        logits = model(batch["input_ids"], batch["position_ids"], doc_ids=batch["doc_ids"])[0]
    log_probs = torch.log_softmax(logits.double(), dim=-1)  # [T, V]
    targets, positions = [], []
    offset = 0
    for messages in CONVERSATIONS:
        ids, mask = _by_hand(tokenizer, messages, close_turn_scored=False)
        for j in range(1, len(ids)):
            if mask[j]:
                positions.append(offset + j - 1)
                targets.append(int(ids[j]))
        offset += len(ids)
    reference = -log_probs[positions, targets].mean()
    assert float(loss) == pytest.approx(float(reference), rel=1e-5)
    assert (batch["labels"] != IGNORE_INDEX).sum() == len(positions)
    everything = F.cross_entropy(logits[:-1].double(), batch["input_ids"][0, 1:])
    assert abs(float(everything) - float(reference)) > 1e-3


def test_chat_template_survives_the_checkpoint_bundle(tmp_path):
    tokenizer = _write_json_tokenizer(tmp_path / "tok", GENERATION_TEMPLATE)
    stored = tmp_path / "stored.tokenizer"
    tokenizer.save(str(stored))
    again = load_tokenizer(str(stored))
    assert again.chat_template == GENERATION_TEMPLATE
    exported = tmp_path / "export"
    again.export_files(exported)
    assert load_tokenizer(str(exported)).chat_template == GENERATION_TEMPLATE


def test_sft_recipe_data_builds_assistant_only_rows(tmp_path):
    """The shipped chat data through the dataset: every row's labels are assistant tokens."""
    conversations = read_conversations([str(SFT_DATA)])
    assert len(conversations) == 64
    out = tmp_path / "tokenizer.model"
    texts = tuple(m["content"] for c in conversations for m in c.messages)
    train_tokenizer([], 512, str(out), extra_texts=texts)
    tokenizer = load_tokenizer(str(out))
    config = DataConfig(
        sources=[{"path": str(SFT_DATA), "format": "chat"}], seq_len=512, eval_fraction=0.1
    )
    splits = build_datasets(config, tokenizer)
    answers = {m["content"] for c in conversations for m in c.messages if m["role"] == "assistant"}
    row = splits.train.row(0, 0)
    scored = row["labels"][row["labels"] != IGNORE_INDEX].tolist()
    decoded = tokenizer.decode(scored)
    # Only answer words are scored: every scored word appears in some answer.
    answer_words = {w for a in answers for w in a.split()}
    assert decoded and set(decoded.split()) <= answer_words


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"text": "no messages"}', "no non-empty 'messages'"),
        ('{"messages": [{"role": "tool", "content": "x"}]}', "role 'tool'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"messages": [{"role": "assistant", "content": 3}]}', "type int"),
    ],
)
def test_bad_chat_rows_are_one_line_errors(tmp_path, line, needle):
    path = tmp_path / "chat.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(LongctxError, match=needle) as error:
        read_conversations([str(path)])
    assert "\n" not in str(error.value) and "chat.jsonl:1" in str(error.value)


@pytest.mark.heavy
def test_sft_recipe_trains_on_two_workers_with_ring_attention(tmp_path):
    """``longctx train recipes/sft-tiny.yaml --workers 2 --set parallel.ring=2``: 20 steps, and
    the mean loss of the last 5 steps is below that of the first 5. (``make test-heavy``, 30 s
    of the nearly spent 15-minute CI budget; CI keeps the SFT rows and loss above and ring
    training on Ray workers in tests/test_sp_trainer.py.)"""
    from longctx.launch.train import loss_curve

    run_dir = tmp_path / "run"
    result = longctx_train(
        [
            str(SFT_RECIPE),
            "--workers",
            "2",
            "--set",
            "parallel.ring=2",
            "--set",
            f"data.sources=[{{path: {SFT_DATA}, format: chat}}]",
            "--set",
            f"trainer.run_dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    losses = [loss for _, loss in loss_curve(run_dir / "tensorboard")]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
