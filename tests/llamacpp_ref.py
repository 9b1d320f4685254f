"""llama.cpp's Q8_0 activation quantization re-implemented in numpy (test-only reference).

`quantize_row_q8_0_avx` follows ggml/src/ggml-cpu/arch/x86/quants.c, quantize_row_q8_0,
AVX/AVX2 branch, step for step in float32:

    maxScalar = max |x| over a block of 32             (_mm256_andnot_ps / _mm256_max_ps)
    d  = maxScalar / 127.f;  y.d = GGML_CPU_FP32_TO_FP16(d)       (round to nearest even)
    id = (maxScalar != 0.0f) ? 127.f / maxScalar : 0.0f
    q  = _mm256_cvtps_epi32(_mm256_round_ps(x * id, _MM_ROUND_NEAREST))  (ties to even)

and `dequantize_row_q8_0` gives q * fp16_to_fp32(y.d) in float32.

`quantize_row_q8_0_bf16` is the same rule with every step rounded to bfloat16, the way
PyTorch's CPU kernels compute a bfloat16 op (in float32, then rounded to nearest even):
what qatfx's "ggml" rule does to a bfloat16 tensor, clamp to [-127, 127] included. numpy has no bfloat16, so values are
float32 arrays holding bfloat16 numbers.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 (ties to even), as float32. Finite inputs only."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).reshape(np.shape(a))


def _blocks(x: np.ndarray) -> np.ndarray:
    assert x.dtype == np.float32 and x.shape[-1] % BLOCK == 0
    return x.reshape(-1, BLOCK)


def quantize_row_q8_0_avx(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 (n_blocks, 32), scales float16 (n_blocks,)) of float32 `x`."""
    blocks = _blocks(x)
    amax = np.abs(blocks).max(axis=1)
    d = (amax / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    product = (blocks * inv[:, None]).astype(np.float32)
    return np.rint(product).astype(np.int8), d.astype(np.float16)


def quantize_row_q8_0_bf16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same rule in bfloat16 arithmetic; `x` holds bfloat16 values."""
    blocks = _blocks(x)
    assert np.array_equal(bf16_round(blocks), blocks), "x must hold bfloat16 values"
    amax = np.abs(blocks).max(axis=1)
    d = bf16_round(amax / np.float32(127.0))
    with np.errstate(divide="ignore"):
        inv = bf16_round(np.where(amax != 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32))
    product = bf16_round(blocks * inv[:, None])
    # bf16's multiplier can exceed 127 / amax by 2^-8 relative, so x * m reaches 127.5 and
    # rounds to 128: the grid's clamp folds it to 127 (float32 never leaves [-127, 127])
    return np.clip(np.rint(product), -127, 127).astype(np.int8), d.astype(np.float16)


def dequantize_row_q8_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 (n_blocks, 32): code * fp16_to_fp32(d), exact in float32."""
    return codes.astype(np.float32) * scales.astype(np.float32)[:, None]
