"""ggml's block formats, written from trained codes (never re-derived from float weights).

Q4_0 (ggml `block_q4_0`, gguf-py `quants.Q4_0`): 32 weights per block, an fp16 scale `d`
then 16 bytes; value = (code - 8) * d; element j is the low nibble of byte j, element j + 16
the high nibble. A symmetric int4 grid (codes in [-8, 7], scale s) is Q4_0 exactly: d = s,
code = q + 8, when its groups are a multiple of 32 (each block repeats its group's scale)
and s is an fp16 value.

Q8_0: 32 int8 codes after an fp16 scale; value = code * d. A symmetric int8 grid maps the
same way.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

BLOCK = 32


def fp16_problem(scales: torch.Tensor) -> Optional[str]:
    """Why these scales are not fp16 values (so Q4_0/Q8_0 would round them), or None."""
    if scales.dtype == torch.float16:
        return None
    as_fp16 = scales.to(torch.float16)
    changed = int((as_fp16.to(scales.dtype) != scales).sum())
    if changed:
        return f"{changed} of {scales.numel()} {str(scales.dtype).removeprefix('torch.')} scales are not fp16 values"
    return None


def block_problem(group_size: int, k: int) -> Optional[str]:
    if group_size % BLOCK or k % BLOCK:
        return f"group size {group_size} is not a multiple of {BLOCK} (ggml's block)"
    return None


def _block_scales(scales: torch.Tensor, group_size: int, k: int) -> np.ndarray:
    """(N, K / 32) fp16: each group's scale repeated over its blocks, as raw bytes (N, K/32, 2)."""
    per_block = scales.to(torch.float16).repeat_interleave(group_size // BLOCK, dim=-1)
    assert per_block.shape[-1] == k // BLOCK
    return per_block.numpy().view(np.uint8).reshape(scales.shape[0], k // BLOCK, 2)


def q4_0_bytes(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> np.ndarray:
    """(N, K) int4 codes in [-8, 7] and their (N, K / group_size) scales -> (N, K / 32 * 18) bytes."""
    n, k = codes.shape
    unsigned = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(n, k // BLOCK, BLOCK)
    nibbles = unsigned[..., : BLOCK // 2] | (unsigned[..., BLOCK // 2 :] << 4)
    blocks = np.concatenate([_block_scales(scales, group_size, k), nibbles.numpy()], axis=-1)
    return blocks.reshape(n, -1)


def q8_0_bytes(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> np.ndarray:
    """(N, K) int8 codes and their (N, K / group_size) scales -> (N, K / 32 * 34) bytes."""
    n, k = codes.shape
    values = codes.to(torch.int8).reshape(n, k // BLOCK, BLOCK).numpy().view(np.uint8)
    return np.concatenate([_block_scales(scales, group_size, k), values], axis=-1).reshape(n, -1)
