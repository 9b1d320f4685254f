"""qatfx's torch.library ops: the nodes prepare and convert put into a graph.

- `qatfx::fake_quantize` (prepare) is CompositeImplicitAutograd: readable as one node in
  a graph dump. Traced (torch.compile, export) it decomposes into plain aten math
  (reference.fake_quantize), so Inductor fuses it with its neighbours and autograd derives
  the straight-through gradient. Run eagerly it is `qatfx.lean.fake_quantize`: the same
  values and gradient, computed in place, with a backward that keeps neither fq(W) nor
  intermediate copies. Given `scale` (and `zero`), the trained qparams of a learnable
  spec, it is `reference.fake_quantize_learned` (eager too), which also differentiates
  them (LSQ).
- `qatfx::quantize_dynamic` and `qatfx::dequantize` (convert) are opaque custom ops with
  fake (meta) kernels: they survive torch.export save/load and the lowering passes
  (`qatfx.lowering`) decide what each becomes. Each weight format (qatfx/formats/) defines
  its own dequantize op beside its packing; `qatfx::dequantize` is the plain-codes one.
"""

from __future__ import annotations

from typing import Optional

import torch

from qatfx import lean, reference
from qatfx.spec import TORCHAO, check_scale_rule

_lib = torch.library.Library("qatfx", "DEF")

_lib.define(
    "fake_quantize(Tensor x, Tensor? scale=None, Tensor? zero=None, *, int qmin, int qmax, int group_size, bool symmetric, "
    "float? eps, ScalarType? scale_dtype, bool enabled=True, str scale_rule=\"torchao\") -> Tensor"
)


def _fake_quantize(
    x: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    zero: Optional[torch.Tensor] = None,
    *,
    qmin: int,
    qmax: int,
    group_size: int,
    symmetric: bool,
    eps: Optional[float],
    scale_dtype: Optional[torch.dtype],
    enabled: bool = True,
    scale_rule: str = TORCHAO,
) -> torch.Tensor:
    if not enabled:
        # alias-free identity: exact, and Inductor drops the copy
        return x.clone()
    check_scale_rule(scale_rule, symmetric)
    if scale is not None:  # a learnable spec: trained qparams, the reference's LSQ math
        return reference.fake_quantize_learned(x, scale, zero, qmin, qmax, group_size, eps, scale_dtype)
    if lean.applies(x):
        return lean.fake_quantize(x, qmin, qmax, group_size, symmetric, eps, scale_dtype, scale_rule)
    return reference.fake_quantize(x, qmin, qmax, group_size, symmetric, eps, scale_dtype, scale_rule)


_lib.impl("fake_quantize", _fake_quantize, "CompositeImplicitAutograd")

fake_quantize = torch.ops.qatfx.fake_quantize.default


@torch.library.custom_op("qatfx::quantize_dynamic", mutates_args=())
def _quantize_dynamic(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    group_size: int,
    symmetric: bool,
    eps: Optional[float],
    scale_dtype: Optional[torch.dtype],
    *,
    scale_rule: str = TORCHAO,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic quantization of an activation: (q, scale, zero_point). Symmetric specs get a
    zero point tensor of zeros so the op has one signature. `scale_rule` is keyword-only
    (and left out of a call when "torchao"), so the positional arguments of every graph's
    node stay the seven they always were."""
    q, scale, zero = reference.quantize_dynamic(x, qmin, qmax, group_size, symmetric, eps, scale_dtype, scale_rule)
    if zero is None:
        zero = torch.zeros_like(scale)
    return q, scale, zero


@_quantize_dynamic.register_fake
def _(x, qmin, qmax, group_size, symmetric, eps, scale_dtype, *, scale_rule=TORCHAO):
    check_scale_rule(scale_rule, symmetric)
    shape = reference.qparams_shape(x, group_size)
    qdtype = scale_dtype or x.dtype
    return (
        torch.empty_like(x, dtype=reference.storage_dtype(qmin)),
        x.new_empty(shape, dtype=qdtype),
        x.new_empty(shape, dtype=qdtype),
    )


@torch.library.custom_op("qatfx::dequantize", mutates_args=())
def _dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """((q - zero) * scale).to(out_dtype) per group along the last dim."""
    return reference.dequantize(q, scale, zero, group_size, out_dtype)


@_dequantize.register_fake
def _(q, scale, zero, group_size, out_dtype):
    return torch.empty_like(q, dtype=out_dtype)


# The OpOverloads graphs hold (what convert inserts and the lowering matches).
quantize_dynamic = torch.ops.qatfx.quantize_dynamic.default
dequantize = torch.ops.qatfx.dequantize.default
