"""int8 activations x packed int4 weights, per-group scales: y = epilogue(x @ w.T).

Shapes (G = group_size, a power of two >= 32 dividing K):
    x_q (M, K) int8, x_scale (M, 1) fp32, x_zero (M, 1) fp32 holding integers in [-128, 127]
    w_packed (N, K // 2) uint8, w_scales (N, K // G) fp32 or bf16,
    w_group_sums (N, K // G) int16 or int32 (`qatfx.reference.int4_group_sums`)
    bias (N,) or None, residual (M, N) or None  ->  out (M, N) out_dtype

Formula (the integer form of docs/numerics.md, zero-point term folded out of the loop):
    dot_g[t, n] = sum_{k in g} q_x[t, k] * q_w[n, k]                        exact int32
    acc[t, n]   = sum_g float32(dot_g) * float32(s_ng)                      groups summed in fp32
    c[n]        = sum_g float32(s_ng) * float32(wsum[n, g])                 one fp32 per column
    y = (acc - z_t * c) * s_t;  y += bias;  y = activation(y);  y += residual;  y.to(out_dtype)
All epilogue math is fp32. The kernel's dots are 16 * dot_g (see _nibble_words), exact in
int32 for G <= 2^16 and converted to fp32 exactly for G <= 2^14; the factor is removed by an
exact multiply by 1/16. Compared with subtracting z_t * wsum per group in int32, the fp32
rounding is relative to |acc| + |z_t * c| instead of |acc - z_t * c| (docs/lowering.md).

Pack layout (`qatfx.reference.pack_int4(q, tile=G)`): group g of row n is the G // 2
contiguous bytes w_packed[n, g*G/2 : (g+1)*G/2]; byte j holds element j of the group in its
low nibble and element j + G/2 in its high nibble, two's complement. The kernel reads the
same buffer as int32 words (`packed_words`, a view): per word one AND gives 16 * the four
high-nibble codes and a shift + AND the four low ones, already in the int8 x 4 register form
the MMA takes; a group is two dots on contiguous halves, dot(x[first half], lo) +
dot(x[second half], hi) (at G = 32 the halves are interleaved word by word into one K = 32
dot, activations alike, see _MIN_INT8_DOT_K and _halves_interleaved).

Paths (`launch_plan`): M <= 16 runs the decode configs (BLOCK_M = 1 or 16), larger M the GEMM
tiles; up to M = 128 the groups are split over SPLIT_K programs in the same launch, each
storing an fp32 partial; the last program per output tile (a ticket counter) sums them in
split order (deterministic, no float atomics) and runs the epilogue.

`w4a8_gemm_reference` computes the same function in torch on any device. On CPU tensors the
kernels run only under TRITON_INTERPRET=1 (set before importing this module).
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from qatfx import reference
from qatfx.lowering.epilogue import ACTIVATIONS, activation as activation_named

logger = logging.getLogger(__name__)

SUPPORTED_ACTIVATIONS = tuple(ACTIVATIONS)
SUPPORTED_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_SCALE_DTYPES = (torch.float32, torch.bfloat16)
SUPPORTED_GROUP_SUM_DTYPES = (torch.int16, torch.int32)  # convert writes int16 for G <= 4096

# Read once: triton.jit picks the interpreter at decoration time from the same variable.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRETING = tl.constexpr(_INTERPRETING)

# Triton's NVIDIA backend needs K >= 32 for an 8-bit tl.dot (min_dot_size in
# triton/backends/nvidia/compiler.py), so at G = 32 (halves of 16) the two nibble halves are
# joined back into one K = 32 tile and reduced with a single dot.
_MIN_INT8_DOT_K = 32
# Bytes of one group half reduced per inner step (128 K elements). Heuristic, untuned: no GPU
# was available while writing this kernel.
_MAX_CHUNK_BYTES = 64
# M at or below which the decode configs (BLOCK_M = 16) run. Heuristic, untuned.
_SMALL_M_MAX = 16
# M at or below which the groups may be split over programs (single-launch split-K): up to
# there a layer's output tiles alone may not fill the GPU. Heuristic, untuned.
_SPLIT_K_M_MAX = 128
_MAX_SPLIT_K = 16
# 0xF0F0F0F0 as an int32 (written signed so Triton keeps the words 32-bit): the high nibble
# of each of a word's four bytes.
HIGH_NIBBLES = tl.constexpr(-0x0F0F0F10)
LOW_NIBBLES = tl.constexpr(0x0F0F0F0F)


def is_supported_group_size(g: int) -> bool:
    """True when the kernel handles group size `g`: a power of two >= 32."""
    return g >= 32 and (g & (g - 1)) == 0


# ---- kernels --------------------------------------------------------------------------------


@triton.jit
def _activation(y, ACTIVATION: tl.constexpr):
    """ACTIVATION is the activation's kernel_code in qatfx/lowering/epilogue.py."""
    if ACTIVATION == 1:
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == 2:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == 3:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): the tanh gelu without a tanh intrinsic.
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y * tl.sigmoid(2.0 * u)
    elif ACTIVATION == 4:
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def _epilogue(
    acc, offs_m, offs_n, M, N,
    x_scale_ptr, bias_ptr, residual_ptr, stride_rm, out_ptr, stride_om,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """out[tile] = (acc * s_t + bias -> activation + residual).to(out dtype), all fp32."""
    m_mask = offs_m < M
    n_mask = offs_n < N
    mn_mask = m_mask[:, None] & n_mask[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    y = acc * tl.load(x_scale_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = _activation(y, ACTIVATION)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + rows * stride_rm + offs_n[None, :], mask=mn_mask, other=0.0)
        y = y + res.to(tl.float32)
    tl.store(out_ptr + rows * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mn_mask)


@triton.jit
def _tile_coordinates(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWIZZLE_M: tl.constexpr):
    """(pid_m, pid_n) of this program, SWIZZLE_M row tiles at a time for L2 reuse of w."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_band = SWIZZLE_M * num_pid_n
    first_pid_m = (pid // pids_per_band) * SWIZZLE_M
    band_m = tl.minimum(num_pid_m - first_pid_m, SWIZZLE_M)
    pid_m = first_pid_m + (pid % pids_per_band) % band_m
    pid_n = (pid % pids_per_band) // band_m
    return pid_m, pid_n


@triton.jit
def _words_to_bytes(w):
    """(R, C) int32 -> (R, 4 * C) int8: each word's four bytes in memory (little-endian) order.
    Truncating casts of shifts, joined: ptxas sees the four bytes go back into one 32-bit
    register, the form the int8 dot operand takes, so no byte is moved on its own."""
    b0 = w.to(tl.int8)
    b1 = (w >> 8).to(tl.int8)
    b2 = (w >> 16).to(tl.int8)
    b3 = (w >> 24).to(tl.int8)
    # join appends a minor axis: join(join(b0, b2), join(b1, b3))[r, c, i, j] is b_{2i + j}.
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (w.shape[0], 4 * w.shape[1]))


@triton.jit
def _nibble_words(words):
    """(BLOCK_N, C) int32 words of the packed weight -> (lo, hi) int32 words whose bytes are the
    int8 16 * q of the low / high nibbles.

    A two's complement nibble moved to the top of its byte, low bits zero, is the int8 16 * q
    (its sign bit lands on the byte's): one AND per four high nibbles, a shift and an AND per
    four low nibbles, and no sign extension. The factor 16 is exact everywhere downstream
    (integer dots, their fp32 conversion, power-of-two scaling) and is removed once in the
    epilogue."""
    hi = words & HIGH_NIBBLES
    if INTERPRETING:
        lo = (words & LOW_NIBBLES) << 4
    else:
        # Written in tl, LLVM rebuilds this word byte by byte on its way into _words_to_bytes
        # (3 SHF + 3 PRMT per word in the SASS); opaque, it stays one SHL and one AND.
        lo = tl.inline_asm_elementwise(
            "{ shl.b32 $0, $1, 4; and.b32 $0, $0, 0xF0F0F0F0; }", "=r,r", [words],
            dtype=tl.int32, is_pure=True, pack=1)
    return lo, hi


@triton.jit
def _halves_interleaved(lo_words, hi_words, ROWS: tl.constexpr, WORDS: tl.constexpr):
    """(ROWS, WORDS) int32 words of a group's two halves -> (ROWS, 8 * WORDS) int8 in the
    K order [word 0 of the first half, word 0 of the second half, word 1 ...]: a join with
    no permute. Applied alike to the activations and the weights, the dot's sum is the
    group's, in another order of exact integer terms."""
    return _words_to_bytes(tl.reshape(tl.join(lo_words, hi_words), (ROWS, 2 * WORDS)))


@triton.jit
def _split_k_reduce(
    partial, offs_m, offs_n, M, N, workspace_ptr, counter_ptr, SPLIT_K: tl.constexpr,
):
    """Single-launch split-K ("last program reduces"): each split stores its fp32 partial,
    then takes a ticket on its output tile's counter; the program drawing the last ticket
    sums the SPLIT_K partials in split order (deterministic, unlike atomic float adds) and
    resets the counter. Returns (is_last, the sum)."""
    pid_k = tl.program_id(1)
    mn_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tile = workspace_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(tile + pid_k.to(tl.int64) * M * N, partial, mask=mn_mask)
    # Every thread's store is ordered before the ticket (barrier), the ticket releases them
    # at GPU scope and the last program's acquire makes the other splits' stores visible.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
    is_last = ticket == SPLIT_K - 1
    total = tl.zeros_like(partial)
    if is_last:
        for s in tl.static_range(SPLIT_K):
            # .cg: read through L2, where the other SMs' stores are, never a stale L1 line.
            total += tl.load(tile + s * M * N, mask=mn_mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(counter_ptr + tl.program_id(0), 0, sem="relaxed", scope="gpu")
    return is_last, total


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _w4a8_gemm_kernel(
    # int8 activations (M, K); per-token scale and zero point (M, 1) fp32
    x_ptr, x_scale_ptr, x_zero_ptr,
    # packed int4 weights viewed as int32 words (N, K // 8); group scales and int16/int32
    # group sums (N, K // G), read through (stride over n, stride over groups)
    w_ptr, w_scale_ptr, w_sum_ptr,
    # epilogue operands: bias (N,) and residual (M, N), None when absent
    bias_ptr, residual_ptr,
    # out (M, N); with SPLIT_K > 1 also the fp32 partials workspace (SPLIT_K, M, N) and one
    # int32 ticket counter per output tile, zero on entry and left zero (else both None)
    out_ptr, workspace_ptr, counter_ptr,
    # sizes; M_BUCKET (next power of two of M) only keys the autotuner
    M, N, K, M_BUCKET, groups_per_split,
    # row strides (in words for w); every last dim of x, w, residual and out is contiguous
    stride_xm, stride_wn, stride_sn, stride_sg, stride_rm, stride_om,
    # problem constants chosen by the launcher
    GROUP_SIZE: tl.constexpr, CHUNK_BYTES: tl.constexpr, JOIN_HALVES: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    # tiles chosen by the autotuner
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWIZZLE_M: tl.constexpr,
):
    HALF: tl.constexpr = GROUP_SIZE // 2  # bytes per group per row
    CHUNK_WORDS: tl.constexpr = CHUNK_BYTES // 4
    pid_m, pid_n = _tile_coordinates(M, N, BLOCK_M, BLOCK_N, SWIZZLE_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, CHUNK_BYTES)
    offs_w = tl.arange(0, CHUNK_WORDS)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # Masked rows and columns load zeros everywhere, so they accumulate 0 and are not stored.
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    # The same rows as int32 words (the launcher guarantees 4-byte alignment), for JOIN_HALVES.
    x_words = x_ptr.to(tl.pointer_type(tl.int32)) + offs_m.to(tl.int64)[:, None] * (stride_xm // 4)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1), words along K
    s_cols = offs_n.to(tl.int64) * stride_sn

    n_groups = K // GROUP_SIZE
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, n_groups)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # sum_g s_ng * 16 * dot_g
    col = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_g s_ng * wsum_ng (zero-point term)
    for g in range(g_start, g_end):
        dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for c in range(0, HALF // CHUNK_BYTES):
            words = tl.load(w_rows + (g * (HALF // 4) + c * CHUNK_WORDS + offs_w)[None, :],
                            mask=n_mask[:, None], other=0)
            lo_words, hi_words = _nibble_words(words)
            if JOIN_HALVES:
                # One chunk per half here (CHUNK_BYTES == HALF): one (BLOCK_M, G) x (G, BLOCK_N)
                # dot, its K axis in _halves_interleaved's order for both operands. Compiler
                # facts (docs/lowering.md): joining the byte halves into K order with a
                # permute sent the tile through shared memory byte by byte with triton 3.6;
                # this form avoids that with triton 3.6, and with 3.9 at BLOCK_N = 256 only.
                w = _halves_interleaved(lo_words, hi_words, BLOCK_N, CHUNK_WORDS)
                x_group = x_words + g * (GROUP_SIZE // 4) + offs_w[None, :]
                x_first = tl.load(x_group, mask=m_mask[:, None], other=0)
                x_second = tl.load(x_group + GROUP_SIZE // 8, mask=m_mask[:, None], other=0)
                x = _halves_interleaved(x_first, x_second, BLOCK_M, CHUNK_WORDS)
                dot = tl.dot(x, tl.trans(w), acc=dot, out_dtype=tl.int32)
            else:
                lo, hi = _words_to_bytes(lo_words), _words_to_bytes(hi_words)
                k_lo = g * GROUP_SIZE + c * CHUNK_BYTES + offs_c  # K index of the low nibbles
                x_lo = tl.load(x_rows + k_lo[None, :], mask=m_mask[:, None], other=0)
                x_hi = tl.load(x_rows + (k_lo + HALF)[None, :], mask=m_mask[:, None], other=0)
                dot = tl.dot(x_lo, tl.trans(lo), acc=dot, out_dtype=tl.int32)
                dot = tl.dot(x_hi, tl.trans(hi), acc=dot, out_dtype=tl.int32)
        scale = tl.load(w_scale_ptr + s_cols + g * stride_sg, mask=n_mask, other=0.0).to(tl.float32)
        wsum = tl.load(w_sum_ptr + s_cols + g * stride_sg, mask=n_mask, other=0).to(tl.float32)
        acc += dot.to(tl.float32) * scale[None, :]
        # The zero-point correction z_t * sum_g s_ng * wsum_ng is one fp32 number per column:
        # accumulated here on BLOCK_N lanes, applied once below, never per (token, group).
        col += scale * wsum

    zero_t = tl.load(x_zero_ptr + offs_m, mask=m_mask, other=0.0)
    partial = acc * 0.0625 - zero_t[:, None] * col[None, :]  # 1/16: exact, see _nibble_words
    if SPLIT_K == 1:
        _epilogue(partial, offs_m, offs_n, M, N, x_scale_ptr, bias_ptr, residual_ptr, stride_rm,
                  out_ptr, stride_om, HAS_BIAS, ACTIVATION, HAS_RESIDUAL)
    else:
        is_last, total = _split_k_reduce(partial, offs_m, offs_n, M, N, workspace_ptr,
                                         counter_ptr, SPLIT_K)
        if is_last:
            _epilogue(total, offs_m, offs_n, M, N, x_scale_ptr, bias_ptr, residual_ptr,
                      stride_rm, out_ptr, stride_om, HAS_BIAS, ACTIVATION, HAS_RESIDUAL)


# ---- autotuning -----------------------------------------------------------------------------
#
# Config lists are heuristic and untuned (no GPU was available while writing this file):
# common Triton GEMM tiles for large M; BLOCK_M = 16 (the smallest tile tl.dot lowers to an
# MMA well) with several BLOCK_N for decode. Under the interpreter each config runs in numpy,
# one after the other, so each path has exactly one small config.


def _config(block_m: int, block_n: int, swizzle_m: int, warps: int, stages: int) -> triton.Config:
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "SWIZZLE_M": swizzle_m}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


if _INTERPRETING:
    _LARGE_M_CONFIGS = [_config(32, 32, 1, 4, 1)]
    _SMALL_M_CONFIGS = [_config(16, 32, 1, 4, 1)]
else:
    # No 128x128 tile and no 128x64 with 4 warps: on sm_80 at G >= 128 they need more than
    # 255 registers and spill (inside the main loop for 128x128; benchmarks/kernel_static.py).
    _LARGE_M_CONFIGS = [_config(128, 64, 8, 8, 4), _config(64, 128, 8, 8, 3), _config(64, 128, 8, 4, 4),
                        _config(64, 64, 8, 4, 4), _config(32, 64, 8, 4, 3)]
    # BLOCK_M = 1 for M = 1: tl.dot pads it to the MMA's 16 rows, but the per-group int32 ->
    # fp32 rescale then runs on one row instead of sixteen, which at G = 32 is what limits
    # the loop (docs/lowering.md, "The decode hot loop").
    _SMALL_M_CONFIGS = ([_config(1, n, 1, 4, s) for n in (256, 128) for s in (3, 4)]
                        + [_config(16, n, 1, 4, s) for n in (32, 64, 128) for s in (3, 4)])

# Tile width assumed when choosing SPLIT_K before the autotuner picks BLOCK_N. Heuristic.
_NOMINAL_DECODE_TILE = (16, 64)
_NOMINAL_LARGE_TILE = (64, 64)


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Drop tiles much larger than the problem, and row tiles shorter than a decode batch (each
    row tile reads the whole weight again); keep at least the smallest config."""
    args = {**named_args, **kwargs}
    m_bucket = args["M_BUCKET"]
    max_m, max_n = max(16, m_bucket), max(32, triton.next_power_of_2(args["N"]))
    min_m = min(16, m_bucket)
    kept = [c for c in configs
            if min_m <= c.kwargs["BLOCK_M"] <= max_m and c.kwargs["BLOCK_N"] <= max_n]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _autotuned(configs: list):
    return triton.autotune(
        configs=configs,
        key=["M_BUCKET", "N", "K", "GROUP_SIZE", "SPLIT_K"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_w4a8_gemm_kernel)


_large_m_gemm = _autotuned(_LARGE_M_CONFIGS)
_small_m_gemm = _autotuned(_SMALL_M_CONFIGS)


# ---- host side ------------------------------------------------------------------------------


class LaunchPlan(NamedTuple):
    small_m: bool  # decode configs (BLOCK_M = 16)
    split_k: int  # > 1: groups split over programs, the last program per tile reduces
    groups_per_split: int


def _target_programs(device: torch.device) -> int:
    """Programs worth launching: two waves of SMs on a GPU (heuristic, untuned); a few under
    the interpreter, enough to exercise split-K while keeping tests fast."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def launch_plan(m: int, n: int, k: int, group_size: int, device: torch.device) -> LaunchPlan:
    """Which path runs for an (m, k) x (n, k) problem, and how the groups are split: up to
    M = _SPLIT_K_M_MAX, enough splits that tiles x splits reach the target program count."""
    n_groups = k // group_size
    small_m = m <= _SMALL_M_MAX
    if m > _SPLIT_K_M_MAX:
        return LaunchPlan(small_m, 1, n_groups)
    block_m, block_n = _NOMINAL_DECODE_TILE if small_m else _NOMINAL_LARGE_TILE
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = max(1, min(n_groups, _MAX_SPLIT_K, triton.cdiv(_target_programs(device), tiles)))
    per_split = triton.cdiv(n_groups, split)
    return LaunchPlan(small_m, triton.cdiv(n_groups, per_split), per_split)  # no empty split


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"w4a8_gemm: {message}")


def _check_arguments(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, residual,
                     group_size, activation, out_dtype, *, for_kernel: bool = True) -> None:
    """ValueError naming the problem and the fix; runs before any allocation or launch. The
    reference (`for_kernel=False`) takes any even group size."""
    _require(x_q.dtype == torch.int8 and x_q.dim() == 2,
             f"x_q must be a 2-D int8 (M, K) tensor, got {x_q.dtype} {tuple(x_q.shape)}; "
             "reshape to (M, K) and quantize with qatfx.reference.quantize")
    m, k = x_q.shape
    if for_kernel:
        _require(is_supported_group_size(group_size),
                 f"group_size must be a power of two >= 32, got {group_size}; "
                 "use w4a8_gemm_reference for other group sizes")
    _require(group_size >= 2 and group_size % 2 == 0,
             f"group_size must be even (two int4 per byte), got {group_size}")
    _require(k > 0 and k % group_size == 0,
             f"K={k} is not a positive multiple of group_size={group_size}; pad K with zeros")
    _require(w_packed.dtype == torch.uint8 and w_packed.dim() == 2 and w_packed.shape[1] * 2 == k,
             f"w_packed must be (N, K // 2) = (N, {k // 2}) uint8 from pack_int4, "
             f"got {w_packed.dtype} {tuple(w_packed.shape)}")
    n, n_groups = w_packed.shape[0], k // group_size
    for name, t, dtype, shape in (("x_scale", x_scale, (torch.float32,), (m, 1)),
                                  ("x_zero", x_zero, (torch.float32,), (m, 1)),
                                  ("w_scales", w_scales, SUPPORTED_SCALE_DTYPES, (n, n_groups)),
                                  ("w_group_sums", w_group_sums, SUPPORTED_GROUP_SUM_DTYPES, (n, n_groups))):
        _require(t.dtype in dtype and tuple(t.shape) == shape,
                 f"{name} must be {shape} with dtype in {dtype}, got {t.dtype} {tuple(t.shape)}")
    for name, t, shape in (("bias", bias, (n,)), ("residual", residual, (m, n))):
        _require(t is None or (t.is_floating_point() and tuple(t.shape) == shape),
                 f"{name} must be None or a floating {shape} tensor, "
                 f"got {None if t is None else (t.dtype, tuple(t.shape))}")
    _require(activation in SUPPORTED_ACTIVATIONS,
             f"activation must be one of {SUPPORTED_ACTIVATIONS}, got {activation!r}")
    _require(out_dtype in SUPPORTED_OUT_DTYPES,
             f"out_dtype must be one of {SUPPORTED_OUT_DTYPES}, got {out_dtype}")
    tensors = (x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, residual)
    _require(all(t is None or t.device == x_q.device for t in tensors),
             f"all tensors must be on x_q's device {x_q.device}; move them with .to(x_q.device)")


def is_tracing(tensor: torch.Tensor) -> bool:
    """Whether torch is tracing this call (Dynamo, or make_fx / Inductor with fake tensors)
    rather than running it."""
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return torch.compiler.is_compiling() or get_proxy_mode() is not None or detect_fake_mode((tensor,)) is not None


def _launcher(kernel, device: torch.device, tracing: bool):
    """While torch traces (`qatfx::w4a8_linear` under torch.compile / export): through
    wrap_triton, so the trace holds the kernel and Inductor emits it. Otherwise the autotuned
    kernel itself: called eagerly, wrap_triton re-prunes the autotuner's configs into a new
    autotuner on every call (torch 2.13, triton_kernel_wrap.py), which re-benchmarks each
    call, grows the kernel side table and breaks CUDA-graph capture. CPU: the interpreter
    only; torch <= 2.12 cannot wrap_triton with CPU tensors."""
    if device.type == "cpu" and not _INTERPRETING:
        raise RuntimeError(
            "w4a8_gemm: Triton kernels need a GPU; for CPU tensors call w4a8_gemm_reference, "
            "or set TRITON_INTERPRET=1 before importing qatfx to run the kernel interpreted")
    if device.type == "cpu" or not tracing:
        return kernel
    return torch.library.wrap_triton(kernel)


def w4a8_gemm(
    x_q: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor,
    w_packed: torch.Tensor, w_scales: torch.Tensor, w_group_sums: torch.Tensor,
    bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
    *, group_size: int, activation: str = "none", out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(M, K) int8 x (N, K // 2) packed int4 -> (M, N) out_dtype; see the module docstring."""
    _check_arguments(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, residual,
                     group_size, activation, out_dtype)
    (m, k), n, device = x_q.shape, w_packed.shape[0], x_q.device
    out = torch.empty((m, n), dtype=out_dtype, device=device)
    if m == 0 or n == 0:
        return out
    x_q, x_scale, x_zero, bias, residual = (
        None if t is None else t.contiguous()  # no copy when already contiguous
        for t in (x_q, x_scale, x_zero, bias, residual))
    words = packed_words(w_packed)
    x_q = word_aligned(x_q)
    if w_group_sums.stride() != w_scales.stride():  # the kernel reads both with one stride pair
        w_scales, w_group_sums = w_scales.contiguous(), w_group_sums.contiguous()
    plan = launch_plan(m, n, k, group_size, device)
    logger.debug("w4a8_gemm M=%d N=%d K=%d G=%d: %s", m, n, k, group_size, plan)

    half = group_size // 2
    flags = dict(HAS_BIAS=bias is not None, ACTIVATION=activation_named(activation).kernel_code,
                 HAS_RESIDUAL=residual is not None)
    gemm = _small_m_gemm if plan.small_m else _large_m_gemm
    workspace = counters = None
    if plan.split_k > 1:
        workspace = torch.empty((plan.split_k, m, n), dtype=torch.float32, device=device)
        counters = _tile_counters(gemm.configs, m, n, device)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), plan.split_k

    _launcher(gemm, device, is_tracing(x_q))[grid](
        x_q, x_scale, x_zero, words, w_scales, w_group_sums, bias, residual,
        out, workspace, counters,
        m, n, k, triton.next_power_of_2(m), plan.groups_per_split,
        x_q.stride(0), words.stride(0), w_scales.stride(0), w_scales.stride(1),
        0 if residual is None else residual.stride(0), out.stride(0),
        GROUP_SIZE=group_size, CHUNK_BYTES=min(half, _MAX_CHUNK_BYTES),
        JOIN_HALVES=half < _MIN_INT8_DOT_K, SPLIT_K=plan.split_k, **flags,
    )
    return out


def _tile_counters(configs: list, m: int, n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 ticket counters, one per output tile of the smallest of `configs` (the
    autotuner picks the config after this allocation). The kernel leaves them at zero, but a
    fresh buffer per call keeps concurrent streams and traced graphs apart."""
    block_m = min(c.kwargs["BLOCK_M"] for c in configs)
    block_n = min(c.kwargs["BLOCK_N"] for c in configs)
    return torch.zeros(triton.cdiv(m, block_m) * triton.cdiv(n, block_n), dtype=torch.int32, device=device)


def word_aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, contiguous and starting on a 4-byte boundary (a copy only when it is not), so its
    rows can be read as int32 words (K is a multiple of 32, so every row starts on one too)."""
    t = t.contiguous()
    return t.clone() if (t.storage_offset() * t.element_size()) % 4 else t


def packed_words(w_packed: torch.Tensor) -> torch.Tensor:
    """convert's (N, K // 2) uint8 packed weight as the (N, K // 8) int32 words the kernel
    loads: a view, no copy (a copy only for a non-contiguous or misaligned buffer)."""
    return word_aligned(w_packed).view(torch.int32)


# ---- torch reference ------------------------------------------------------------------------

def w4a8_gemm_reference(
    x_q: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor,
    w_packed: torch.Tensor, w_scales: torch.Tensor, w_group_sums: torch.Tensor,
    bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
    *, group_size: int, activation: str = "none", out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The kernel's formula in torch, on any device: exact group dots scaled and summed in fp32
    in increasing g, the zero-point term z_t * c_n with c_n = sum_g s_ng * wsum_ng (fp32, same
    order) subtracted once, then the same fp32 epilogue. Differs from the kernel only in fp32
    summation order (split-K) and FMA contraction."""
    _check_arguments(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, bias, residual,
                     group_size, activation, out_dtype, for_kernel=False)
    (m, k), n = x_q.shape, w_packed.shape[0]
    n_groups = k // group_size
    q_w = reference.unpack_int4(w_packed, group_size)
    # Per-group dots as a float64 batched matmul: exact, every partial sum is an integer of
    # magnitude <= G * 128 * 8 < 2^53 (and no TF32 or reduced-precision path applies to fp64).
    x_groups = x_q.reshape(m, n_groups, group_size).permute(1, 0, 2).double()  # (groups, M, G)
    w_groups = q_w.reshape(n, n_groups, group_size).permute(1, 2, 0).double()  # (groups, G, N)
    dots = torch.bmm(x_groups, w_groups).to(torch.float32)  # (groups, M, N), exact integers
    scales = w_scales.to(torch.float32).t()  # (groups, N)
    sums = w_group_sums.to(torch.float32).t()  # (groups, N), exact (|wsum| <= 8 * G)
    acc = torch.zeros((m, n), dtype=torch.float32, device=x_q.device)
    col = torch.zeros((n,), dtype=torch.float32, device=x_q.device)
    for g in range(n_groups):
        acc = acc + dots[g] * scales[g]
        col = col + scales[g] * sums[g]
    acc = acc - x_zero * col
    y = acc * x_scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    y = activation_named(activation).fn(y)
    if residual is not None:
        y = y + residual.to(torch.float32)
    return y.to(out_dtype)
