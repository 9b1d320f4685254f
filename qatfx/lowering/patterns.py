"""The rewrite table: converted q/dq + linear -> `qatfx::w4a8_linear`, and what follows.

Three stages, each a list of `Rewrite(name, pattern, replacement, ...)`:

FUSE_LINEAR    dequantize(activation) + dequantize_int4(weight, int4_packed format) + mm/addmm
               -> w4a8_linear
FUSE_EPILOGUE  relu / gelu / silu, residual add and output cast after a w4a8_linear
               -> the fused op's epilogue arguments
DECOMPOSE      what is left of qatfx's opaque ops -> their aten math (reference.py, and
               each weight format's own rule from qatfx/formats/), so Inductor fuses the
               per-token activation quantization into one kernel with the op before it
               (RMSNorm, residual add) and an unfused dequantize with its consumer.

Patterns are written in the normalized post-grad form: `F.linear` on a (..., K) input is
reshape -> mm (addmm with a bias) -> reshape, and the weight is transposed by permute.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch._inductor.pattern_matcher import Match

from qatfx import reference
from qatfx.formats import FORMATS, WeightFormat
from qatfx.formats.base import elements_per_group
from qatfx.graph.arguments import op_arguments
from qatfx.lowering.epilogue import ACTIVATIONS
from qatfx.lowering.kernels.w4a8_gemm import SUPPORTED_SCALE_DTYPES as KERNEL_SCALE_DTYPES
from qatfx.lowering.rewrite import Rewrite
from qatfx.lowering.w4a8_linear import WEIGHT_FORMAT, w4a8_linear
from qatfx.ops import dequantize, quantize_dynamic
from qatfx.spec import ROW, TORCHAO

aten = torch.ops.aten
fused_linear = torch.ops.qatfx.w4a8_linear.default
dequantize_weight = WEIGHT_FORMAT.dequantize_op  # the weight the kernel reads

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
    return WEIGHT_FORMAT.example_parts()  # (N, K) = (16, 64), G = 32


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
    weight = op_arguments(_node(match, dequantize_weight))
    return {"group_size": weight["group_size"], "dtype": weight["out_dtype"]}


def _fused_constants(match: Match) -> dict[str, Any]:
    fused = op_arguments(_node(match, fused_linear))
    return {name: fused[name] for name in ("group_size", "compute_dtype", "out_dtype")}


def kernel_group_size_ok(group_size: int, k: int) -> bool:
    """The Triton kernel loads half a group per tl.dot: a power of two, at least 32."""
    g = elements_per_group(group_size, k)
    return g >= 32 and g & (g - 1) == 0 and k % g == 0


def _check_linear(match: Match) -> Optional[str]:
    act = op_arguments(_node(match, dequantize))
    weight = op_arguments(_node(match, dequantize_weight))
    q = _val(act["q"])
    if act["group_size"] != ROW:
        return f"activation is quantized with group size {act['group_size']}, the kernel needs per-token (-1)"
    if q is None or q.dtype != torch.int8:
        return "activation is not int8"
    if act["out_dtype"] != weight["out_dtype"]:
        return f"activation dequantizes to {act['out_dtype']} but the weight to {weight['out_dtype']}"
    scales = _val(weight["scales"])
    if scales is not None and scales.dtype not in KERNEL_SCALE_DTYPES:
        return f"weight scales are {scales.dtype}; the kernel reads {KERNEL_SCALE_DTYPES}"
    k = 2 * _val(weight["packed"]).shape[-1]
    if not kernel_group_size_ok(weight["group_size"], k):
        return f"group size {weight['group_size']} with K={k}: the kernel needs a power of two >= 32 dividing K"
    return None


# ---- FUSE_LINEAR ---------------------------------------------------------------------------


def _dq_weight_t(w_packed, w_scales, w_group_sums):
    return aten.permute(dequantize_weight(w_packed, w_scales, w_group_sums, G, _F32), [1, 0])


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
    *(_with_activation(a.fn, a.name) for a in ACTIVATIONS.values() if a.name != "none"),
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
    node = op_arguments(_node(match, quantize_dynamic))
    return {name: node[name] for name in ("qmin", "qmax", "group_size", "symmetric", "eps", "scale_dtype")}


def _check_torchao_rule(match: Match) -> Optional[str]:
    """quantize_math is the torchao rule. A "ggml" node carries scale_rule as a keyword, so
    the pattern (none) should not match it; if it ever does, refuse: left opaque, the op
    runs its own reference math, exactly."""
    rule = op_arguments(_node(match, quantize_dynamic))["scale_rule"]
    return None if rule == TORCHAO else f"scale_rule {rule!r} is not the torchao rule this decomposition computes"


def _decompose_rule(fmt: WeightFormat) -> Rewrite:
    """A weight format's dequantize op -> its reference math (the format owns both)."""

    def constants(match: Match) -> dict[str, Any]:
        node = op_arguments(_node(match, fmt.dequantize_op))
        return {"group_size": node["group_size"], "out_dtype": node["out_dtype"]}

    return Rewrite(f"decompose_{fmt.name}", fmt.decompose_pattern, fmt.decompose_math, fmt.example_parts, constants)


DECOMPOSE = [
    Rewrite(
        "decompose_quantize_dynamic", quantize_activation, quantize_math, lambda: [torch.randn(M, K)], _quantize_constants,
        _check_torchao_rule,
    ),
    # int_codes' rule (qatfx::dequantize) also decomposes dequantized activations.
    *(_decompose_rule(fmt) for fmt in FORMATS),
]

__all__ = ["DECOMPOSE", "FUSE_EPILOGUE", "FUSE_LINEAR", "kernel_group_size_ok", "w4a8_linear"]
