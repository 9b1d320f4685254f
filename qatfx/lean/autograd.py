"""The two autograd Functions behind eager fake quantization (see `qatfx.lean`).

Each one's backward is `values.straight_through`, the reference's gradient op for op; what
differs is what it keeps between forward and backward:

- ActivationFakeQuant keeps a bool mask of the codes the clamp cut (1 byte per element)
  and the qparams (one per token or group); the linear that reads fq(x) keeps fq(x), as
  a float linear keeps x.
- WeightFakeQuant keeps W itself (a parameter the model holds anyway, or LoRA's W + sBA)
  and the qparams, and recomputes the mask in backward; its output is a
  FakeQuantizedWeight, so the matmul keeps that wrapper and not fq(W).
"""

from __future__ import annotations

import torch

from qatfx.lean import kernels
from qatfx.lean.lazy_weight import FakeQuantizedWeight
from qatfx.lean.values import Grid, blocks, fake_quantized, grid_of, outside_mask, straight_through


def _grid_tensors(grid: Grid) -> tuple:
    return (grid.scale, grid.multiplier, grid.zero)


def _grid_from(tensors, qmin: int, qmax: int) -> Grid:
    scale, multiplier, zero = tensors
    return Grid(scale, multiplier, zero, qmin, qmax)


class ActivationFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qmin, qmax, group_size, symmetric, eps, scale_dtype, scale_rule):
        grid = grid_of(x, qmin, qmax, group_size, symmetric, eps, scale_dtype, scale_rule)
        values, outside = fake_quantized(blocks(x, group_size), grid, with_mask=True)
        ctx.save_for_backward(outside, *_grid_tensors(grid))
        ctx.qrange = (qmin, qmax)
        ctx.group_size = group_size
        ctx.x_dtype = x.dtype
        return values.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        outside, *grid_tensors = ctx.saved_tensors
        grid = _grid_from(grid_tensors, *ctx.qrange)
        grad_x = straight_through(blocks(grad.contiguous(), ctx.group_size), outside, grid, ctx.x_dtype)
        return (grad_x.view(grad.shape),) + (None,) * 7


class WeightFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, qmin, qmax, group_size, symmetric, eps, scale_dtype, scale_rule):
        grid = grid_of(w, qmin, qmax, group_size, symmetric, eps, scale_dtype, scale_rule)
        ctx.save_for_backward(w, *_grid_tensors(grid))
        ctx.qrange = (qmin, qmax)
        ctx.group_size = group_size
        return FakeQuantizedWeight(w.detach(), grid, group_size)

    @staticmethod
    def backward(ctx, grad):
        w, *grid_tensors = ctx.saved_tensors
        grid = _grid_from(grid_tensors, *ctx.qrange)
        w_blocks = blocks(w.detach(), ctx.group_size)
        grad_blocks = blocks(grad.contiguous(), ctx.group_size)
        if kernels.used_for(w):
            grad_w = kernels.straight_through(w_blocks, grad_blocks, grid)
        else:
            grad_w = straight_through(grad_blocks, outside_mask(w_blocks, grid), grid, w.dtype)
        return (grad_w.view(w.shape),) + (None,) * 7


def fake_quantize_with_grad(x: torch.Tensor, weight: bool, *args) -> torch.Tensor:
    function = WeightFakeQuant if weight else ActivationFakeQuant
    return function.apply(x, *args)


def fake_quantize_values(x: torch.Tensor, qmin, qmax, group_size, symmetric, eps, scale_dtype, scale_rule) -> torch.Tensor:
    """fq(x) with nothing kept for backward (no_grad, or x needs no gradient)."""
    grid = grid_of(x, qmin, qmax, group_size, symmetric, eps, scale_dtype, scale_rule)
    values, _ = fake_quantized(blocks(x, group_size), grid, with_mask=False)
    return values.view(x.shape)


