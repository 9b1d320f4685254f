"""Hypothesis properties of the primitives in qatfx/reference.py against the numerics
contract (docs/numerics.md). tests/test_reference.py pins the same functions to torchao bit
for bit on chosen inputs; here hypothesis searches shapes and values, extremes included."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qatfx import reference
from qatfx.spec import ROW, TENSOR

FP32 = torch.finfo(torch.float32)
EPS = FP32.eps  # the 8da4w activation eps (legacy torchao)
FEW = settings(max_examples=60, deadline=None)

# finite fp32 values, from subnormal to the largest (hypothesis also tries 0, -0, extremes)
any_float = st.floats(width=32, allow_nan=False, allow_infinity=False)
# a range whose max - min cannot overflow fp32 (see test_asymmetric_scale_overflows_beyond_half_the_range)
half_range_float = st.floats(width=32, min_value=-FP32.max / 2, max_value=FP32.max / 2)
moderate_float = st.floats(width=32, min_value=-1e4, max_value=1e4)


@st.composite
def grouped(draw, elements=any_float, max_rows=4):
    """(rows, K) fp32 with K a multiple of a group size G in {2, 4, 8, 16, 32}; returns (x, G)."""
    g = draw(st.sampled_from([2, 4, 8, 16, 32]))
    k = g * draw(st.integers(1, 3))
    rows = draw(st.integers(1, max_rows))
    x = draw(arrays(np.float32, (rows, k), elements=elements))
    return torch.from_numpy(x), g


def signed_grid(bits):
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


# ---- bounds ---------------------------------------------------------------------------------


@FEW
@given(data=grouped(), bits=st.integers(2, 8), symmetric=st.booleans(), granularity=st.sampled_from(["group", "row", "tensor"]))
def test_quantized_values_stay_in_the_integer_grid(data, bits, symmetric, granularity):
    x, g = data
    group_size = {"group": g, "row": ROW, "tensor": TENSOR}[granularity]
    if symmetric:
        qmin, qmax = signed_grid(bits)
    else:  # the asymmetric grids qatfx uses: signed (int8 activations) and unsigned
        qmin, qmax = signed_grid(bits) if bits % 2 else (0, 2**bits - 1)
    scale, zero = reference.choose_qparams(x, qmin, qmax, group_size, symmetric, None, torch.float32)
    assume(torch.isfinite(scale).all())  # asymmetric ranges past fp32 max overflow: tested below
    q = reference.quantize(x, scale, zero, qmin, qmax, group_size)
    assert q.dtype == reference.storage_dtype(qmin)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    if zero is not None:  # an integer inside the grid
        assert torch.equal(zero, zero.round()) and zero.min() >= qmin and zero.max() <= qmax


# ---- scales ---------------------------------------------------------------------------------


@FEW
@given(data=grouped(elements=any_float))
def test_symmetric_int4_scales_positive_and_finite_for_every_finite_weight(data):
    """absmax / 7.5 cannot overflow; the clamp keeps all-zero and tiny groups at
    smallest_normal instead of 0 (a zero scale would make 1/s inf and the group NaN)."""
    w, g = data
    scale, _ = reference.choose_qparams(w, -8, 7, g, True, None, torch.float32)
    assert torch.isfinite(scale).all() and (scale >= FP32.smallest_normal).all()


@FEW
@given(data=grouped(elements=half_range_float), zero_rows=st.booleans())
def test_asymmetric_int8_scales_positive_and_finite(data, zero_rows):
    x, _ = data
    if zero_rows:
        x[0] = 0.0
    scale, zero = reference.choose_qparams(x, -128, 127, ROW, False, EPS, torch.float32)
    assert torch.isfinite(scale).all() and (scale >= EPS).all()
    if zero_rows:  # docs/numerics.md: an all-zero row gets s = eps, z = -128
        assert scale[0].item() == EPS and zero[0].item() == -128


def test_asymmetric_scale_overflows_beyond_half_the_range():
    """max - min is computed in the input dtype (torchao's formula): a row spanning more
    than finfo.max overflows to an inf scale, and that row fake-quantizes to NaN. What is
    true is finiteness for |x| <= finfo.max / 2, asserted above; fp16 rows reach it at
    |x| ~ 32752, so fp16 activations that large need bf16 / fp32."""
    x = torch.tensor([[2e38, -2e38, 1.0, 0.0]])
    scale, _ = reference.choose_qparams(x, -128, 127, ROW, False, EPS, torch.float32)
    assert scale.item() == float("inf")
    assert torch.isnan(reference.fake_quantize(x, -128, 127, ROW, False, EPS, torch.float32)).all()
    half = torch.tensor([[40000.0, -40000.0]], dtype=torch.float16)
    assert torch.isinf(reference.choose_qparams(half, -128, 127, ROW, False, None, None)[0]).all()


# ---- fake-quant: idempotence, error, prepare == convert -------------------------------------


@FEW
@given(data=grouped(elements=moderate_float), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_weight_fake_quant_is_a_projection_for_frozen_scales(data, dtype):
    """With the group scales fixed, fake-quant is idempotent: the codes of fq(w) are the
    codes of w, so fq(fq(w)) == fq(w) exactly. (fq(w) = q * s rounded to the weight dtype;
    fq(w) * (1 / s) is q within |q| * 2^-8 <= 1/32 in bf16, far from a rounding tie.)"""
    w, g = data
    w = w.to(dtype)
    scale, _ = reference.choose_qparams(w, -8, 7, g, True, None, torch.float32)
    q = reference.quantize(w, scale, None, -8, 7, g)
    fq = reference.dequantize(q, scale, None, g, dtype)
    assert torch.equal(reference.quantize(fq, scale, None, -8, 7, g), q)
    assert torch.equal(reference.dequantize(reference.quantize(fq, scale, None, -8, 7, g), scale, None, g, dtype), fq)


@FEW
@given(data=grouped(elements=moderate_float))
def test_dynamic_weight_fake_quant_is_not_idempotent_the_scale_moves(data):
    """fq(fq(w)) != fq(w) in general, by design of torchao's symmetric rule s = absmax / 7.5:
    the group extreme lands on +-7.5, which becomes code 7 (positive, clipped) or -8
    (negative, ties-to-even), so fq(w) has absmax 7s or 8s, never 7.5s. The second pass
    derives s2 = max|q| * s / 7.5, i.e. s * 7/7.5 or s * 8/7.5, and re-rounds: repeated
    fake-quant drifts. Exactly idempotent only for groups whose scale is clamped at
    smallest_normal (all zero or tiny: |codes| <= 7, so s2 is clamped to the same value)."""
    w, g = data
    s1, _ = reference.choose_qparams(w, -8, 7, g, True, None, torch.float32)
    q = reference.quantize(w, s1, None, -8, 7, g)
    fq = reference.dequantize(q, s1, None, g, torch.float32)
    s2, _ = reference.choose_qparams(fq, -8, 7, g, True, None, torch.float32)
    max_code = q.reshape(*s1.shape, g).abs().amax(-1).float()
    clamped = s1 == FP32.smallest_normal
    assert torch.equal(s2[clamped], s1[clamped])
    # the nonzero groups: max|q| is 7 or 8, and s2 = max|q| * s1 / 7.5 up to two fp32
    # roundings (the product and the division, <= 2^-24 relative each): 2.5e-7 relative
    free = ~clamped & (max_code * s1 / 7.5 >= FP32.smallest_normal)
    assert set(max_code[free].tolist()) <= {7.0, 8.0}
    torch.testing.assert_close(s2[free], max_code[free] * s1[free] / 7.5, rtol=2.5e-7, atol=0)


@FEW
@given(data=grouped(elements=moderate_float, max_rows=6))
def test_weight_fake_quant_error_at_most_half_a_step(data):
    """|fq(w) - w| <= s / 2: the grid covers [-8s, 7s] and the extreme is 7.5s, so even
    the clipped positive extreme is half a step off. Slack: s * (1/s) is not exactly 1
    (2 fp32 ulps) and q * s rounds once: 1e-6 relative to the group's absmax."""
    w, g = data
    s, _ = reference.choose_qparams(w, -8, 7, g, True, None, torch.float32)
    fq = reference.fake_quantize(w, -8, 7, g, True, None, torch.float32)
    err = (fq - w).abs().reshape(*s.shape, g)
    bound = s.unsqueeze(-1) / 2 + 1e-6 * s.unsqueeze(-1) * 7.5
    assert (err <= bound).all()


@FEW
@given(data=grouped(elements=half_range_float, max_rows=6), bits=st.sampled_from([8, 4]))
def test_quantize_then_dequantize_equals_fake_quantize(data, bits):
    """What convert stores and dequantizes is what training saw (prepared == converted)."""
    x, g = data
    qmin, qmax = signed_grid(bits)
    for group_size, symmetric, eps in ((ROW, False, EPS), (g, True, None)):
        scale, zero = reference.choose_qparams(x, qmin, qmax, group_size, symmetric, eps, torch.float32)
        q = reference.quantize(x, scale, zero, qmin, qmax, group_size)
        fq = reference.fake_quantize(x, qmin, qmax, group_size, symmetric, eps, torch.float32)
        assert torch.equal(reference.dequantize(q, scale, zero, group_size, torch.float32), fq)


# ---- row order ------------------------------------------------------------------------------


@FEW
@given(data=grouped(elements=half_range_float, max_rows=8), seed=st.integers(0, 2**16))
def test_per_token_fake_quant_commutes_with_row_permutation(data, seed):
    """Qparams are per row (token) for activations and per row group for weights, so
    permuting rows permutes outputs exactly (no cross-row reduction anywhere)."""
    x, g = data
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    act = dict(qmin=-128, qmax=127, group_size=ROW, symmetric=False, eps=EPS, scale_dtype=torch.float32)
    wgt = dict(qmin=-8, qmax=7, group_size=g, symmetric=True, eps=None, scale_dtype=torch.float32)
    for kw in (act, wgt):
        assert torch.equal(reference.fake_quantize(x[perm], **kw), reference.fake_quantize(x, **kw)[perm])


# ---- int4 packing ---------------------------------------------------------------------------


@FEW
@given(
    n=st.integers(1, 4),
    tiles=st.integers(1, 4),
    tile=st.sampled_from([2, 4, 8, 16, 32, 64]),
    seed=st.integers(0, 2**16),
    extremes=st.booleans(),
)
def test_int4_pack_unpack_exact(n, tiles, tile, seed, extremes):
    k = tiles * tile
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    if extremes:  # both ends of the grid in every nibble position
        q[0] = torch.tensor([-8, 7], dtype=torch.int8).repeat(k // 2)
    packed = reference.pack_int4(q, tile)
    assert packed.dtype == torch.uint8 and packed.shape == (n, k // 2)
    assert torch.equal(reference.unpack_int4(packed, tile), q)
    # layout: in each tile, byte j holds element j (low nibble) and j + tile/2 (high nibble)
    halves = q.reshape(n, tiles, 2, tile // 2).to(torch.int16) & 0xF
    assert torch.equal(packed.reshape(n, tiles, tile // 2).to(torch.int16), halves[:, :, 0] | (halves[:, :, 1] << 4))
    # the group sums the int8 x int4 kernel reads are the sums of the codes
    assert torch.equal(reference.int4_group_sums(q, tile).to(torch.int32), q.reshape(n, tiles, tile).sum(-1, dtype=torch.int32))


@pytest.mark.parametrize("value", [8, -9, 127])
def test_pack_refuses_values_outside_int4(value):
    q = torch.zeros(1, 4, dtype=torch.int8)
    q[0, 1] = value
    with pytest.raises(ValueError, match="outside"):
        reference.pack_int4(q, 4)
