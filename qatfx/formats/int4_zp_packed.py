"""Asymmetric int4, two codes per byte, with per-group scales and zero points (the layout
of torchao's uint4 / HQQ-style weights). The worked example of docs/architecture.md, "How
to add a weight format".

Nibbles are unsigned: a code q of a grid [qmin, qmin + 15] is stored as u = q - qmin, and
its zero point as z - qmin, so u - (z - qmin) == q - z exactly (small integers in any float
dtype) and the dequantized weight is bit-identical to what training saw. For the usual
unsigned grid (qmin = 0) codes and zero points are stored unchanged.

Parts of an (N, K) weight with G elements per group:
    packed  (N, K // 2) uint8, tiled per group like reference.pack_int4
    scales  (N, K // G) in the spec's scale dtype
    zeros   (N, K // G), same dtype, shifted by -qmin as above
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
    two_per_byte_problem,
    two_per_byte_unpacked,
)
from qatfx.spec import QuantSpec


def _dequantize(packed, scales, zeros, group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    nibbles = reference.unpack_nibbles(packed, elements_per_group(group_size, 2 * packed.shape[-1]))
    return reference.dequantize(nibbles, scales, zeros, group_size, out_dtype)


@torch.library.custom_op("qatfx::dequantize_int4_zp", mutates_args=())
def dequantize_int4_zp(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Asymmetric int4 weight in this format -> (N, K) out_dtype."""
    return _dequantize(packed, scales, zeros, group_size, out_dtype)


@dequantize_int4_zp.register_fake
def _(packed, scales, zeros, group_size, out_dtype):
    return two_per_byte_unpacked(packed, out_dtype)


class Int4ZeroPointPacked(WeightFormat):
    name = "int4_zp_packed"
    parts = ("packed", "scales", "zeros")
    dequantize_op = torch.ops.qatfx.dequantize_int4_zp.default

    def accepts(self, spec: QuantSpec) -> bool:
        return spec.bits == 4 and not spec.symmetric

    def layout_problem(self, spec, k):
        return two_per_byte_problem(self, spec, k)

    def pack(self, q, scale, zero, spec):
        tile = elements_per_group(spec.group_size, q.shape[-1])
        return {
            "packed": reference.pack_nibbles(q.to(torch.int16) - spec.qmin, tile),
            "scales": scale,
            "zeros": zero - spec.qmin,
        }

    def dequantize(self, parts: Sequence[Optional[torch.Tensor]], group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
        return _dequantize(*parts, group_size, out_dtype)

    def nbytes(self, spec, shape, weight_dtype):
        n, k = shape
        return n * k // 2 + qparam_bytes(spec, n, k, weight_dtype)

    def example_parts(self):
        n, k, g = 16, 64, PATTERN_GROUP_SIZE
        return [torch.zeros(n, k // 2, dtype=torch.uint8), torch.ones(n, k // g), torch.zeros(n, k // g)]

    @staticmethod
    def decompose_pattern(w_packed, w_scales, w_zeros):
        return torch.ops.qatfx.dequantize_int4_zp.default(w_packed, w_scales, w_zeros, PATTERN_GROUP_SIZE, PATTERN_DTYPE)

    @staticmethod
    def decompose_math(w_packed, w_scales, w_zeros, *, group_size, out_dtype):
        return _dequantize(w_packed, w_scales, w_zeros, group_size, out_dtype)
