"""Symmetric int4, two codes per byte, per-group scales and group sums: what the int8 x
int4 kernel (qatfx/lowering/w4a8_linear.py) reads.

Parts of an (N, K) weight with G elements per group:
    packed      (N, K // 2) uint8: two's complement nibbles, tiled per group (reference.pack_int4)
    scales      (N, K // G) in the spec's scale dtype
    group_sums  (N, K // G) int16 (int32 for G > 4096): the sum of each group's codes; the
                kernel's activation zero-point correction needs it, dequantization does not
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from qatfx import reference
from qatfx.formats.base import (
    PATTERN_DTYPE,
    PATTERN_GROUP_SIZE,
    WeightFormat,
    elements_per_group,
    qparam_bytes,
    qparam_count,
    two_per_byte_problem,
    two_per_byte_unpacked,
)
from qatfx.spec import QuantSpec


def tile(group_size: int, k: int) -> int:
    """The packing tile: one group (the whole row for per-channel weights)."""
    return elements_per_group(group_size, k)


def _dequantize(packed, scales, group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    q = reference.unpack_int4(packed, tile(group_size, 2 * packed.shape[-1]))
    return reference.dequantize(q, scales, None, group_size, out_dtype)


@torch.library.custom_op("qatfx::dequantize_int4", mutates_args=())
def dequantize_int4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    group_sums: torch.Tensor,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Symmetric int4 weight in this format -> (N, K) out_dtype (the sums are not needed:
    they ride along so the lowering sees them)."""
    return _dequantize(packed, scales, group_size, out_dtype)


@dequantize_int4.register_fake
def _(packed, scales, group_sums, group_size, out_dtype):
    return two_per_byte_unpacked(packed, out_dtype)


class Int4Packed(WeightFormat):
    name = "int4_packed"
    parts = ("packed", "scales", "group_sums")
    dequantize_op = torch.ops.qatfx.dequantize_int4.default

    def accepts(self, spec: QuantSpec) -> bool:
        return spec.bits == 4 and spec.signed and spec.symmetric

    def layout_problem(self, spec, k):
        return two_per_byte_problem(self, spec, k)

    def pack(self, q, scale, zero, spec):
        return {
            "packed": reference.pack_int4(q, tile(spec.group_size, q.shape[-1])),
            "scales": scale,
            "group_sums": reference.int4_group_sums(q, spec.group_size),
        }

    def dequantize(self, parts: Sequence[Optional[torch.Tensor]], group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
        packed, scales, _ = parts
        return _dequantize(packed, scales, group_size, out_dtype)

    def nbytes(self, spec, shape, weight_dtype):
        n, k = shape
        sums_itemsize = 2 if elements_per_group(spec.group_size, k) <= 4096 else 4
        return n * k // 2 + qparam_bytes(spec, n, k, weight_dtype) + qparam_count(spec, n, k) * sums_itemsize

    def example_parts(self):
        n, k, g = 16, 64, PATTERN_GROUP_SIZE
        return [torch.zeros(n, k // 2, dtype=torch.uint8), torch.ones(n, k // g), torch.zeros(n, k // g, dtype=torch.int16)]

    @staticmethod
    def decompose_pattern(w_packed, w_scales, w_group_sums):
        return torch.ops.qatfx.dequantize_int4.default(w_packed, w_scales, w_group_sums, PATTERN_GROUP_SIZE, PATTERN_DTYPE)

    @staticmethod
    def decompose_math(w_packed, w_scales, w_group_sums, *, group_size, out_dtype):
        return _dequantize(w_packed, w_scales, group_size, out_dtype)
