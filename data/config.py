"""What the model is trained on: corpus sources, the synthetic task mix, sequence length,
tokenizer, held-out split and seed.

A recipe's ``data:`` section validates into ``DataConfig``. The loader (``longctx.data.loader``)
turns it into packed ``[B, T]`` micro-batches; nothing else in the project reads these fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TaskName = Literal[
    "text", "passkey", "niah", "kv_retrieval", "counting", "selective_copy", "flip_flop"
]
TASK_NAMES: tuple[str, ...] = TaskName.__args__  # type: ignore[attr-defined]
BUILTIN_SOURCE = "builtin"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PasskeyParams(_Strict):
    """SPECS 4 passkey: a ``digits``-digit key at ``depth`` (fraction of the filler before it;
    None draws a uniform depth per sample)."""

    digits: int = Field(5, ge=1, le=12)
    depth: float | None = Field(None, ge=0.0, le=1.0)


class NiahParams(_Strict):
    """RULER-style needle in a haystack: ``num_keys`` keys hidden in filler (all but the queried
    ones are distractors), ``num_values`` values per key (multi-value), ``num_queries`` keys
    asked at once (multi-query)."""

    num_keys: int = Field(4, ge=1, le=400)
    num_values: int = Field(1, ge=1)
    num_queries: int = Field(1, ge=1)
    value_digits: int = Field(7, ge=1, le=12)

    @model_validator(mode="after")
    def _queries_fit(self) -> NiahParams:
        if self.num_queries > self.num_keys:
            raise ValueError(
                f"niah num_queries={self.num_queries} exceeds num_keys={self.num_keys}; "
                "ask at most as many keys as are hidden"
            )
        return self


class KeyValueParams(_Strict):
    """Key-value retrieval: the whole context is ``key -> value`` pairs of random hex strings;
    the question names one key."""

    key_chars: int = Field(8, ge=4, le=32)


class CountingParams(_Strict):
    """Counting: a stream of words from an ``alphabet_size``-word alphabet; the answer is how
    often the queried word occurs (drawn uniformly in ``[0, max_count]``)."""

    alphabet_size: int = Field(8, ge=2, le=24)
    max_count: int = Field(20, ge=1)


class SelectiveCopyParams(_Strict):
    """Selective copy: ``num_items`` content words scattered among noise marks; the answer is
    the content words in order."""

    num_items: int = Field(8, ge=1)


class FlipFlopParams(_Strict):
    """Flip-flop language: write/ignore/read instructions with a bit each; a read returns the
    last written bit. Intermediate reads (``read_prob``) appear answered in the prompt."""

    write_prob: float = Field(0.1, gt=0.0, lt=1.0)
    read_prob: float = Field(0.05, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _probabilities(self) -> FlipFlopParams:
        if self.write_prob + self.read_prob >= 1.0:
            raise ValueError(
                f"flip_flop write_prob + read_prob = {self.write_prob + self.read_prob} must be "
                "< 1 so that ignore instructions remain; lower one of them"
            )
        return self


class TaskParams(_Strict):
    """Per-task generator parameters (defaults give the standard tasks)."""

    passkey: PasskeyParams = PasskeyParams()
    niah: NiahParams = NiahParams()
    kv_retrieval: KeyValueParams = KeyValueParams()
    counting: CountingParams = CountingParams()
    selective_copy: SelectiveCopyParams = SelectiveCopyParams()
    flip_flop: FlipFlopParams = FlipFlopParams()


class TokenizerConfig(_Strict):
    """``path``: a sentencepiece ``tokenizer.model``, a Hugging Face ``tokenizer.json`` (byte-level
    BPE as Llama 3, Qwen2 and SmolLM2 ship it, loaded with the ``tokenizers`` library), or a
    directory holding either (e.g. a Hugging Face checkpoint; ``data/tokenizer.py``). None
    trains a sentencepiece model of ``vocab_size`` on the training sources plus generated task
    text and stores it in the run directory."""

    path: str | None = None
    vocab_size: int = Field(2048, ge=300, description="only used when training a tokenizer")


class SourceSpec(_Strict):
    """One entry of ``data.sources`` written as a mapping: ``path`` (a file, a directory or
    ``builtin``), its mixture ``weight`` (the fraction of the training tokens drawn from it,
    after normalising the weights; None = its natural share) and its ``format``: ``text``
    (.txt / .jsonl ``text`` rows) or ``chat`` (.jsonl rows ``{"messages": [{"role", "content"},
    ...]}`` rendered with the tokenizer's chat template, loss on assistant tokens only)."""

    path: str
    weight: float | None = None
    format: Literal["text", "chat"] = "text"


class LongUpsampling(_Strict):
    """Documents of at least ``min_tokens`` tokens are drawn ``factor`` times as often as the
    others of their source (ProLong's long-document upsampling; ``longctx.data.mixture``)."""

    min_tokens: int = Field(gt=0)
    factor: float = Field(gt=0.0)


class DataConfig(_Strict):
    """The data section of a recipe.

    ``tasks`` maps task names to weights: the fraction of packed rows of each kind (``text`` =
    corpus documents from ``sources``; the others are generated, see ``longctx.data.tasks``).
    Task rows score only the answer (and the end-of-sequence after it) unless
    ``task_prompt_loss`` also trains on the prompt, whose generated filler is low-entropy and
    would otherwise dominate the loss.
    """

    sources: list[str | SourceSpec] = Field(
        default_factory=lambda: [BUILTIN_SOURCE],
        description="paths to .txt / .jsonl ('text' field) files or directories of them; "
        "'builtin' is English text from CPython's pydoc_data.topics; or mappings "
        "{path, weight, format} (a weighted mixture, chat sources)",
    )
    long_upsampling: LongUpsampling | None = None
    tasks: dict[TaskName, float] = Field(default_factory=lambda: {"text": 1.0})
    task_params: TaskParams = TaskParams()
    task_length_range: tuple[float, float] = Field(
        (0.25, 1.0), description="task sample length as fractions of seq_len (min, max)"
    )
    task_prompt_loss: bool = False
    synthetic_rows_per_epoch: int = Field(
        4096, gt=0, description="rows in an epoch when the mix has no text"
    )
    seq_len: int = Field(512, gt=0)
    tokenizer: TokenizerConfig = TokenizerConfig()
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    seed: int = Field(0, ge=0)

    @field_validator("tasks")
    @classmethod
    def _weights(cls, tasks: dict[str, float]) -> dict[str, float]:
        negative = {name: w for name, w in tasks.items() if w < 0}
        if negative:
            raise ValueError(f"task weights must be >= 0, got {negative}; use 0 to disable one")
        if sum(tasks.values()) <= 0:
            raise ValueError(
                f"task weights {tasks} sum to 0; give at least one task a positive weight"
            )
        return tasks

    @field_validator("sources")
    @classmethod
    def _sources_not_blank(cls, sources: list[str | SourceSpec]) -> list[str | SourceSpec]:
        specs = [SourceSpec(path=s) if isinstance(s, str) else s for s in sources]
        if any(not spec.path.strip() for spec in specs):
            raise ValueError(f"sources {sources} contain an empty path; remove it")
        weights = [spec.weight for spec in specs]
        if any(w is not None for w in weights):
            if any(w is None for w in weights):
                raise ValueError(
                    "some sources have a weight and some do not; give every entry "
                    "{path: ..., weight: ...} or none"
                )
            if any(w < 0 for w in weights):
                raise ValueError(f"source weights {weights} include a negative one; use >= 0")
            if sum(weights) <= 0:
                raise ValueError(
                    f"source weights {weights} sum to 0; give at least one source a positive weight"
                )
        return sources

    @field_validator("task_length_range")
    @classmethod
    def _length_range(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        low, high = bounds
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(
                f"task_length_range={list(bounds)} must satisfy 0 < min <= max <= 1 "
                "(fractions of seq_len)"
            )
        return bounds

    @model_validator(mode="after")
    def _text_needs_sources(self) -> DataConfig:
        if self.tasks.get("text", 0.0) > 0 and not self.sources:
            raise ValueError(
                "tasks include 'text' but sources is empty; add a path or 'builtin', "
                "or set the text weight to 0"
            )
        return self

    def source_specs(self) -> list[SourceSpec]:
        """``sources`` with plain paths as ``SourceSpec(path)`` (text, natural weight)."""
        return [SourceSpec(path=s) if isinstance(s, str) else s for s in self.sources]

    def text_paths(self) -> list[str]:
        """The paths of the text (not chat) sources, in order."""
        return [spec.path for spec in self.source_specs() if spec.format == "text"]

    def chat_paths(self) -> list[str]:
        """The paths of the chat sources, in order."""
        return [spec.path for spec in self.source_specs() if spec.format == "chat"]

    def active_tasks(self) -> dict[str, float]:
        """Task weights with the zero-weight entries removed."""
        return {name: w for name, w in self.tasks.items() if w > 0}
