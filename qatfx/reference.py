"""Pure-torch quantization numerics: the single source of truth.

Every formula follows `docs/numerics.md` (the contract with torchao 0.18) operation for
operation, in the same dtypes, so results are bit-identical to torchao's
`Int8DynActInt4WeightQATQuantizer` / `Int8DynActInt4WeightQuantizer`. The torch.library
ops in `qatfx.ops` are thin wrappers over these functions; fake-quant and the converted
quantize/dequantize share them, which is why prepared == converted exactly.

Tensors are viewed as blocks along the last dim: (..., K // G, G) for a group size G,
(..., 1, K) per row, (1, numel) per tensor. Scales and zero points have the block shape
without the trailing G: (..., K // G), (..., 1) or (1,).

Two scale rules (QuantSpec.scale_rule): "torchao" rounds codes with the reciprocal of the
cast scale (choose_qparams, then quantize); "ggml" rounds them with h / absmax in the input
dtype and only dequantizes with the cast scale (ggml_qparams), as llama.cpp's x86
quantize_row_q8_0 does. `quantize_dynamic` and `fake_quantize` take either.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from qatfx.spec import GGML, ROW, TENSOR, TORCHAO, check_scale_rule


def _group_length(x: torch.Tensor, group_size: int) -> int:
    """Elements per group along the last dim for a row/group `group_size` sentinel."""
    k = x.shape[-1]
    g = k if group_size == ROW else group_size
    if k % g != 0:
        raise ValueError(f"last dim {k} is not divisible by group size {g}")
    return g


def _blocks(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View `x` as (..., n_groups, group) blocks."""
    if group_size == TENSOR:
        return x.reshape(1, 1, -1)
    g = _group_length(x, group_size)
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


