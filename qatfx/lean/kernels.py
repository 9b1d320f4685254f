"""The weight's fake quantization as two fused kernels (Inductor: C++ on CPU, Triton on GPU).

A weight is fake-quantized three times a step (forward, and again in backward for the
matmul and for the mask), over every parameter of the model: done as a chain of aten ops
that is ~15 passes over weight-sized tensors, which on a CPU costs as much as the matmuls
themselves. Each kernel here is one pass: `values` reads W and writes fq(W);
`straight_through` reads W and the gradient and writes the masked gradient.

Bit for bit the aten chain (`values.py`): each op is written with the dtype eager torch
computes it in (a 16-bit float op is computed in float32 and rounded to 16 bits, which the
explicit casts say and `emulate_precision_casts` makes Inductor keep). Shapes are dynamic,
so one compile per dtype combination serves every layer; tensors below
`MIN_ELEMENTS` stay on the aten chain, where a kernel call's overhead would cost more
than it saves (and tests of small models compile nothing).
"""

from __future__ import annotations

import functools
import os
import types

import torch

from qatfx.lean.values import Grid

# Measured on a 2-core x86 CPU (fq(W) values, median ms, kernel vs aten chain): 0.33 vs 0.41
# at a 1536x576 projection, 73 vs 103 at a 49152x576 lm_head; below ~2^18 elements the
# compiled call's fixed cost (~0.2 ms) outweighs the saved passes.
MIN_ELEMENTS = int(os.environ.get("QATFX_FUSED_MIN_ELEMENTS", 1 << 18))


def _op(a: torch.Tensor, b: torch.Tensor, fn) -> torch.Tensor:
    """a (op) b in the dtype eager torch gives it, computed as eager computes it: 16-bit
    floats in float32, rounded once."""
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    if out_dtype == torch.float32 or out_dtype == torch.float64:
        return fn(a.to(out_dtype), b.to(out_dtype))
    return fn(a.float(), b.float()).to(out_dtype)


def _codes(w, multiplier, zero, qmin: int, qmax: int):
    t = torch.round(_op(w, multiplier, torch.mul))
    if zero is not None:
        t = _op(t, zero, torch.add)
    return t


def _values(w, multiplier, scale, zero, qmin: int, qmax: int):
    d = torch.clamp(_codes(w, multiplier, zero, qmin, qmax), qmin, qmax).to(w.dtype)
    if zero is not None:
        d = _op(d, zero.to(w.dtype), torch.sub)
    return _op(d, scale, torch.mul).to(w.dtype)


def _straight_through(w, grad, multiplier, scale, zero, qmin: int, qmax: int):
    t = _codes(w, multiplier, zero, qmin, qmax)
    inside = (t >= qmin) & (t <= qmax)
    rounded_dtype = t.dtype
    g = _op(grad.to(torch.promote_types(w.dtype, scale.dtype)), scale, torch.mul).to(w.dtype).to(rounded_dtype)
    g = torch.where(inside, g, torch.zeros((), dtype=g.dtype))
    return _op(g, multiplier, torch.mul).to(w.dtype)


@functools.cache
def _compiled(fn, key: tuple):
    """`fn` compiled for one dtype / grid combination. Each gets its own copy of the code
    object, because Dynamo keeps its compiled variants per code object and stops at a few
    (a model may mix several weight schemes and dtypes)."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, f"{fn.__name__}_{abs(hash(key)):x}")
    return torch.compile(copy, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})


def _key(*tensors, grid: Grid) -> tuple:
    return (*(t.dtype for t in tensors), grid.scale.dtype, grid.multiplier.dtype, grid.zero is None, grid.qmin, grid.qmax)


def used_for(w: torch.Tensor) -> bool:
    return w.numel() >= MIN_ELEMENTS


def values(w_blocks: torch.Tensor, grid: Grid) -> torch.Tensor:
    return _compiled(_values, _key(w_blocks, grid=grid))(w_blocks, grid.multiplier, grid.scale, grid.zero, grid.qmin, grid.qmax)


def straight_through(w_blocks: torch.Tensor, grad_blocks: torch.Tensor, grid: Grid) -> torch.Tensor:
    return _compiled(_straight_through, _key(w_blocks, grad_blocks, grid=grid))(w_blocks, grad_blocks, grid.multiplier, grid.scale, grid.zero, grid.qmin, grid.qmax)
