"""`qatfx::w4a8_linear`: its CPU implementation is the converted model's eager formula, and
its Triton implementation (run here by the interpreter) agrees with it."""

import pytest
import torch
import torch.nn.functional as F

from qatfx import reference
from qatfx.lowering.epilogue import ACTIVATIONS
from qatfx.lowering.w4a8_linear import apply_activation, triton_w4a8_linear

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


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_path_agrees_with_the_cpu_implementation(activation):
    # The GPU path of the op (kernel launcher with the (..., K) -> 2-D flattening), run on
    # CPU tensors by the Triton interpreter (TRITON_INTERPRET=1, set in conftest).
    operands, x_fq, w_fq = quantized_operands(m_shape=(2, 3), k=128, n=40)
    bias, residual = torch.randn(40), torch.randn(2, 3, 40)
    out = triton_w4a8_linear(*operands, bias, residual, 32, activation, torch.float32)
    expected = w4a8_linear(*operands, bias, residual, 32, activation, torch.float32, torch.float32)
    # Same function, different fp32 summation order: |error| of either dot product is at
    # most (K + G) * eps * (|x_fq| @ |w_fq|^T + |bias|) (K-term sum, plus the kernel's group
    # rescaling). Factor 2: both sides err, and the activations' slope is at most 1.13
    # (gelu); 2 * eps * |expected| covers the final residual add's rounding.
    k, g = 128, 32
    bound = 2 * (k + g) * EPS * (x_fq.abs() @ w_fq.abs().T + bias.abs()) + 2 * EPS * expected.abs()
    assert out.shape == expected.shape == (2, 3, 40)
    excess = (out - expected).abs() - bound
    assert excess.max() <= 0, f"worst element exceeds the bound by {excess.max():.3e} at {divmod(int(excess.argmax()), 40)}"
