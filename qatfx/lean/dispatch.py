"""Which fake-quant runs: the lean eager one, or the reference math a tracer can see."""

from __future__ import annotations

from typing import Optional

import torch

from qatfx.lean.autograd import fake_quantize_values, fake_quantize_with_grad

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def applies(x: torch.Tensor) -> bool:
    """True for a plain tensor run eagerly. Anything being traced (torch.compile, export,
    a dispatch mode such as FakeTensorMode, a functorch transform) or a tensor subclass
    (DTensor, a FakeTensor) gets the reference math instead, which Inductor fuses and
    every tracer understands."""
    return (
        type(x) in _PLAIN
        and x.layout == torch.strided
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
    )


def fake_quantize(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    group_size: int,
    symmetric: bool,
    eps: Optional[float],
    scale_dtype: Optional[torch.dtype],
    scale_rule: str,
) -> torch.Tensor:
    """`reference.fake_quantize`'s values and gradient, eagerly. A 2-D operand is treated as
    a weight (recomputed in backward, see `qatfx.lean`), anything else as an activation."""
    args = (qmin, qmax, group_size, symmetric, eps, scale_dtype, scale_rule)
    if torch.is_grad_enabled() and x.requires_grad:
        return fake_quantize_with_grad(x, x.dim() == 2, *args)
    return fake_quantize_values(x, *args)
