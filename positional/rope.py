"""Rotary position embedding (RoPE, Su et al.) and its context-extension scalings.

Pair layout as in Hugging Face Llama ("rotate_half"): dimension i of a head pairs with dimension
i + D/2, and pair i turns by ``position * inv_freq[i]`` with ``inv_freq[i] = base^(-2i/D)``.

The scalings take transformers' ``rope_scaling`` dict (``rope_type``, or the legacy ``type``) and
give the same frequencies and attention factor as ``transformers.modeling_rope_utils`` (SPECS 2.1):
``linear``, ``dynamic``, ``yarn``, ``llama3``, ``longrope`` and ``proportional``, plus our static
NTK base change ``ntk`` (CodeLlama style, not a transformers type). Frequencies are computed in
float32 with the same formulas transformers uses, so a pretrained checkpoint sees the angles it
was trained with, bit for bit for the default type.

``dynamic`` and ``longrope`` depend on the current sequence length. ``RotaryEmbedding`` computes
them from the length of each call (no state carried between calls, unlike transformers' cache);
under sequence parallelism a rank only sees its shard, so callers pass the global length.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable
from numbers import Real
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from longctx.errors import LongctxError

logger = logging.getLogger(__name__)


class RopeSettings(Protocol):
    """What ``RotaryEmbedding.from_config`` reads of a model config (``model.ModelConfig``;
    positional sits below model, so it names the fields, not the class)."""

    dim_per_head: int
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None


KNOWN_ROPE_TYPES = (
    "default",
    "linear",
    "dynamic",
    "ntk",
    "yarn",
    "llama3",
    "longrope",
    "proportional",
)
LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")

# Keys every type accepts: the type itself and transformers 5's copy of the base.
_COMMON_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
# Per type: (keys that must be present, keys that may be present).
_TYPE_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "default": (set(), set()),
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, set()),
    "ntk": ({"factor"}, set()),
    "yarn": (
        set(),
        {
            "factor",
            "original_max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
        },
    ),
    "llama3": (
        {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
        set(),
    ),
    "longrope": (
        {"short_factor", "long_factor", "original_max_position_embeddings"},
        {"factor", "attention_factor"},
    ),
    "proportional": (set(), {"factor"}),
}
_ALL_KEYS = _COMMON_KEYS.union(*(req | opt for req, opt in _TYPE_KEYS.values()))


# ----------------------------------------------------------------------------- validation


def rope_type_of(rope_scaling: dict | None) -> str:
    """The scaling's type: ``rope_type``, else the legacy ``type``; ``default`` for None."""
    if not rope_scaling:
        return "default"
    new, legacy = rope_scaling.get("rope_type"), rope_scaling.get("type")
    if new is not None and legacy is not None and new != legacy:
        raise LongctxError(
            f"rope_scaling has rope_type={new!r} and type={legacy!r}; keep one of them "
            "(type is the legacy name of rope_type)"
        )
    rope_type = new if new is not None else legacy
    if rope_type is None:
        raise LongctxError(
            f"rope_scaling={rope_scaling!r} has no rope_type; add rope_type "
            f"(one of {', '.join(KNOWN_ROPE_TYPES)})"
        )
    return rope_type


def validate_rope_scaling(rope_scaling: dict, head_dim: int) -> None:
    """Check a transformers-style ``rope_scaling`` dict for a head of ``head_dim``.

    Raises ``LongctxError`` (a ValueError) with one line naming the field, its value and the fix:
    unknown type (with the closest known one), missing or misspelled field, wrong value (factor
    below 1, non-positive lengths, a longrope list without head_dim/2 entries, ...). Keys the type
    does not use are logged and ignored, as transformers does, unless they look like a typo of
    one it uses.
    """
    if not isinstance(rope_scaling, dict):
        raise LongctxError(
            f"rope_scaling={rope_scaling!r} is not a mapping; give a dict such as "
            "{rope_type: yarn, factor: 4.0, original_max_position_embeddings: 4096} or null"
        )
    _check_head_dim(head_dim)
    rope_type = rope_type_of(rope_scaling)
    if rope_type not in KNOWN_ROPE_TYPES:
        close = difflib.get_close_matches(str(rope_type).lower(), KNOWN_ROPE_TYPES, n=1, cutoff=0.4)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise LongctxError(
            f"rope_scaling.rope_type={rope_type!r} is unknown; {hint}"
            f"known types: {', '.join(KNOWN_ROPE_TYPES)}"
        )
    required, optional = _TYPE_KEYS[rope_type]
    _check_keys(rope_scaling, rope_type, required, optional)
    _check_values(rope_scaling, rope_type, head_dim)


