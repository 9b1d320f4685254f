"""`qatfx::w4a8_linear`: its CPU implementation is the converted model's eager formula, and
its Triton implementation (run here by the interpreter) agrees with it."""

import pytest
import torch
import torch.nn.functional as F

from qatfx import reference
from qatfx.lowering.w4a8_linear import ACTIVATIONS, apply_activation

EPS = torch.finfo(torch.float32).eps
w4a8_linear = torch.ops.qatfx.w4a8_linear.default


def quantized_operands(m_shape=(2, 5), k=128, n=48, group_size=32, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*m_shape, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x_scale, x_zero = reference.choose_qparams(x, -128, 127, -1, False, EPS, torch.float32)
    x_q = reference.quantize(x, x_scale, x_zero, -128, 127, -1)
    w_scale, _ = reference.choose_qparams(w, -8, 7, group_size, True, EPS, torch.float32)
    w_q = reference.quantize(w, w_scale, None, -8, 7, group_size)
    sums = reference.int4_group_sums(w_q, group_size)
    packed = reference.pack_int4(w_q, group_size)
    x_fq = reference.dequantize(x_q, x_scale, x_zero, -1, dtype)
    w_fq = reference.dequantize(w_q, w_scale, None, group_size, dtype)
    return (x_q, x_scale, x_zero, packed, w_scale, sums), x_fq, w_fq


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpu_implementation_is_the_eager_converted_formula(dtype, activation):
    operands, x_fq, w_fq = quantized_operands(dtype=dtype)
    bias = torch.randn(48).to(dtype)
    residual = torch.randn(2, 5, 48).to(dtype)
    out = w4a8_linear(*operands, bias, residual, 32, activation, dtype, dtype)
    expected = apply_activation(F.linear(x_fq, w_fq, bias), activation) + residual
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_output_cast_is_applied_last():
    operands, x_fq, w_fq = quantized_operands()
    out = w4a8_linear(*operands, None, None, 32, "none", torch.float32, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x_fq, w_fq).to(torch.bfloat16), atol=0, rtol=0)


def test_unknown_activation_is_refused():
    operands, _, _ = quantized_operands()
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        w4a8_linear(*operands, None, None, 32, "tanh", torch.float32, torch.float32)
