"""Chat-format sources for supervised fine-tuning: conversations rendered with the tokenizer's
chat template, loss on the assistant's tokens only.

A chat source is a ``.jsonl`` file (or a directory of them) with one conversation per line::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

Roles are ``system``, ``user`` and ``assistant``; every conversation has at least one assistant
turn. A conversation becomes one packed document (``TokenDocument``) whose ``scored`` mask is
exactly the assistant tokens, so the packed labels (``longctx.data.packing``) carry loss there
only and shard with the labels under sequence parallelism. How it is rendered:

- a ``tokenizer.json`` tokenizer that ships a chat template (``chat_template`` in
  ``tokenizer_config.json`` or ``chat_template.jinja``) renders with transformers'
  ``apply_chat_template``. A template with ``{% generation %}`` blocks gives the mask itself
  (``return_assistant_tokens_mask``). Otherwise the mask is derived by rendering prefixes: the
  text between ``render(messages[:i], add_generation_prompt=True)`` and
  ``render(messages[:i + 1])`` is assistant turn ``i`` (its content and end-of-turn markup), and
  the tokens of the full rendering whose character span lies inside it are scored;
- a sentencepiece tokenizer, or a ``tokenizer.json`` without a template, uses the plain template:
  ``[bos] System: ... User: ... Assistant: ... [eos] User: ...`` built from pieces (each role
  label and each content encoded on its own, as ``Tokenizer.encode`` reads after a space), with
  the assistant's content and the eos closing its turn scored.

Input problems (not JSON, no ``messages``, an unknown role, a non-string content, no assistant
turn) raise a one-line ``LongctxError`` naming the file and line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from longctx.data.packing import TokenDocument
from longctx.data.sources import json_lines
from longctx.data.tokenizer import JsonTokenizer, Tokenizer
from longctx.errors import LongctxError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

ROLES = ("system", "user", "assistant")
PLAIN_ROLE_LABELS = {"system": "System:", "user": "User:", "assistant": "Assistant:"}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class Conversation:
    """One chat row: ``name`` is ``file:line``; ``messages`` its ``{role, content}`` dicts."""

    name: str
    messages: tuple[dict[str, str], ...]


def read_conversations(paths: list[str]) -> list[Conversation]:
    """All conversations of ``paths`` (``.jsonl`` files or directories of them), in order."""
    conversations: list[Conversation] = []
    for source in paths:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
            if not files:
                raise LongctxError(
                    f"chat data directory {source!r} has no .jsonl files; add some or point at "
                    "another directory"
                )
        elif path.is_file() and path.suffix == ".jsonl":
            files = [path]
        else:
            raise LongctxError(
                f"chat data source {source!r} is not a .jsonl file or a directory of them; "
                'give JSON lines like {"messages": [{"role": "user", "content": "..."}, ...]}'
            )
        for file in files:
            conversations.extend(_read_chat_file(file))
    return conversations


def chat_texts(paths: list[str]) -> list[str]:
    """Every message content of the chat sources ``paths`` (tokenizer training text)."""
    return [
        message["content"]
        for conversation in read_conversations(paths)
        for message in conversation.messages
    ]


def _read_chat_file(path: Path) -> list[Conversation]:
    conversations = []
    for where, record in json_lines(path, "chat data"):
        conversations.append(Conversation(where, _check_messages(record, where)))
    if not conversations:
        raise LongctxError(f"chat data file {str(path)!r} has no conversations; add some")
    return conversations


def _check_messages(record: object, where: str) -> tuple[dict[str, str], ...]:
    """The row's messages as ``{role, content}`` dicts, or a one-line error naming the fault."""
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise LongctxError(
            f"chat data line {where!r} has no non-empty 'messages' list (found {found}); "
            'each line must be like {"messages": [{"role": "user", "content": "..."}, ...]}'
        )
    checked = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise LongctxError(
                f"chat data line {where!r}: message {index} has role {role!r}; use one of "
                f"{', '.join(ROLES)}"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise LongctxError(
                f"chat data line {where!r}: message {index} has a content of type "
                f"{type(content).__name__}; it must be a string"
            )
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise LongctxError(
            f"chat data line {where!r} has no assistant turn, so nothing in it would be trained "
            "on; add an assistant message or remove the line"
        )
    return tuple(checked)


class ChatRenderer:
    """Renders conversations into ``TokenDocument``s for one tokenizer (module docstring)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        template = tokenizer.chat_template if isinstance(tokenizer, JsonTokenizer) else None
        self.template = template
        self._hf = None if template is None else _transformers_tokenizer(tokenizer, template)
        self.marks_generation = template is not None and bool(_GENERATION_TAG.search(template))

    def render(self, conversation: Conversation) -> TokenDocument:
        """The conversation's tokens with ``scored`` = the assistant tokens (``[n]`` each)."""
        messages = [dict(m) for m in conversation.messages]
        if self._hf is None:
            ids, mask = self._render_plain(messages)
        elif self.marks_generation:
            out = self._hf.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids, mask = out["input_ids"], out["assistant_masks"]
        else:
            ids, mask = self._render_by_prefixes(messages, conversation.name)
        return TokenDocument(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool))

    def _render_plain(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        tokenizer = self.tokenizer
        ids: list[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        mask = [False] * len(ids)
        for message in messages:
            label = tokenizer.encode_piece(PLAIN_ROLE_LABELS[message["role"]])
            content = tokenizer.encode(message["content"]) if message["content"] else []
            ids += label + content
            mask += [False] * len(label)
            if message["role"] == "assistant":
                ids.append(tokenizer.eos_id)
                mask += [True] * (len(content) + 1)
            else:
                mask += [False] * len(content)
        return ids, mask

    def _render_by_prefixes(
        self, messages: list[dict[str, str]], name: str
    ) -> tuple[list[int], list[bool]]:
        hf = self._hf
        full = hf.apply_chat_template(messages, tokenize=False)
        encoding = hf(full, add_special_tokens=False, return_offsets_mapping=True)
        offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # [n, 2]
        mask = np.zeros(len(offsets), dtype=bool)
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = hf.apply_chat_template(
                messages[:index], tokenize=False, add_generation_prompt=True
            )
            through = hf.apply_chat_template(messages[: index + 1], tokenize=False)
            if not (full.startswith(before) and full.startswith(through)):
                raise LongctxError(
                    f"chat data line {name!r}: the tokenizer's chat template does not render "
                    "a conversation's prefixes as prefixes of the whole, so the assistant tokens "
                    "cannot be located; use a template with {% generation %} blocks"
                )
            start, end = len(before), len(through)
            mask |= (offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > start)
        return list(encoding["input_ids"]), mask.tolist()


def _transformers_tokenizer(tokenizer: JsonTokenizer, template: str) -> PreTrainedTokenizerFast:
    """transformers' fast tokenizer over a copy of ``tokenizer``'s ``tokenizer.json`` (same
    ids), carrying the template and the bos/eos tokens templates refer to."""
    from tokenizers import Tokenizer as HfTokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=HfTokenizer.from_str(tokenizer.spec),
        chat_template=template,
        eos_token=tokenizer.eos_token,
        bos_token=tokenizer.bos_token,
    )


def chat_documents(paths: list[str], tokenizer: Tokenizer) -> list[TokenDocument]:
    """The conversations of ``paths`` rendered as documents, exact duplicates dropped."""
    unique = {json.dumps(c.messages, sort_keys=True): c for c in read_conversations(paths)}
    renderer = ChatRenderer(tokenizer)
    return [renderer.render(conversation) for conversation in unique.values()]