def _check_head_dim(head_dim: int) -> None:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise LongctxError(
            f"head_dim={head_dim!r} cannot be rotated: RoPE pairs dimension i with i + head_dim/2; "
            "use a positive even head_dim"
        )


def _check_keys(scaling: dict, rope_type: str, required: set[str], optional: set[str]) -> None:
    allowed = required | optional | _COMMON_KEYS
    for key in sorted(set(scaling) - allowed):
        close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.8)
        if close:
            raise LongctxError(
                f"rope_scaling.{key}={_brief(scaling[key])} is not a field of rope_type "
                f"{rope_type!r}; "
                f"did you mean {close[0]!r}?"
            )
        logger.warning("rope_scaling.%s is not used by rope_type %r; ignored", key, rope_type)
    for key in sorted(required):
        if key not in scaling:
            raise LongctxError(
                f"rope_scaling (rope_type {rope_type!r}) misses the field {key!r}; add it "
                f"(needed: {', '.join(sorted(required))})"
            )


def _brief(value: Any) -> str:
    """repr of a value for a one-line message; long lists are summarised by their length."""
    if isinstance(value, (list, tuple)) and len(value) > 4:
        return f"[{len(value)} entries]"
    return repr(value)


def _check_values(scaling: dict, rope_type: str, head_dim: int) -> None:
    if scaling.get("factor") is not None:
        _require_number(
            scaling, "factor", minimum=1.0, fix="a number >= 1 (new length / old length)"
        )
    elif "factor" in scaling and rope_type not in ("yarn", "longrope"):
        raise LongctxError(
            f"rope_scaling.factor=None for rope_type {rope_type!r}; give a number >= 1 "
            "(only yarn and longrope derive it from the lengths)"
        )
    original = scaling.get("original_max_position_embeddings")
    if "original_max_position_embeddings" in scaling and (
        isinstance(original, bool) or not isinstance(original, int) or original <= 0
    ):
        raise LongctxError(
            f"rope_scaling.original_max_position_embeddings={original!r} is not a positive "
            "integer; give the pretraining context length (e.g. 4096)"
        )
    if rope_type == "yarn" and scaling.get("factor") is None and original is None:
        raise LongctxError(
            "rope_scaling (rope_type 'yarn') has neither factor nor original_max_position_"
            "embeddings; add factor (new length / old length) or the original length"
        )
    for key in ("attention_factor", "beta_fast", "beta_slow", "rope_theta"):
        if scaling.get(key) is not None:
            _require_number(scaling, key, exclusive_minimum=0.0, fix="a positive number")
    for key in ("mscale", "mscale_all_dim"):
        if scaling.get(key) is not None:
            _require_number(scaling, key, minimum=0.0, fix="a number >= 0")
    if (scaling.get("beta_fast") or 32) < (scaling.get("beta_slow") or 1):
        raise LongctxError(
            f"rope_scaling.beta_fast={scaling.get('beta_fast')!r} is below beta_slow="
            f"{scaling.get('beta_slow')!r}; beta_fast must be >= beta_slow (defaults 32 and 1)"
        )
    if "truncate" in scaling and not isinstance(scaling["truncate"], bool):
        raise LongctxError(
            f"rope_scaling.truncate={scaling['truncate']!r} is not a bool; use true or false"
        )
    if rope_type == "llama3":
        _require_number(scaling, "low_freq_factor", exclusive_minimum=0.0, fix="a positive number")
        _require_number(scaling, "high_freq_factor", exclusive_minimum=0.0, fix="a positive number")
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise LongctxError(
                f"rope_scaling.high_freq_factor={scaling['high_freq_factor']!r} is not above "
                f"low_freq_factor={scaling['low_freq_factor']!r}; Llama 3.1 uses 4 and 1"
            )
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            _check_factor_list(scaling, key, head_dim)
    _check_partial_rotary(scaling, rope_type)


