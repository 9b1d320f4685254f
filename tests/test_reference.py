"""qatfx.reference / qatfx.ops numerics against torchao 0.18, bit for bit (docs/numerics.md)."""

import dataclasses

import numpy as np
import pytest
import torch

from qatfx import ops, reference
from qatfx.spec import int4_per_group_weight, int8_per_token_activation, q4_0_weight, q8_0_activation
from tests import llamacpp_ref, torchao_ref

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



# ---- the "ggml" scale rule: llama.cpp's Q8_0 activations (tests/llamacpp_ref.py) ---------


def tie_block(absmax, g):
    """31 values whose products with m = fp32(127 / absmax) are exactly k + 0.5 in fp32,
    then absmax itself: every code but the last is a rounding tie."""
    amax = torch.tensor(absmax, dtype=torch.float32)
    m = torch.full_like(amax, 127.0) / amax
    halves = torch.randint(-126, 126, (256,), generator=g).float() + 0.5
    x = halves / m
    for _ in range(4):  # step x by ulps until x * m lands on the half-integer
        x = torch.where(x * m < halves, torch.nextafter(x, torch.full_like(x, float("inf"))), x)
        x = torch.where(x * m > halves, torch.nextafter(x, torch.full_like(x, -float("inf"))), x)
    ties = x[(x * m == halves) & (x.abs() < amax)][:31]
    assert ties.numel() == 31, "could not build 31 exact ties"
    return torch.cat([ties, amax.reshape(1)])


def q8_0_activations(seed, rows=6, k=256):
    """Random blocks of 32 at magnitudes 1e-2..1e2, plus the blocks that matter for Q8_0:
    all zero, one nonzero value, an fp16-subnormal scale (absmax 1e-3), a scale fp16
    rounds to 0 (absmax 1e-6), and blocks of exact ties of x * (127 / absmax)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-2, 2, rows).unsqueeze(-1)
    blocks = x.view(-1, 32)
    blocks[0] = 0.0
    blocks[1] = 0.0
    blocks[1, 5] = -3.25
    blocks[2] *= 1e-3 / blocks[2].abs().max()
    blocks[3] *= 1e-6 / blocks[3].abs().max()
    blocks[4] = tie_block(127.0, g)  # multiplier exactly 1: the ties are x = k + 0.5
    blocks[5] = tie_block(0.7310, g)  # multipliers that are not powers of two
    blocks[6] = -tie_block(53.9, g)
    return x


def ggml_q8_0(x):
    """(codes, fp16 scales, fake-quant) of qatfx's Q8_0 spec, codes as (n_blocks, 32)."""
    spec = q8_0_activation()
    q, scale, zero = ops.quantize_dynamic(x, **spec.op_kwargs())
    assert torch.equal(zero, torch.zeros_like(scale))
    return q.reshape(-1, 32), scale.reshape(-1), ops.fake_quantize(x, **spec.op_kwargs())


@pytest.mark.parametrize("seed", range(5))
def test_ggml_rule_is_llama_cpp_q8_0_bit_for_bit_in_float32(seed):
    x = q8_0_activations(seed)
    codes, scales, fq = ggml_q8_0(x)
    ref_codes, ref_scales = llamacpp_ref.quantize_row_q8_0_avx(x.numpy())
    assert scales.dtype == torch.float16 and codes.dtype == torch.int8
    assert np.array_equal(codes.numpy(), ref_codes)
    assert np.array_equal(scales.numpy().view(np.uint16), ref_scales.view(np.uint16))  # bits, zeros included
    expected = llamacpp_ref.dequantize_row_q8_0(ref_codes, ref_scales).reshape(x.shape)
    torch.testing.assert_close(fq, torch.from_numpy(expected), atol=0, rtol=0)
    # the special blocks did what they are for
    assert codes.abs().max() <= 127 and (scales[0] == 0) and (codes[0] == 0).all()
    assert scales[3] == 0 and codes[3].abs().max() == 127  # llama.cpp keeps codes, zeroes the scale
    ties = x.view(-1, 32)[4:7, :31] * (127.0 / x.view(-1, 32)[4:7].abs().amax(-1, keepdim=True))
    assert (ties.frac().abs() == 0.5).float().mean() > 0.9
    assert (codes[4:7, :31] % 2 == 0).all(), "ties round to even"


