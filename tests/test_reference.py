"""qatfx.reference / qatfx.ops numerics against torchao 0.18, bit for bit (docs/numerics.md)."""

import pytest
import torch

from qatfx import ops, reference
from qatfx.spec import int4_per_group_weight, int8_per_token_activation
from tests import torchao_ref

DTYPES = [torch.float32, torch.bfloat16]


def awkward_activations(dtype, seed):
    """Random rows plus the rows that break naive formulas: all zero, constant, all
    negative, huge and tiny magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 10, 64, generator=g) * 3
    x[0, 0] = 0.0
    x[0, 1] = 5.0
    x[0, 2] = -2.5
    x[0, 3] = -x[0, 3].abs()
    x[1] *= 1e6
    x[2] *= 1e-6
    x[2, 0] *= 1e-30
    return x.to(dtype)


def awkward_weights(dtype, seed, n=24, k=128):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0] = 0.0
    w[1, :32] = 0.3
    w[2] *= 1e4
    w[3] *= 1e-8
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(5))
def test_activation_fake_quant_matches_torchao(dtype, seed):
    x = awkward_activations(dtype, seed)
    ours = ops.fake_quantize(x, **int8_per_token_activation().op_kwargs())
    theirs = torchao_ref.activation_fake_quantizer()(x)
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("seed", range(3))
def test_weight_fake_quant_matches_torchao(dtype, group_size, seed):
    w = awkward_weights(dtype, seed)
    ours = ops.fake_quantize(w, **int4_per_group_weight(group_size).op_kwargs())
    theirs = torchao_ref.weight_fake_quantizer(group_size)(w)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_bf16_weight_scales_match_torchao():
    w = awkward_weights(torch.bfloat16, 0)
    ours = ops.fake_quantize(w, **int4_per_group_weight(32, torch.bfloat16).op_kwargs())
    theirs = torchao_ref.weight_fake_quantizer(32, torch.bfloat16)(w)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_torchao(dtype):
    # Same aten chain as torchao (reciprocal multiply, STE round, clamp, dequant), so the
    # straight-through gradients, clamp mask included, are bit-identical too.
    x = awkward_activations(dtype, 1).requires_grad_(True)
    w = awkward_weights(dtype, 1).requires_grad_(True)
    x_ref, w_ref = (t.detach().clone().requires_grad_(True) for t in (x, w))
    grad_x = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    grad_w = torch.randn(w.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    ops.fake_quantize(x, **int8_per_token_activation().op_kwargs()).backward(grad_x)
    ops.fake_quantize(w, **int4_per_group_weight(32).op_kwargs()).backward(grad_w)
    torchao_ref.activation_fake_quantizer()(x_ref).backward(grad_x)
    torchao_ref.weight_fake_quantizer(32)(w_ref).backward(grad_w)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=0, rtol=0)
    torch.testing.assert_close(w.grad, w_ref.grad, atol=0, rtol=0)


def test_weight_gradient_is_straight_through_with_clamp_mask():
    # One group: absmax 1.5 -> scale 0.2; +1.5 rounds to +8 and is clipped (gradient 0),
    # -1.5 lands on -8 (kept). Everything else passes the gradient (up to s * (1/s) rounding).
    w = torch.linspace(-1.5, 1.5, 32).reshape(1, 32).requires_grad_(True)
    ops.fake_quantize(w, **int4_per_group_weight(32).op_kwargs()).sum().backward()
    expected = torch.ones_like(w)
    expected[0, -1] = 0.0
    torch.testing.assert_close(w.grad, expected, atol=2.5e-7, rtol=0)  # |s * (1/s) - 1| <= 2 ulp


def test_all_zero_row_gets_eps_scale_and_min_zero_point():
    x = torch.zeros(2, 16)
    scale, zero = reference.choose_qparams(x, -128, 127, -1, False, torch.finfo(torch.float32).eps, torch.float32)
    assert torch.equal(scale, torch.full((2, 1), torch.finfo(torch.float32).eps))
    assert torch.equal(zero, torch.full((2, 1), -128.0))


def test_quantize_dequantize_equals_fake_quantize():
    x = awkward_activations(torch.float32, 3)
    spec = int8_per_token_activation()
    q, scale, zero = ops.quantize_dynamic(x, spec.qmin, spec.qmax, spec.group_size, spec.symmetric, spec.eps, spec.scale_dtype)
    assert q.dtype == torch.int8 and int(q.min()) >= -128 and int(q.max()) <= 127
    torch.testing.assert_close(ops.dequantize(q, scale, zero, -1, torch.float32), ops.fake_quantize(x, **spec.op_kwargs()), atol=0, rtol=0)


@pytest.mark.parametrize("tile", [2, 32, 64, 128])
def test_pack_unpack_int4_round_trip(tile):
    q = torch.randint(-8, 8, (5, 256), dtype=torch.int8, generator=torch.Generator().manual_seed(tile))
    packed = reference.pack_int4(q, tile)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 128)
    assert torch.equal(reference.unpack_int4(packed, tile), q)


def test_dequantize_int4_op_matches_reference():
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(0))
    scale, _ = reference.choose_qparams(w, -8, 7, 32, True, torch.finfo(torch.float32).eps, torch.float32)
    q = reference.quantize(w, scale, None, -8, 7, 32)
    sums = reference.int4_group_sums(q, 32)
    out = torch.ops.qatfx.dequantize_int4(reference.pack_int4(q, 32), scale, sums, 32, torch.float32)
    assert torch.equal(out, reference.dequantize(q, scale, None, 32, torch.float32))


def test_pack_layout_low_nibble_first_half_of_tile():
    q = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)
    packed = reference.pack_int4(q, 16)
    # byte j = q[j] (low nibble) | q[j + 8] (high nibble), two's complement
    assert packed[0, 0] == ((-8 & 0xF) | ((0 & 0xF) << 4))
    assert packed[0, 7] == ((-1 & 0xF) | ((7 & 0xF) << 4))


def test_pack_rejects_out_of_range_and_bad_tile():
    with pytest.raises(ValueError, match="outside"):
        reference.pack_int4(torch.full((1, 4), 8, dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="tile"):
        reference.pack_int4(torch.zeros(1, 6, dtype=torch.int8), 4)