def _check_partial_rotary(scaling: dict, rope_type: str) -> None:
    value = scaling.get("partial_rotary_factor")
    if value is None:
        return
    _require_number(
        scaling, "partial_rotary_factor", exclusive_minimum=0.0, fix="a number in (0, 1]"
    )
    if value > 1 or (value != 1 and rope_type != "proportional"):
        raise LongctxError(
            f"rope_scaling.partial_rotary_factor={value!r} with rope_type {rope_type!r}: only "
            "rope_type 'proportional' rotates part of a head (a share in (0, 1]); else drop it"
        )


def _require_number(
    scaling: dict,
    key: str,
    *,
    fix: str,
    minimum: float | None = None,
    exclusive_minimum: float | None = None,
) -> None:
    value = scaling.get(key)
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value >= minimum
    if ok and exclusive_minimum is not None:
        ok = value > exclusive_minimum
    if not ok:
        raise LongctxError(f"rope_scaling.{key}={value!r} is invalid; give {fix}")


def _check_factor_list(scaling: dict, key: str, head_dim: int) -> None:
    values = scaling[key]
    pairs = head_dim // 2
    if not isinstance(values, (list, tuple)) or len(values) != pairs:
        size = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise LongctxError(
            f"rope_scaling.{key} has {size} entries for head_dim={head_dim}; give a list of "
            f"head_dim/2 = {pairs} positive numbers (one per rotated pair)"
        )
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, Real) or not v > 0]
    if bad:
        raise LongctxError(
            f"rope_scaling.{key} contains {bad[0]!r}; every entry must be a positive number"
        )


# ----------------------------------------------------------------------------- frequencies


