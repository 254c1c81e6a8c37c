"""BAM: Bayesian attention mechanism, position as a log-prior on the logits (SPECS.md 2.3).

Head h adds ``b_h(d) = -exp(theta_scale_h) * (|d - mu_h| + 1e-5) ** theta_shape_h`` to the
logit of a key at distance ``d = i - j`` (a generalised-Gaussian log-density up to a constant).
Initialisation: ``theta_scale_h = log(2^(-8h/H))`` (h = 1..H, the ALiBi slopes) and
``theta_shape_h = 1``, so a fresh BAM layer IS ALiBi; ``theta_shape = 0`` makes the prior a
per-row constant, i.e. no position encoding. ``mu = 0`` is fixed (a buffer). ``theta_shape`` is
clamped at 0 where it is used, so it never turns the prior into a growing reward.

Optional SSMax (scalable softmax): the logits of row i are multiplied by ``s_h * ln(n_i)``,
``n_i`` the number of keys query i sees. ``s_h`` starts at ``1 / ln(max_position_embeddings)``
(our choice: the multiplier is 1 at the model's trained length, so a converted checkpoint starts
close to where it was).

The prior depends only on the distance, so the attention core (``attention/scored.py``,
``BAMAttention``) evaluates it once per distance (``prior_table``) and the flash-style tiled
kernel of ``attention/biased.py`` adds it per tile; ``scores`` computes the same logits for a
whole block at once (the benchmarks' naive baseline and the references).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from longctx.positional.config import BAMConfig

DISTANCE_EPS = 1e-5  # keeps (|d - mu| + eps) ** shape differentiable in shape at d = mu


def alibi_slopes(num_heads: int) -> Tensor:
    """``2^(-8h/H)`` for h = 1..H (float64) [H]: the ALiBi slopes BAM starts from."""
    heads = torch.arange(1, num_heads + 1, dtype=torch.float64)
    return torch.pow(2.0, -8.0 * heads / num_heads)


def bam_log_prior(distance: Tensor, theta_scale: Tensor, theta_shape: Tensor, mu: Tensor) -> Tensor:
    """``-exp(scale_h) * (|d - mu_h| + 1e-5) ** max(shape_h, 0)``.

    distance [c, Tk] (i - j, any sign), theta_scale / theta_shape / mu [H] -> prior [H, c, Tk].
    """
    d = distance[None].to(theta_scale.dtype)  # [1, c, Tk]
    offset = (d - mu[:, None, None]).abs() + DISTANCE_EPS  # [H, c, Tk]
    shape = theta_shape.clamp(min=0.0)[:, None, None]
    return -torch.exp(theta_scale)[:, None, None] * offset.pow(shape)


class BAMScore(nn.Module):
    """Logits ``q.k / sqrt(D) + b_h(i - j)``, times ``s_h ln(n_i)`` with SSMax.

    Parameters per head: ``theta_scale`` [H], ``theta_shape`` [H] and, with SSMax,
    ``ssmax_scale`` [H]; ``mu`` [H] is a zero buffer.
    """

    def __init__(
        self, config: BAMConfig, *, num_heads: int, head_dim: int, max_position_embeddings: int
    ):
        super().__init__()
        self.scale = 1.0 / math.sqrt(head_dim)
        self.max_position_embeddings = max_position_embeddings
        self.theta_scale = nn.Parameter(torch.empty(num_heads))
        self.theta_shape = nn.Parameter(torch.empty(num_heads))
        self.register_buffer("mu", torch.zeros(num_heads), persistent=False)
        self.ssmax_scale = nn.Parameter(torch.empty(num_heads)) if config.ssmax else None
        self.init_new_parameters()

    @torch.no_grad()
    def init_new_parameters(self) -> None:
        """SPECS 2.3 initialisation (ALiBi): log slopes, shape 1, SSMax 1/ln(max positions).

        The HF loader calls it for tensors a RoPE checkpoint does not have."""
        heads = self.theta_scale.shape[0]
        self.theta_scale.copy_(alibi_slopes(heads).log())
        self.theta_shape.fill_(1.0)
        self.mu = torch.zeros(heads, device=self.theta_scale.device)
        if self.ssmax_scale is not None:
            self.ssmax_scale.fill_(1.0 / math.log(self.max_position_embeddings))

    def prior_table(self, distance: Tensor, heads: slice, dtype: torch.dtype) -> Tensor:
        """The prior of heads ``heads`` at each distance: distance [N] -> [h, N] in ``dtype``
        (the compute dtype, whatever the parameters' storage dtype)."""
        params = (self.theta_scale[heads], self.theta_shape[heads], self.mu[heads])
        return bam_log_prior(distance[None], *(p.to(dtype) for p in params))[:, 0]

    def ssmax_multiplier(self, visible_keys: Tensor, heads: slice, dtype: torch.dtype) -> Tensor:
        """SSMax's ``s_h ln(n_i)``: visible-key counts [Bm, c] -> [Bm, h, c] in ``dtype``
        (a count below 1, a row that sees nothing, is taken as 1)."""
        counts = visible_keys.clamp(min=1).to(dtype)
        return self.ssmax_scale[heads].to(dtype)[:, None] * counts.log()[:, None]

    def scores(
        self,
        q: Tensor,
        k: Tensor,
        q_positions: Tensor,
        k_positions: Tensor,
        visible: Tensor,
        heads: slice = slice(None),
    ) -> Tensor:
        """q [B, H, c, D], k [B, H, Tk, D], visible [Bm, c, Tk] -> logits [B, H, c, Tk];
        ``heads`` selects the per-head parameters of these H heads. The whole block at once:
        the attention core runs the tiled kernel instead (``attention/biased.py``)."""
        logits = (q @ k.transpose(-1, -2)) * self.scale  # [B, H, c, Tk]
        distance = q_positions[:, None] - k_positions[None, :]  # [c, Tk]
        params = (self.theta_scale[heads], self.theta_shape[heads], self.mu[heads])
        prior = bam_log_prior(distance, *(p.to(logits.dtype) for p in params))
        logits = logits + prior  # [B, H, c, Tk]
        if self.ssmax_scale is None:
            return logits
        multiplier = self.ssmax_multiplier(visible.sum(dim=-1), heads, logits.dtype)  # [Bm, H, c]
        return logits * multiplier[..., None]  # [Bm, H, c, 1] broadcast over B, keys

    def extra_repr(self) -> str:
        return f"heads={self.theta_scale.shape[0]}, ssmax={self.ssmax_scale is not None}"