def test_ggml_rule_in_bfloat16_is_the_rule_in_bfloat16_arithmetic():
    # A bf16 tensor runs the rule in bf16 (multiplier and product rounded to bf16), as the
    # torchao rule runs in the input dtype. Codes match the bf16 emulation exactly, but not
    # llama.cpp, which quantizes the (float32-widened) values in float32.
    x = q8_0_activations(0).to(torch.bfloat16)
    codes, scales, fq = ggml_q8_0(x)
    x32 = x.float().numpy()
    ref_codes, ref_scales = llamacpp_ref.quantize_row_q8_0_bf16(x32)
    assert np.array_equal(codes.numpy(), ref_codes)
    assert np.array_equal(scales.numpy().view(np.uint16), ref_scales.view(np.uint16))
    expected = llamacpp_ref.bf16_round(llamacpp_ref.dequantize_row_q8_0(ref_codes, ref_scales)).reshape(x.shape)
    assert fq.dtype == torch.bfloat16
    torch.testing.assert_close(fq.float(), torch.from_numpy(expected), atol=0, rtol=0)
    fp32_codes, _ = llamacpp_ref.quantize_row_q8_0_avx(x32)
    assert (fp32_codes != ref_codes).any(), "bf16 arithmetic moves some codes away from llama.cpp's"


def test_ggml_rule_differs_from_torchao_rule_with_fp16_scales():
    # The same grid with the torchao rule rounds x * (1 / fp16(d)), reciprocal in fp16: not
    # llama.cpp's codes on ordinary data, hence the separate rule.
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    torchao_rule = dataclasses.replace(q8_0_activation(), scale_rule="torchao")
    q_ggml, s_ggml, _ = ops.quantize_dynamic(x, **q8_0_activation().op_kwargs())
    q_torchao, s_torchao, _ = ops.quantize_dynamic(x, **torchao_rule.op_kwargs())
    ref_codes, _ = llamacpp_ref.quantize_row_q8_0_avx(x.numpy())
    assert torch.equal(s_ggml, s_torchao)  # the same stored scales ...
    assert np.array_equal(q_ggml.reshape(-1, 32).numpy(), ref_codes)
    moved = (q_torchao != q_ggml).float().mean().item()
    assert moved > 0.002, f"only {moved:.2%} of codes differ"  # ... but other codes (measured: ~1%)


def test_ggml_rule_keeps_tiny_blocks_finite():
    # absmax 1e-40 (subnormal): 127 / absmax overflows to inf in float32 and llama.cpp's
    # codes are undefined there; qatfx caps the multiplier, so the codes are finite and the
    # block dequantizes to 0, as in llama.cpp (fp16 scale 0).
    x = torch.zeros(1, 32)
    x[0, :3] = torch.tensor([1e-40, -5e-41, 0.0])
    codes, scales, fq = ggml_q8_0(x)
    assert scales.item() == 0 and codes.abs().max() <= 127
    assert torch.equal(fq, torch.zeros_like(x))