def base_wavelength_factors(head_dim: int, base: float) -> Tensor:
    """``base^(2i/D)``, i = 0..D/2-1 (the reciprocals of the RoPE frequencies): [D/2] float32
    on the CPU.

    Computed in float32 exactly as transformers does (float32 exponent, float32 power), so
    checkpoints see the angles they were trained with. The device is explicit so that a module
    built under a ``torch.device("meta")`` context still holds real frequencies.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim  # [D/2]
    return base**exponent


def base_inv_freq(head_dim: int, base: float) -> Tensor:
    """Unscaled RoPE frequencies ``base^(-2i/D)``, i = 0..D/2-1: [D/2] float32 on the CPU."""
    return 1.0 / base_wavelength_factors(head_dim, base)


def ntk_base(base: float, factor: float, head_dim: int) -> float:
    """Static NTK-aware base change (CodeLlama style): ``base * factor^(D / (D - 2))``.

    It keeps the highest frequency and divides the lowest one by exactly ``factor``.
    SPECS 2.1 golden value: base 1e4, factor 4, D 128 -> 40889.9.
    """
    return base * factor ** (head_dim / (head_dim - 2))


def dynamic_ntk_base(
    base: float, factor: float, head_dim: int, seq_len: int, max_position_embeddings: int
) -> float:
    """Dynamic NTK base for a sequence of ``seq_len`` tokens (unchanged up to the trained length).

    ``base * (factor * L / M - (factor - 1))^(D / (D - 2))`` with L = max(seq_len, M).
    """
    length = max(seq_len, max_position_embeddings)
    growth = factor * length / max_position_embeddings - (factor - 1)
    return base * growth ** (head_dim / (head_dim - 2))


def yarn_correction_range(
    head_dim: int,
    base: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> tuple[float, float]:
    """YaRN's (low, high) dimension bounds of the ramp between extrapolation and interpolation.

    ``corr(n) = D ln(L0 / (2 pi n)) / (2 ln base)`` is the dimension whose wavelength fits n
    times into the original length L0. Pairs below ``low = corr(beta_fast)`` (many turns in L0)
    keep their frequency, pairs above ``high = corr(beta_slow)`` are interpolated. With truncate
    low is floored and high ceiled; both are clamped to [0, D-1].
    Golden (SPECS 2.1): D 128, base 1e4, L0 4096 -> (20, 46).
    """

    def correction_dim(turns: float) -> float:
        return (
            head_dim
            * math.log(original_max_position_embeddings / (turns * 2 * math.pi))
            / (2 * math.log(base))
        )

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


def yarn_attention_factor(
    factor: float, mscale: float | None = None, mscale_all_dim: float | None = None
) -> float:
    """YaRN's cos/sin multiplier ``0.1 ln(factor) + 1`` (1 for factor <= 1).

    With both ``mscale`` and ``mscale_all_dim`` (DeepSeek), it is the ratio
    ``(0.1 mscale ln f + 1) / (0.1 mscale_all_dim ln f + 1)``. Golden: factor 4 -> 1.13863.
    """

    def magnitude(scale: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

    if mscale and mscale_all_dim:
        return magnitude(mscale) / magnitude(mscale_all_dim)
    return magnitude(1.0)


def _default(scaling: dict, head_dim: int, base: float, max_pos: int, seq_len: int | None):
    return base_inv_freq(head_dim, base), 1.0


def _linear(scaling: dict, head_dim: int, base: float, max_pos: int, seq_len: int | None):
    # Position interpolation: positions / factor, i.e. every frequency / factor.
    return base_inv_freq(head_dim, base) / scaling["factor"], 1.0


def _ntk(scaling: dict, head_dim: int, base: float, max_pos: int, seq_len: int | None):
    return base_inv_freq(head_dim, ntk_base(base, scaling["factor"], head_dim)), 1.0


def _dynamic(scaling: dict, head_dim: int, base: float, max_pos: int, seq_len: int | None):
    length = max_pos if seq_len is None else seq_len
    new_base = dynamic_ntk_base(base, scaling["factor"], head_dim, length, max_pos)
    return base_inv_freq(head_dim, new_base), 1.0


def _yarn(scaling: dict, head_dim: int, base: float, max_pos: int, seq_len: int | None):
    original = scaling.get("original_max_position_embeddings", max_pos)
    factor = scaling.get("factor")
    if factor is None:  # DeepSeek-style: the extension ratio is implied by the two lengths
        factor = max_pos / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = yarn_attention_factor(
            factor, scaling.get("mscale"), scaling.get("mscale_all_dim")
        )
    low, high = yarn_correction_range(
        head_dim,
        base,
        original,
        scaling.get("beta_fast") or 32.0,
        scaling.get("beta_slow") or 1.0,
        scaling.get("truncate", True),
    )
    if low == high:
        high += 0.001  # the ramp needs a non-empty interval
    pair = torch.arange(head_dim // 2, dtype=torch.float32, device="cpu")  # [D/2]
    keep = 1 - ((pair - low) / (high - low)).clamp(0.0, 1.0)  # 1: keep, 0: interpolate
    # float32 in transformers' order of operations (1 / (factor * base^(2i/D)), the blend
    # weighted by ``1 - keep`` and ``keep``): the exported model's angles are the trained ones
    # bit for bit, not just to float32 rounding (which moved SmolLM2's logits by 1e-4).
    wavelengths = base_wavelength_factors(head_dim, base)
    extrapolated, interpolated = 1.0 / wavelengths, 1.0 / (factor * wavelengths)
    return interpolated * (1 - keep) + extrapolated * keep, float(attention_factor)


def _llama3(scaling: dict, head_dim: int, base: float, max_pos: int, seq_len: int | None):
    factor = scaling["factor"]
    low_factor, high_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    inv_freq = base_inv_freq(head_dim, base)  # [D/2]
    wavelen = 2 * math.pi / inv_freq
    # Short wavelengths (< L0/high) stay, long ones (> L0/low) are divided by factor, the band
    # between is a linear blend in L0/wavelen.
    smooth = (original / wavelen - low_factor) / (high_factor - low_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > original / low_factor, inv_freq / factor, blended)
    return torch.where(wavelen < original / high_factor, inv_freq, scaled), 1.0


def _longrope(scaling: dict, head_dim: int, base: float, max_pos: int, seq_len: int | None):
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:  # Phi-3 style: implied by max_position_embeddings / original length
        factor = max_pos / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
    use_long = seq_len is not None and seq_len > original
    ext = torch.tensor(
        scaling["long_factor" if use_long else "short_factor"], dtype=torch.float32, device="cpu"
    )
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim  # [D/2]
    return 1.0 / (ext * base**exponent), float(attention_factor)


def _proportional(scaling: dict, head_dim: int, base: float, max_pos: int, seq_len: int | None):
    # Only the first partial_rotary_factor of the pairs turn (exponent still over the full D);
    # the others get frequency 0, i.e. cos 1 and sin 0: they pass through unrotated.
    rotated = int(scaling.get("partial_rotary_factor", 1.0) * head_dim // 2)
    inv_freq = base_inv_freq(head_dim, base)
    inv_freq[rotated:] = 0.0
    return inv_freq / scaling.get("factor", 1.0), 1.0


# Each rule: (scaling, head_dim, base, max_position_embeddings, seq_len) -> (inv_freq, factor).
_FREQUENCY_RULES: dict[str, Callable[..., tuple[Tensor, float]]] = {
    "default": _default,
    "linear": _linear,
    "ntk": _ntk,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "llama3": _llama3,
    "longrope": _longrope,
    "proportional": _proportional,
}


def rope_frequencies(
    rope_scaling: dict | None,
    head_dim: int,
    base: float,
    max_position_embeddings: int,
    seq_len: int | None = None,
) -> tuple[Tensor, float]:
    """inv_freq [head_dim/2] float32 (CPU) and the attention factor (multiplies cos and sin).

    ``seq_len`` matters only for ``dynamic`` (None or <= max_position_embeddings: unscaled) and
    ``longrope`` (long factors when seq_len > original_max_position_embeddings, short factors
    otherwise, also for None), exactly as ``transformers``' ROPE_INIT_FUNCTIONS.
    """
    _check_head_dim(head_dim)
    scaling: dict[str, Any] = dict(rope_scaling) if rope_scaling else {}
    if scaling:
        validate_rope_scaling(scaling, head_dim)
        theta = scaling.get("rope_theta")
        if theta is not None and theta != base:
            raise LongctxError(
                f"rope_scaling.rope_theta={theta!r} disagrees with rope_theta={base!r}; "
                "make them equal or drop rope_theta from rope_scaling"
            )
    return _FREQUENCY_RULES[rope_type_of(scaling)](
        scaling, head_dim, base, max_position_embeddings, seq_len
    )


# ----------------------------------------------------------------------------- module


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE (with its scaling) for given global position ids.

    The frequencies are float32 buffers (not saved in state dicts). ``module.to(dtype)``,
    ``.half()`` or ``.bfloat16()`` would round them and ruin long-context angles, so they are
    rebuilt in float32 from an exact CPU copy whenever the module is moved or cast.
    """

    def __init__(
        self,
        head_dim: int,
        base: float,
        max_position_embeddings: int,
        rope_scaling: dict | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.max_position_embeddings = max_position_embeddings
        self.rope_scaling = dict(rope_scaling) if rope_scaling else None
        self.rope_type = rope_type_of(self.rope_scaling)
        inv_freq, self.attention_factor = rope_frequencies(
            self.rope_scaling, head_dim, base, max_position_embeddings
        )
        self._exact_frequencies = {"inv_freq": inv_freq}  # float32 CPU masters of the buffers
        if self.rope_type == "longrope":
            original = self.rope_scaling["original_max_position_embeddings"]
            long_inv_freq, _ = rope_frequencies(
                self.rope_scaling, head_dim, base, max_position_embeddings, seq_len=original + 1
            )
            self._exact_frequencies["long_inv_freq"] = long_inv_freq
        for name, freqs in self._exact_frequencies.items():
            self.register_buffer(name, freqs.clone(), persistent=False)  # [D/2]

    @classmethod
    def from_config(cls, config: RopeSettings) -> RotaryEmbedding:
        """The rotary embedding of a ``ModelConfig`` (head size, rope_theta, rope_scaling)."""
        return cls(
            config.dim_per_head,
            config.rope_theta,
            config.max_position_embeddings,
            config.rope_scaling,
        )

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name, exact in self._exact_frequencies.items():
            self._buffers[name] = exact.to(self._buffers[name].device)
        return self

    def frequencies(self, position_ids: Tensor, seq_len: int | None = None) -> Tensor:
        """inv_freq [D/2] float32 on position_ids' device, for a sequence of ``seq_len`` tokens.

        Length-dependent types read ``max(position_ids) + 1`` when seq_len is None (a device
        sync); pass seq_len to avoid it and, under sequence parallelism, to use the global length.
        """
        if self.rope_type not in LENGTH_DEPENDENT_ROPE_TYPES:
            return self.inv_freq
        if seq_len is None:
            seq_len = int(position_ids.max()) + 1
        if self.rope_type == "longrope":
            original = self.rope_scaling["original_max_position_embeddings"]
            return self.long_inv_freq if seq_len > original else self.inv_freq
        if seq_len <= self.max_position_embeddings:
            return self.inv_freq
        inv_freq, _ = rope_frequencies(
            self.rope_scaling, self.head_dim, self.base, self.max_position_embeddings, seq_len
        )
        return inv_freq.to(position_ids.device)

    def forward(self, position_ids: Tensor, seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        """position_ids [B, T] (global positions) -> cos, sin [B, T, head_dim] float32.

        Both are already multiplied by the attention factor. ``seq_len`` matters only for the
        length-dependent scalings (dynamic, longrope); default ``max(position_ids) + 1``.
        """
        if position_ids.dim() != 2:
            raise ValueError(
                f"position_ids has shape {tuple(position_ids.shape)}; expected [B, T] "
                "(use position_ids[None] for a single sequence)"
            )
        inv_freq = self.frequencies(position_ids, seq_len)  # [D/2]
        angles = position_ids[..., None].to(torch.float32) * inv_freq  # [B, T, D/2]
        angles = torch.cat((angles, angles), dim=-1)  # [B, T, D]: pair i and i + D/2 share angles
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, base={self.base}, rope_type={self.rope_type}, "
            f"attention_factor={self.attention_factor:.6g}"
        )


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the last dim: the 90 degree turn of every pair (i, i + D/2)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _add_turned(out: Tensor, x: Tensor, sin: Tensor, sign: float) -> Tensor:
    """out += sign * rotate_half(x) * sin, in place, without rotate_half's two temporaries:
    out's first half gets -sign * x2 * sin1, its second half sign * x1 * sin2 (last dim D)."""
    half = x.shape[-1] // 2
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-sign)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:], value=sign)
    return out


