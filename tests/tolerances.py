"""Float32-against-reference tolerances shared by the kernel tests."""

from __future__ import annotations

import torch

FP32 = {"rtol": 1e-5, "atol": 2e-6}  # an exact algorithm in float32, entries of order 1


def assert_gradient_close(got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    """``got`` within rtol 1e-5 and an absolute 1e-5 of ``want``'s largest entry (at least
    ``FP32``'s 2e-6, for gradients that are zero up to rounding).

    Parameter and weight gradients sum over every token and cancel in places, so float32
    summation orders (which differ between CPUs' GEMM kernels: AVX2 and AVX-512 machines give
    different roundings) move a small entry by ~1e-6 of its tensor's scale."""
    atol = max(FP32["atol"], 1e-5 * float(want.abs().max()))
    torch.testing.assert_close(
        got,
        want.to(got.dtype),
        rtol=FP32["rtol"],
        atol=atol,
        msg=(lambda m: f"{msg}: {m}") if msg else None,
    )
