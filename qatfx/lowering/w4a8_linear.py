"""`qatfx::w4a8_linear`: the fused op the lowering pass puts in place of q/dq + linear.

    y = epilogue(linear(dequantize(x_q, x_scale, x_zero), dequantize_int4(w_packed, w_scales)))

Inputs are what convert wrote and what the activation quantization computes:
    x_q (..., K) int8, x_scale (..., 1) and x_zero (..., 1) (per token), the weight in the
    int4_packed format (qatfx/formats/int4_packed.py: w_packed (N, K // 2) uint8, w_scales
    (N, K // G), w_group_sums (N, K // G) int16), bias (N,) or None, residual (..., N) or None.
Epilogue, in this order: + bias, activation (a name in epilogue.ACTIVATIONS), + residual, cast to
out_dtype. `compute_dtype` is the dtype the unfused graph computed the linear in.

Implementations, chosen by device:
- GPU: the Triton kernel in `kernels/w4a8_gemm.py`, which uses the integer form of
  numerics.md (exact int32 group dots, fp32 everywhere else, one rounding to out_dtype at
  the end). Its tests call the launcher directly on CPU tensors under TRITON_INTERPRET=1.
- CPU: dequantize and `F.linear` in compute_dtype, which is the converted model's eager
  formula step for step, so a compiled CPU model matches the eager one.
In fp32 the two agree up to summation order; in bf16 the kernel skips the bf16 rounding of
the dequantized operands and of the intermediate results, which is the expected difference
of any integer kernel.

It is a `torch.library.triton_op`: torch.compile and torch.export see through it when it
is called in user code (while traced, the kernel is launched through `wrap_triton`). The lowering pass
inserts it after AOT autograd, where Inductor calls it as an extern kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from qatfx import reference
from qatfx.formats import format_named
from qatfx.formats.base import elements_per_group
from qatfx.lowering.epilogue import activation
from qatfx.spec import ROW

# The weight format the kernel reads: convert writes it for symmetric int4 specs.
WEIGHT_FORMAT = format_named("int4_packed")


def apply_activation(y: torch.Tensor, name: str) -> torch.Tensor:
    return activation(name).fn(y)


def _dequantized_linear(
    x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, group_size, bias, compute_dtype
) -> torch.Tensor:
    x = reference.dequantize(x_q, x_scale, x_zero, ROW, compute_dtype)
    w = WEIGHT_FORMAT.dequantize((w_packed, w_scales, w_group_sums), group_size, compute_dtype)
    return F.linear(x, w, bias)


def triton_w4a8_linear(
    x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, residual, group_size, activation, out_dtype
) -> torch.Tensor:
    """The op through the Triton kernel: (..., K) inputs flattened to the kernel's 2-D form.
    GPU tensors, or CPU tensors under TRITON_INTERPRET=1 (tests)."""
    from qatfx.lowering.kernels.w4a8_gemm import w4a8_gemm

    lead, k = x_q.shape[:-1], x_q.shape[-1]
    n = w_packed.shape[0]
    y = w4a8_gemm(
        x_q.reshape(-1, k),
        x_scale.reshape(-1, 1).float(),
        x_zero.reshape(-1, 1).float(),
        w_packed,
        w_scales,
        w_group_sums,
        bias,
        None if residual is None else residual.reshape(-1, n),
        group_size=elements_per_group(group_size, k),
        activation=activation,
        out_dtype=out_dtype,
    )
    return y.reshape(*lead, n)


@torch.library.triton_op("qatfx::w4a8_linear", mutates_args=())
def w4a8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    w_group_sums: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    group_size: int,
    activation: str,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if x_q.device.type != "cpu":
        return triton_w4a8_linear(
            x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, residual, group_size, activation, out_dtype
        )
    y = _dequantized_linear(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, group_size, bias, compute_dtype)
    y = apply_activation(y, activation)
    if residual is not None:
        y = y + residual
    return y.to(out_dtype)


@w4a8_linear.register_fake
def _(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, residual, group_size, activation, compute_dtype, out_dtype):
    # Shape only: replaces triton_op's default (running the launcher on fake tensors), so
    # Inductor's shape propagation never evaluates the launcher's M-dependent choices.
    return x_q.new_empty((*x_q.shape[:-1], w_packed.shape[0]), dtype=out_dtype)