def qparams_shape(x: torch.Tensor, group_size: int) -> tuple[int, ...]:
    if group_size == TENSOR:
        return (1,)
    return (*x.shape[:-1], x.shape[-1] // _group_length(x, group_size))


def _resolve_eps(eps: Optional[float], dtype: torch.dtype) -> float:
    return torch.finfo(dtype).smallest_normal if eps is None else eps


@torch.no_grad()
def choose_qparams(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    group_size: int,
    symmetric: bool,
    eps: Optional[float],
    scale_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scales (and zero points, None when symmetric) for `x`, computed in x.dtype then cast.

    Mirrors torchao `_choose_qparams_affine` (SYMMETRIC / ASYMMETRIC) step by step.
    """
    blocks = _blocks(x, group_size)
    eps = _resolve_eps(eps, x.dtype)
    min_val = torch.amin(blocks, dim=-1)
    max_val = torch.amax(blocks, dim=-1)
    min_neg = torch.min(min_val, torch.zeros_like(min_val))
    max_pos = torch.max(max_val, torch.zeros_like(max_val))
    if symmetric:
        # (qmax - qmin) / 2 = 7.5 for int4: the negative extreme lands on -8 and the
        # positive extreme rounds to 8 and is clipped to 7 (torchao's rule, not /7 or /8).
        absmax = torch.max(-min_neg, max_pos)
        scale = torch.clamp(absmax / (float(qmax - qmin) / 2), min=eps)
        zero = None
    else:
        scale = torch.clamp((max_pos - min_neg) / float(qmax - qmin), min=eps)
        zero = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax)
    out_dtype = x.dtype if scale_dtype is None else scale_dtype
    shape = qparams_shape(x, group_size)
    scale = scale.to(out_dtype).reshape(shape)
    if zero is not None:
        zero = zero.to(out_dtype).reshape(shape)
    return scale, zero


@torch.no_grad()
def ggml_qparams(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    group_size: int,
    eps: Optional[float],
    scale_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, multiplier) of the "ggml" rule, h = (qmax - qmin) / 2, in x.dtype:

        scale = max(absmax / h, eps) cast to scale_dtype    (dequantizes: x_fq = q * scale)
        multiplier = h / absmax, 0 where absmax == 0        (quantizes: q = round(x * m))

    llama.cpp's x86 quantize_row_q8_0 step for step (d = amax / 127.f; y.d = fp16(d);
    id = amax ? 127.f / amax : 0): the multiplier is a true division, not 1 / d and not
    1 / fp16(d). Both divisions are tensor / tensor, because `scalar / t` is computed as
    reciprocal(t) * scalar and a CUDA `t / scalar` as t * (1 / scalar).
    """
    blocks = _blocks(x, group_size)
    absmax = torch.amax(blocks.abs(), dim=-1)
    h = torch.full_like(absmax, float(qmax - qmin) / 2)
    scale = torch.clamp(absmax / h, min=_resolve_eps(eps, x.dtype))
    multiplier = torch.where(absmax > 0, h / absmax, torch.zeros_like(absmax))
    # A subnormal absmax overflows h / absmax to inf, and 0 * inf is NaN; capping keeps
    # codes finite (such a block's fp16 scale is 0, so it dequantizes to 0 either way).
    multiplier = torch.clamp(multiplier, max=torch.finfo(multiplier.dtype).max)
    out_dtype = x.dtype if scale_dtype is None else scale_dtype
    shape = qparams_shape(x, group_size)
    return scale.to(out_dtype).reshape(shape), multiplier.reshape(shape)


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    """torch.round with an identity backward. The forward value is exactly round(t): for
    |t| < 2^23, round(t) - t is exact, so t + (round(t) - t) == round(t)."""
    return t + (torch.round(t) - t).detach()


def _quantize_blocks(
    blocks: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], qmin: int, qmax: int
) -> torch.Tensor:
    """clamp(round(x * (1 / s)) + z, qmin, qmax): multiply by the reciprocal, round before
    adding z (torchao `_quantize_affine_no_dtype_cast`). Differentiable: straight-through
    round, and clamp's own backward gives the [qmin, qmax] mask."""
    return _quantize_with_reciprocal(blocks, 1.0 / scale, zero, qmin, qmax)


def _quantize_with_reciprocal(
    blocks: torch.Tensor, inverse: torch.Tensor, zero: Optional[torch.Tensor], qmin: int, qmax: int
) -> torch.Tensor:
    t = _round_ste(blocks * inverse.unsqueeze(-1))
    if zero is not None:
        t = t + zero.unsqueeze(-1)
    return torch.clamp(t, qmin, qmax)


def _quantize_blocks_ggml(blocks: torch.Tensor, multiplier: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """clamp(round(x * m), qmin, qmax) with the clamp's gradient mask. In float32 a narrow
    grid never needs the clamp (|x * m| <= h up to an ulp, as llama.cpp relies on); in
    bfloat16 m can exceed h / absmax by 2^-8 relative and the absmax element rounds to
    h + 1, which the clamp folds back."""
    return torch.clamp(_round_ste(blocks * multiplier.unsqueeze(-1)), qmin, qmax)


def _dequantize_blocks(
    q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], out_dtype: torch.dtype
) -> torch.Tensor:
    """((q - z) * s).to(out_dtype), with q and z first cast to out_dtype (torchao
    `_dequantize_affine_no_dtype_check`; exact for integers up to 256 in bf16)."""
    dq = q.to(out_dtype)
    if zero is not None:
        dq = dq - zero.unsqueeze(-1).to(out_dtype)
    return (dq * scale.unsqueeze(-1)).to(out_dtype)


def _codes(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    group_size: int,
    symmetric: bool,
    eps: Optional[float],
    scale_dtype: Optional[torch.dtype],
    scale_rule: str,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(codes as (..., n_groups, G) floats, scale, zero) of `x` under `scale_rule`;
    differentiable in x like `_quantize_blocks`, no gradient to the qparams."""
    check_scale_rule(scale_rule, symmetric)
    blocks = _blocks(x, group_size)
    if scale_rule == GGML:
        scale, multiplier = ggml_qparams(x.detach(), qmin, qmax, group_size, eps, scale_dtype)
        return _quantize_blocks_ggml(blocks, multiplier, qmin, qmax), scale, None
    scale, zero = choose_qparams(x.detach(), qmin, qmax, group_size, symmetric, eps, scale_dtype)
    return _quantize_blocks(blocks, scale, zero, qmin, qmax), scale, zero


def fake_quantize(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    group_size: int,
    symmetric: bool,
    eps: Optional[float],
    scale_dtype: Optional[torch.dtype],
    scale_rule: str = TORCHAO,
) -> torch.Tensor:
    """Quantize then dequantize `x` with qparams from `x` (dynamic), differentiable with the
    straight-through estimator and the clamp mask; no gradient reaches scale or zero.
    Exactly `dequantize(*quantize_dynamic(x, ...))` of the same rule."""
    q, scale, zero = _codes(x, qmin, qmax, group_size, symmetric, eps, scale_dtype, scale_rule)
    return _dequantize_blocks(q, scale, zero, x.dtype).reshape(x.shape)


def learned_qparams(
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    qmin: int,
    qmax: int,
    eps: Optional[float],
    scale_dtype: Optional[torch.dtype],
    x_dtype: torch.dtype,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The qparams a trained (learnable) spec quantizes with, as `choose_qparams` would return
    them: the scale clamped to eps in the parameter's dtype, then cast to the scale dtype; the
    zero point clamped to [qmin, qmax] and rounded to an integer. Differentiable: the casts
    pass the gradient through, the round is straight-through, the clamps mask it.

    The clamp is also never below the smallest power of two whose reciprocal is finite in
    the scale dtype (2^-15 in fp16): codes are rounded with 1 / s, and a trained scale can
    reach any value, where 1 / s = inf would turn a zero weight into NaN."""
    out_dtype = x_dtype if scale_dtype is None else scale_dtype
    floor = max(_resolve_eps(eps, scale.dtype), 2.0 ** -math.floor(math.log2(torch.finfo(out_dtype).max)))
    s = torch.clamp(scale, min=floor).to(out_dtype)
    z = None if zero is None else _round_ste(torch.clamp(zero, qmin, qmax)).to(out_dtype)
    return s, z


def fake_quantize_learned(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    qmin: int,
    qmax: int,
    group_size: int,
    eps: Optional[float],
    scale_dtype: Optional[torch.dtype],
) -> torch.Tensor:
    """Fake-quantize `x` with trained qparams: `fake_quantize`'s ops (quantize with the
    reciprocal of the cast scale, round half to even, clamp, dequantize) on
    `learned_qparams(scale, zero)`, so it equals `dequantize(quantize(x, s, z))` of those
    qparams bit for bit. Gradients, with u = x / s and q = clamp(round(u) + z):

        d/dx = 1 where qmin <= round(u) + z <= qmax, else 0            (straight-through)
        d/ds = round(u) - u  inside the grid, q - z at a clamped code   (LSQ, Esser et al.)
        d/dz = 0             inside the grid, -s at a clamped code       (LSQ+)

    with no gradient scaling factor (Adam normalises per parameter anyway)."""
    s, z = learned_qparams(scale, zero, qmin, qmax, eps, scale_dtype, x.dtype)
    q = _quantize_with_reciprocal(_blocks(x, group_size), _learned_reciprocal(s), z, qmin, qmax)
    return _dequantize_blocks(q, s, z, x.dtype).reshape(x.shape)


def _learned_reciprocal(s: torch.Tensor) -> torch.Tensor:
    """1 / s with the value `_quantize_blocks` uses (c). An fp16 s is differentiated through
    r = 1 / float32(s) instead: the fp16 backward's intermediate 1 / s^2 overflows for
    s < 2^-8, and a Q8_0 scale is ~absmax / 127. The value stays c: c - r is exact, c being
    within a factor 2 of r (Sterbenz), so r + (c - r) is c."""
    inverse = 1.0 / s
    if s.dtype != torch.float16:
        return inverse
    r = 1.0 / s.float()
    return (r + (inverse.detach().float() - r).detach()).to(torch.float16)


def storage_dtype(qmin: int) -> torch.dtype:
    return torch.int8 if qmin < 0 else torch.uint8


@torch.no_grad()
def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    qmin: int,
    qmax: int,
    group_size: int,
) -> torch.Tensor:
    """Integer values of `x` for given qparams, stored as int8 (signed) or uint8."""
    q = _quantize_blocks(_blocks(x, group_size), scale, zero, qmin, qmax)
    return q.to(storage_dtype(qmin)).reshape(x.shape)


@torch.no_grad()
def quantize_dynamic(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    group_size: int,
    symmetric: bool,
    eps: Optional[float],
    scale_dtype: Optional[torch.dtype],
    scale_rule: str = TORCHAO,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(codes, scale, zero) of `x` with qparams from `x` under either scale rule: what
    convert stores for a weight and `qatfx::quantize_dynamic` computes for an activation.
    zero is None for a symmetric spec; codes are int8 (signed grid) or uint8."""
    q, scale, zero = _codes(x, qmin, qmax, group_size, symmetric, eps, scale_dtype, scale_rule)
    return q.to(storage_dtype(qmin)).reshape(x.shape), scale, zero


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _dequantize_blocks(_blocks(q, group_size), scale, zero, out_dtype).reshape(q.shape)


# ---- int4 packing -------------------------------------------------------------------------
#
# Two 4-bit values per byte. Within each tile of `tile` consecutive elements along K, the low
# nibbles hold the first half of the tile and the high nibbles the second half, so a kernel
# reading one tile does two dots on contiguous halves with no interleave. Which value a
# nibble holds (a two's complement int4, or an unsigned code) is the weight format's choice
# (qatfx/formats/); these functions only move nibbles.


def pack_nibbles(nibbles: torch.Tensor, tile: int) -> torch.Tensor:
    """(N, K) integers in [0, 15] -> (N, K // 2) uint8 in the tiled layout above."""
    n, k = nibbles.shape
    if tile % 2 or k % tile:
        raise ValueError(f"int4 packing needs an even tile dividing K; got K={k}, tile={tile}")
    halves = nibbles.reshape(n, k // tile, 2, tile // 2).to(torch.int16)
    packed = halves[:, :, 0] | (halves[:, :, 1] << 4)
    return packed.to(torch.uint8).reshape(n, k // 2)


def unpack_nibbles(packed: torch.Tensor, tile: int) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) int16 in [0, 15]; exact inverse of `pack_nibbles`."""
    n, half_k = packed.shape
    p = packed.to(torch.int16).reshape(n, (2 * half_k) // tile, 1, tile // 2)
    return torch.cat([p & 0xF, (p >> 4) & 0xF], dim=2).reshape(n, 2 * half_k)


def pack_int4(q: torch.Tensor, tile: int) -> torch.Tensor:
    """(N, K) int8 in [-8, 7] -> (N, K // 2) uint8, nibbles in two's complement."""
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4 got values outside [-8, 7]")
    return pack_nibbles(q.to(torch.int16) & 0xF, tile)


def int4_group_sums(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum of the int values of each group, (N, K // G): the constant the int8 x int4 kernel
    needs for the activation zero-point correction. int16 (|sum| <= 8 * G fits for
    G <= 4096, and halves the bytes a decode step reads next to the weights), int32 beyond."""
    g = _group_length(q, group_size)
    dtype = torch.int16 if g <= 4096 else torch.int32
    return q.reshape(*q.shape[:-1], q.shape[-1] // g, g).sum(-1, dtype=torch.int32).to(dtype)


def unpack_int4(packed: torch.Tensor, tile: int) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) int8; exact inverse of `pack_int4`."""
    # Sign-extend a 4-bit two's complement value: (v ^ 8) - 8.
    return ((unpack_nibbles(packed, tile) ^ 8) - 8).to(torch.int8)
