"""The rewrite table: converted q/dq + linear -> `qatfx::w4a8_linear`, and what follows.

Three stages, each a list of `Rewrite(name, pattern, replacement, ...)`:

FUSE_LINEAR    dequantize(activation) + dequantize_int4(weight) + mm/addmm -> w4a8_linear
FUSE_EPILOGUE  relu / gelu / silu, residual add and output cast after a w4a8_linear
               -> the fused op's epilogue arguments
DECOMPOSE      what is left of qatfx's opaque ops -> their aten math (reference.py), so
               Inductor fuses the per-token activation quantization into one kernel with
               the op before it (RMSNorm, residual add) and an unfused dequantize with its
               consumer.

Patterns are written in the normalized post-grad form: `F.linear` on a (..., K) input is
reshape -> mm (addmm with a bias) -> reshape, and the weight is transposed by permute.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch._inductor.pattern_matcher import Match

from qatfx import reference
from qatfx.lowering.rewrite import Rewrite
from qatfx.lowering.w4a8_linear import w4a8_linear
from qatfx.ops import dequantize, dequantize_int4, quantize_dynamic
from qatfx.spec import ROW

aten = torch.ops.aten
fused_linear = torch.ops.qatfx.w4a8_linear.default

# Tracing-only literals: ints, floats, dtypes and lists in a pattern match any value.
_F32 = torch.float32
_EPS = torch.finfo(torch.float32).eps
M, K, N, G = 6, 64, 16, 32


# ---- example inputs for tracing the patterns --------------------------------------------


def _activation_q():
    return [torch.ones(2, 3, K, dtype=torch.int8), torch.ones(2, 3, 1), torch.zeros(2, 3, 1)]


def _activation_q_2d():
    return [torch.ones(M, K, dtype=torch.int8), torch.ones(M, 1), torch.zeros(M, 1)]


def _packed_weight():
    return [torch.zeros(N, K // 2, dtype=torch.uint8), torch.ones(N, K // G), torch.zeros(N, K // G, dtype=torch.int16)]


def _linear_inputs():
    return _activation_q() + _packed_weight()


def _linear_inputs_2d():
    return _activation_q_2d() + _packed_weight()


def _fused_inputs():
    return _activation_q() + _packed_weight() + [torch.zeros(N)]


# ---- reading literals back from a match --------------------------------------------------


def _node(match: Match, target) -> torch.fx.Node:
    return next(n for n in match.nodes if n.target is target)


def _val(node: Any) -> Optional[torch.Tensor]:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _linear_constants(match: Match) -> dict[str, Any]:
    weight = _node(match, dequantize_int4)
    return {"group_size": weight.args[3], "dtype": weight.args[4]}


def _fused_constants(match: Match) -> dict[str, Any]:
    fused = _node(match, fused_linear)
    return {"group_size": fused.args[8], "compute_dtype": fused.args[10], "out_dtype": fused.args[11]}


def kernel_group_size_ok(group_size: int, k: int) -> bool:
    """The Triton kernel loads half a group per tl.dot: a power of two, at least 32."""
    g = k if group_size == ROW else group_size
    return g >= 32 and g & (g - 1) == 0 and k % g == 0


def _check_linear(match: Match) -> Optional[str]:
    act = _node(match, dequantize)
    weight = _node(match, dequantize_int4)
    q = _val(act.args[0])
    if act.args[3] != ROW:
        return f"activation is quantized with group size {act.args[3]}, the kernel needs per-token (-1)"
    if q is None or q.dtype != torch.int8:
        return "activation is not int8"
    if act.args[4] != weight.args[4]:
        return f"activation dequantizes to {act.args[4]} but the weight to {weight.args[4]}"
    k = 2 * _val(weight.args[0]).shape[-1]
    if not kernel_group_size_ok(weight.args[3], k):
        return f"group size {weight.args[3]} with K={k}: the kernel needs a power of two >= 32 dividing K"
    return None


# ---- FUSE_LINEAR ---------------------------------------------------------------------------


def _dq_weight_t(w_packed, w_scales, w_group_sums):
    return aten.permute(dequantize_int4(w_packed, w_scales, w_group_sums, G, _F32), [1, 0])


def linear_nd(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums):
    x = aten.reshape(dequantize(x_q, x_scale, x_zero, ROW, _F32), [M, K])
    y = aten.mm(x, _dq_weight_t(w_packed, w_scales, w_group_sums))
    return aten.reshape(y, [2, 3, N])


def linear_nd_bias(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias):
    x = aten.reshape(dequantize(x_q, x_scale, x_zero, ROW, _F32), [M, K])
    y = aten.addmm(bias, x, _dq_weight_t(w_packed, w_scales, w_group_sums))
    return aten.reshape(y, [2, 3, N])


def linear_2d(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums):
    return aten.mm(dequantize(x_q, x_scale, x_zero, ROW, _F32), _dq_weight_t(w_packed, w_scales, w_group_sums))


def linear_2d_bias(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias):
    x = dequantize(x_q, x_scale, x_zero, ROW, _F32)
    return aten.addmm(bias, x, _dq_weight_t(w_packed, w_scales, w_group_sums))


def to_fused_linear(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias=None, *, group_size, dtype):
    return fused_linear(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, None, group_size, "none", dtype, dtype)


def _bias_inputs(inputs):
    return lambda: inputs() + [torch.zeros(N)]


FUSE_LINEAR = [
    Rewrite("w4a8_linear", linear_nd, to_fused_linear, _linear_inputs, _linear_constants, _check_linear),
    Rewrite("w4a8_linear_bias", linear_nd_bias, to_fused_linear, _bias_inputs(_linear_inputs), _linear_constants, _check_linear),
    Rewrite("w4a8_linear_2d", linear_2d, to_fused_linear, _linear_inputs_2d, _linear_constants, _check_linear),
    Rewrite("w4a8_linear_2d_bias", linear_2d_bias, to_fused_linear, _bias_inputs(_linear_inputs_2d), _linear_constants, _check_linear),
]


# ---- FUSE_EPILOGUE -------------------------------------------------------------------------


def _plain(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias):
    """A fused linear with nothing folded into its epilogue yet."""
    return fused_linear(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, None, G, "none", _F32, _F32)


def _with_activation(fn, activation):
    def pattern(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias):
        return fn(_plain(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias))

    def replacement(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, *, group_size, compute_dtype, out_dtype):
        return fused_linear(
            x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, None, group_size, activation, compute_dtype, out_dtype
        )

    return Rewrite(f"epilogue_{activation}", pattern, replacement, _fused_inputs, _fused_constants)


def residual_after(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, residual):
    return aten.add(_plain(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias), residual)


def residual_before(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, residual):
    return aten.add(residual, _plain(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias))


def with_residual(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, residual, *, group_size, compute_dtype, out_dtype):
    return fused_linear(
        x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, residual, group_size, "none", compute_dtype, out_dtype
    )


def _check_residual(match: Match) -> Optional[str]:
    fused, residual = _val(_node(match, fused_linear)), _val(match.kwargs["residual"])
    if residual is None or residual.shape != fused.shape or residual.dtype != fused.dtype:
        return "the added tensor is not a same-shape, same-dtype residual (broadcast or promotion)"
    return None


def output_cast(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias):
    return _plain(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias).to(torch.bfloat16)


def with_out_dtype(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, *, group_size, compute_dtype, out_dtype, cast):
    return fused_linear(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, None, group_size, "none", compute_dtype, cast)


def _cast_constants(match: Match) -> dict[str, Any]:
    return {**_fused_constants(match), "cast": match.output_node().meta["val"].dtype}


def _residual_inputs():
    return _fused_inputs() + [torch.zeros(2, 3, N)]


FUSE_EPILOGUE = [
    _with_activation(torch.relu, "relu"),
    _with_activation(F.gelu, "gelu"),
    _with_activation(lambda y: F.gelu(y, approximate="tanh"), "gelu_tanh"),
    _with_activation(F.silu, "silu"),
    Rewrite("epilogue_residual", residual_after, with_residual, _residual_inputs, _fused_constants, _check_residual),
    Rewrite("epilogue_residual_first", residual_before, with_residual, _residual_inputs, _fused_constants, _check_residual),
    Rewrite("epilogue_cast", output_cast, with_out_dtype, _fused_inputs, _cast_constants),
]


# ---- DECOMPOSE -----------------------------------------------------------------------------


def quantize_activation(x):
    return quantize_dynamic(x, -128, 127, ROW, False, _EPS, _F32)


def quantize_math(x, *, qmin, qmax, group_size, symmetric, eps, scale_dtype):
    scale, zero = reference.choose_qparams(x, qmin, qmax, group_size, symmetric, eps, scale_dtype)
    q = reference.quantize(x, scale, zero, qmin, qmax, group_size)
    return q, scale, torch.zeros_like(scale) if zero is None else zero


def _quantize_constants(match: Match) -> dict[str, Any]:
    _, qmin, qmax, group_size, symmetric, eps, scale_dtype = _node(match, quantize_dynamic).args
    return dict(qmin=qmin, qmax=qmax, group_size=group_size, symmetric=symmetric, eps=eps, scale_dtype=scale_dtype)


def dequantize_activation(q, scale, zero):
    return dequantize(q, scale, zero, ROW, _F32)


def dequantize_math(q, scale, zero, *, group_size, out_dtype):
    return reference.dequantize(q, scale, zero, group_size, out_dtype)


def _dequantize_constants(match: Match) -> dict[str, Any]:
    node = _node(match, dequantize)
    return {"group_size": node.args[3], "out_dtype": node.args[4]}


def dequantize_weight(w_packed, w_scales, w_group_sums):
    return dequantize_int4(w_packed, w_scales, w_group_sums, G, _F32)


def dequantize_int4_math(w_packed, w_scales, w_group_sums, *, group_size, out_dtype):
    tile = 2 * w_packed.shape[-1] if group_size == ROW else group_size
    return reference.dequantize(reference.unpack_int4(w_packed, tile), w_scales, None, group_size, out_dtype)


def _dequantize_int4_constants(match: Match) -> dict[str, Any]:
    node = _node(match, dequantize_int4)
    return {"group_size": node.args[3], "out_dtype": node.args[4]}


DECOMPOSE = [
    Rewrite("decompose_quantize_dynamic", quantize_activation, quantize_math, lambda: [torch.randn(M, K)], _quantize_constants),
    Rewrite("decompose_dequantize", dequantize_activation, dequantize_math, _activation_q_2d, _dequantize_constants),
    Rewrite("decompose_dequantize_int4", dequantize_weight, dequantize_int4_math, _packed_weight, _dequantize_int4_constants),
]

__all__ = ["DECOMPOSE", "FUSE_EPILOGUE", "FUSE_LINEAR", "kernel_group_size_ok", "w4a8_linear"]
