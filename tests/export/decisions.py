"""How the tests compare a `.pte`'s logits with the converted qatfx model's.

The two compute the same int8 x int4 products (convert's weight codes; activation codes from
the same per-token formula) and reorder the float arithmetic around them (XNNPACK's GEMM
and norm kernels against ATen's). Each reordered fp32 sum of K terms moves by at most
K * 2^-24 * sum|terms|; for these test models (K <= 128, |logits| < 4, two blocks) that is
~1e-5 per layer, so LOGIT_ATOL = 1e-3 leaves two orders of magnitude for propagation
through the layers (measured here: <= 2.4e-5). What it catches: a wrong code or scale moves
logits by a quantization step (~1e-1), and one activation code taking its neighbour (the
program rounds x / s in float64 where qatfx rounds in float32: only at an exact .5 tie,
~1e-5 of values, none on these inputs) by ~1e-2.

Greedy tokens then agree wherever the converted model's top-2 margin exceeds 2 * LOGIT_ATOL;
the tests also require most positions to be that clear, so a token comparison is not
vacuous.
"""

from __future__ import annotations

import torch

LOGIT_ATOL = 1e-3
MIN_CLEAR_POSITIONS = 0.9


def assert_same_logits_and_tokens(got: torch.Tensor, expected: torch.Tensor) -> None:
    diff = (got - expected).abs().max().item()
    assert diff <= LOGIT_ATOL, f".pte logits differ from the converted model's by {diff:.2e} > {LOGIT_ATOL}"
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * LOGIT_ATOL
    assert clear.float().mean().item() >= MIN_CLEAR_POSITIONS, "too many near-ties for the token check to mean anything"
    assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])