def test_ggml_rule_gradient_is_straight_through():
    # Same construction as the torchao rule: identity round, clamp mask (all ones here),
    # no gradient to the qparams; dx = (g * s) * m, with s * m = 1 up to fp16's rounding of s.
    spec = q8_0_activation()
    x = q8_0_activations(1).requires_grad_(True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ops.fake_quantize(x, **spec.op_kwargs()).backward(g)
    scale, multiplier = reference.ggml_qparams(x.detach(), spec.qmin, spec.qmax, 32, spec.eps, spec.scale_dtype)
    expected = (g.view(*x.shape[:-1], -1, 32) * scale.unsqueeze(-1)) * multiplier.unsqueeze(-1)
    torch.testing.assert_close(x.grad, expected.view(x.shape), atol=0, rtol=0)


def test_ggml_quantize_dequantize_equals_fake_quantize():
    for dtype in DTYPES:
        x = q8_0_activations(2).to(dtype)
        spec = q8_0_activation()
        q, scale, zero = ops.quantize_dynamic(x, **spec.op_kwargs())
        dq = ops.dequantize(q, scale, zero, 32, dtype)
        torch.testing.assert_close(dq, ops.fake_quantize(x, **spec.op_kwargs()), atol=0, rtol=0)


def test_scale_rule_is_checked_by_the_ops():
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="symmetric=True"):
        ops.fake_quantize(x, qmin=-128, qmax=127, group_size=32, symmetric=False, eps=None, scale_dtype=None, scale_rule="ggml")
    with pytest.raises(ValueError, match="unknown scale_rule"):
        ops.quantize_dynamic(x, -127, 127, 32, True, None, None, scale_rule="gguf")


def test_q4_0_weight_spec_keeps_zero_and_tiny_groups_finite():
    # torchao's rule rounds with 1 / s in fp16, inf for s < 1/65520: with the default eps an
    # all-zero group is NaN. q4_0_weight's eps avoids that and moves no ordinary group.
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    w[0, :32] = 0.0
    w[1, :32] *= 1e-4
    plain = ops.fake_quantize(w, **int4_per_group_weight(32, torch.float16).op_kwargs())
    q4_0 = ops.fake_quantize(w, **q4_0_weight().op_kwargs())
    assert plain[0, :32].isnan().all()
    assert torch.isfinite(q4_0).all() and (q4_0[0, :32] == 0).all()
    torch.testing.assert_close(q4_0[:, 32:], plain[:, 32:], atol=0, rtol=0)
    torch.testing.assert_close(q4_0[2:], plain[2:], atol=0, rtol=0)


