"""In-place fake-quant values and straight-through gradients, op for op the reference's.

`reference.fake_quantize` is autograd-differentiable aten math; run eagerly, every step
allocates a tensor the size of its input and autograd keeps several of them for backward.
Here the same aten ops run in the same order and dtypes, mostly in place on one buffer, so
the values are identical (an in-place op is the same kernel as its out-of-place form) and
the gradient is the one autograd derives for the reference, written out:

    forward  (X = input dtype, S = scale dtype, P = dtype of x * m, P2 = of d * s)
        t = round(x * m) [+ z]        m = 1 / s (torchao rule) or ggml's multiplier
        c = clamp(t, qmin, qmax)      mask = qmin <= t <= qmax
        d = c.to(X) [- z.to(X)]
        out = (d * s).to(X)
    backward (each step is the backward of the matching forward op; casts to an input's
              dtype are those the autograd engine applies)
        g = (grad.to(P2) * s).to(X).to(P)
        g = where(mask, g, 0)        (kept as its complement, `outside`)
        grad_x = (g * m).to(X)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from qatfx import reference
from qatfx.spec import GGML, TENSOR


@dataclass(frozen=True)
class Grid:
    """The qparams of one fake-quant call, shaped to broadcast over (..., n_groups, G)
    blocks: scale, the multiplier codes are rounded with, and the zero point (None when
    symmetric)."""

    scale: torch.Tensor
    multiplier: torch.Tensor
    zero: Optional[torch.Tensor]
    qmin: int
    qmax: int


def blocks(x: torch.Tensor, group_size: int) -> torch.Tensor:
    return reference._blocks(x, group_size)


@torch.no_grad()
def grid_of(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    group_size: int,
    symmetric: bool,
    eps: Optional[float],
    scale_dtype: Optional[torch.dtype],
    scale_rule: str,
) -> Grid:
    """The qparams `reference.fake_quantize` computes for `x` (the same functions)."""
    if scale_rule == GGML:
        scale, multiplier = reference.ggml_qparams(x, qmin, qmax, group_size, eps, scale_dtype)
        return Grid(_per_block(scale, group_size), _per_block(multiplier, group_size), None, qmin, qmax)
    scale, zero = reference.choose_qparams(x, qmin, qmax, group_size, symmetric, eps, scale_dtype)
    scale = _per_block(scale, group_size)
    zero = None if zero is None else _per_block(zero, group_size)
    return Grid(scale, 1.0 / scale, zero, qmin, qmax)


def _per_block(t: torch.Tensor, group_size: int) -> torch.Tensor:
    # (..., n_groups) -> (..., n_groups, 1); per tensor: (1,) -> (1, 1), as the reference
    # broadcasts them against its (1, 1, numel) view
    return t.reshape(1, 1) if group_size == TENSOR else t.unsqueeze(-1)


@torch.no_grad()
def fake_quantized(x_blocks: torch.Tensor, grid: Grid, with_mask: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(fq(x) as blocks, the bool out-of-range mask or None): one new buffer, the rest in place."""
    out_dtype = x_blocks.dtype
    t = x_blocks * grid.multiplier
    t.round_()
    if grid.zero is not None:
        t.add_(grid.zero)
    mask = _outside(t, grid) if with_mask else None
    t.clamp_(grid.qmin, grid.qmax)
    d = t.to(out_dtype)
    if grid.zero is not None:
        d.sub_(grid.zero.to(out_dtype))
    if torch.promote_types(out_dtype, grid.scale.dtype) == out_dtype:
        d.mul_(grid.scale)
    else:
        d = (d * grid.scale).to(out_dtype)
    return d, mask


@torch.no_grad()
def outside_mask(x_blocks: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Where the clamp cuts the gradient, recomputed from x (a weight keeps no mask
    between passes)."""
    t = x_blocks * grid.multiplier
    t.round_()
    if grid.zero is not None:
        t.add_(grid.zero)
    return _outside(t, grid)


def _outside(t: torch.Tensor, grid: Grid) -> torch.Tensor:
    # not (qmin <= t <= qmax), the complement of clamp's backward mask (a NaN is outside)
    return torch.logical_and(t >= grid.qmin, t <= grid.qmax).logical_not_()


@torch.no_grad()
def straight_through(grad_blocks: torch.Tensor, outside: torch.Tensor, grid: Grid, x_dtype: torch.dtype) -> torch.Tensor:
    """d out / d x of the reference applied to `grad_blocks` (see the module docstring)."""
    rounded_dtype = torch.promote_types(x_dtype, grid.multiplier.dtype)
    scaled_dtype = torch.promote_types(x_dtype, grid.scale.dtype)
    g = (grad_blocks.to(scaled_dtype) * grid.scale).to(x_dtype).to(rounded_dtype)
    g.masked_fill_(outside, 0)  # where(mask, g, 0): +0.0 where cut
    if rounded_dtype == x_dtype:
        return g.mul_(grid.multiplier)
    return (g * grid.multiplier).to(x_dtype)