class _Rotate(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin with one new tensor each way (the plain expression makes
    five in forward and more in backward, each paid in page faults at long context).

    The rotation is linear in x, so backward applies its transpose, the rotation by -angle:
    dx = g * cos - rotate_half(g * sin) = g * cos + (g2 * sin2, -g1 * sin1) per pair; only the
    tables (alive anyway) are saved. x [B, H, T, D], cos/sin [B, 1, T, D] in x's dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _add_turned(x * cos, x, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        return _add_turned(grad * cos, grad, sin, -1.0), None, None


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q [B, Hq, T, D] and k [B, Hkv, T, D] by cos, sin [B, T, D] (``rotate_heads``)."""
    if cos.shape[-2:] != (q.shape[-2], q.shape[-1]) or k.shape[-2:] != q.shape[-2:]:
        raise ValueError(
            f"apply_rotary: q {tuple(q.shape)}, k {tuple(k.shape)} and cos {tuple(cos.shape)} "
            "must share T and D ([B, H, T, D] and [B, T, D])"
        )
    return rotate_heads(q, cos, sin), rotate_heads(k, cos, sin)


def rotate_heads(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D] rotated by cos, sin [B, T, D]: the one rotation every caller uses (the
    model, and cores that rotate q, k themselves), so their results agree bit for bit.

    Computed in float32 (float64 inputs stay float64) and cast back to x's dtype, so bf16
    activations are rotated with exact angles and rounded once. Tables that need a gradient
    take the plain autograd expression; others the fused ``_Rotate``.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    cos = cos.unsqueeze(1).to(compute)  # [B, 1, T, D]
    sin = sin.unsqueeze(1).to(compute)
    wide = x.to(compute)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return (wide * cos + rotate_half(wide) * sin).to(x.dtype)
    return _Rotate.apply(wide, cos, sin).to(x.dtype)