# ---- learned qparams (QuantSpec.learnable) ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_learned_fake_quant_at_the_rules_qparams_is_the_dynamic_fake_quant(dtype, symmetric):
    """Same ops on the same (cast) qparams: exact."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    qmin, qmax = (-8, 7) if symmetric else (0, 15)
    scale, zero = reference.choose_qparams(x, qmin, qmax, 32, symmetric, None, torch.float32)
    learned = reference.fake_quantize_learned(x, scale.to(dtype), None if zero is None else zero.to(dtype), qmin, qmax, 32, None, torch.float32)
    assert torch.equal(learned, reference.fake_quantize(x, qmin, qmax, 32, symmetric, None, torch.float32))


def _grid_points(n: int, group: int, seed: int, inside: float, outside: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (x, s) with x / s at least 0.1 from every rounding tie and clamp boundary:
    most codes strictly inside [qmin + 1, qmax - 1], every 8th one well outside the grid, so
    the surrogate below is smooth around s."""
    g = torch.Generator().manual_seed(seed)
    s = (0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64)) * 0.01
    u = torch.randint(-6, 6, (n, group), generator=g).double() + 0.1 + 0.3 * torch.rand(n, group, generator=g, dtype=torch.float64)
    u = u.clamp(-inside, inside)
    u[:, ::8] = outside * torch.sign(torch.randn(n, group // 8, generator=g, dtype=torch.float64))
    return u * s, s


def test_learned_scale_gradient_is_lsq_by_finite_differences_of_the_surrogate():
    """The straight-through estimator differentiates fq as if round(u) were u + c, with c =
    round(u0) - u0 held fixed: fq(s) = (clamp(x / s + c, qmin, qmax)) * s, a smooth function
    of s near s0 when no x / s sits on a clamp boundary. Its central difference (float64,
    h = 1e-7 s: truncation ~h^2 |f'''| and roundoff ~1e-16 |f| / h, both < 1e-8 relative) must
    equal autograd's LSQ gradient, round(u) - u inside the grid and qmax / qmin at a clamped code."""
    qmin, qmax, group = -8, 7, 32
    x, s0 = _grid_points(6, group, seed=1, inside=6.4, outside=9.3)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    scale = s0.clone().requires_grad_(True)
    (weights * reference.fake_quantize_learned(x, scale, None, qmin, qmax, group, None, None)).sum().backward()

    c = torch.round(x * (1.0 / s0)) - x * (1.0 / s0)

    def surrogate(s):  # per row: one scale per row (group = K)
        return (weights * torch.clamp(x * (1.0 / s) + c, qmin, qmax) * s).sum(-1, keepdim=True)

    h = 1e-7 * s0
    numeric = (surrogate(s0 + h) - surrogate(s0 - h)) / (2 * h)
    torch.testing.assert_close(scale.grad, numeric, rtol=1e-6, atol=0)
    # and the closed form the docstring states
    u = x / s0
    q = torch.clamp(torch.round(u), qmin, qmax)
    lsq = torch.where(q == torch.round(u), torch.round(u) - u, q)
    torch.testing.assert_close(scale.grad, (weights * lsq).sum(-1, keepdim=True), rtol=1e-12, atol=1e-15)


def test_learned_zero_point_gradient_is_lsq_plus_by_finite_differences():
    """Asymmetric: fq = (clamp(x / s + c + z, qmin, qmax) - z) * s. d/dz is 0 inside the grid
    and -s at a clamped code; d/ds as for the symmetric case. Central differences in both
    (the zero point's straight-through round makes z + cz the surrogate's z)."""
    qmin, qmax, group = 0, 15, 32
    x, s0 = _grid_points(6, group, seed=3, inside=6.4, outside=9.3)
    z0 = torch.full_like(s0, 7.0)  # codes u + 7 in [0.6, 13.4] inside, 16.3 / -2.3 outside
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    scale, zero = s0.clone().requires_grad_(True), (z0 + 0.2).requires_grad_(True)  # rounds to 7
    (weights * reference.fake_quantize_learned(x, scale, zero, qmin, qmax, group, None, None)).sum().backward()

    c = torch.round(x * (1.0 / s0)) - x * (1.0 / s0)

    def surrogate(s, z):
        return (weights * (torch.clamp(x * (1.0 / s) + c + z, qmin, qmax) - z) * s).sum(-1, keepdim=True)

    hs, hz = 1e-7 * s0, 1e-7
    d_s = (surrogate(s0 + hs, z0) - surrogate(s0 - hs, z0)) / (2 * hs)
    d_z = (surrogate(s0, z0 + hz) - surrogate(s0, z0 - hz)) / (2 * hz)
    torch.testing.assert_close(scale.grad, d_s, rtol=1e-6, atol=0)
    torch.testing.assert_close(zero.grad, d_z, rtol=1e-6, atol=1e-12)
    assert (zero.grad != 0).all()  # every row has clamped codes


def test_learned_fp16_scales_keep_a_finite_gradient_and_reciprocal():
    """fp16 scales (Q4_0 / Q8_0): a Q8_0-sized scale (~1e-4) gives a finite gradient (the
    reciprocal is differentiated in float32), and a scale trained down to 0 or below is
    floored at 2^-15, whose fp16 reciprocal is finite, so no weight becomes NaN."""
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(5)) * 1e-2
    scale = torch.full((4, 1), 1e-4, requires_grad=True)
    out = reference.fake_quantize_learned(x, scale, None, -127, 127, 32, 2.0**-25, torch.float16)
    out.sum().backward()
    assert torch.isfinite(scale.grad).all() and (scale.grad != 0).any()
    collapsed = reference.fake_quantize_learned(x, torch.tensor([[0.0], [-1.0], [1e-9], [1e-4]]), None, -127, 127, 32, 2.0**-25, torch.float16)
    assert torch.isfinite(collapsed).all()
