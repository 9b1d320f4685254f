"""Integer codes one per byte, with scales and optional zero points: any bit width and
granularity (int8, int3, per-channel, per-tensor, asymmetric). The fallback format.

Parts of an (N, K) weight:
    packed  (N, K) int8 (signed grid) or uint8 (unsigned grid): the codes as they are
    scales  (N, K // G), (N, 1) or (1,) in the spec's scale dtype
    zeros   same shape and dtype as scales; asymmetric specs only

Its op, `qatfx::dequantize`, is also what dequantizes a dynamically quantized activation
(codes, per-token scale and zero point), so this format's decomposition covers both.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from qatfx import reference
from qatfx.formats.base import PATTERN_DTYPE, PATTERN_GROUP_SIZE, WeightFormat, qparam_bytes
from qatfx.ops import dequantize
from qatfx.spec import QuantSpec


class IntCodes(WeightFormat):
    name = "int_codes"
    parts = ("packed", "scales", "zeros")
    dequantize_op = dequantize

    def accepts(self, spec: QuantSpec) -> bool:
        return True

    def pack(self, q, scale, zero, spec):
        return {"packed": q, "scales": scale, "zeros": zero}

    def dequantize(self, parts: Sequence[Optional[torch.Tensor]], group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
        q, scale, zero = parts
        return reference.dequantize(q, scale, zero, group_size, out_dtype)

    def nbytes(self, spec, shape, weight_dtype):
        n, k = shape
        return n * k + qparam_bytes(spec, n, k, weight_dtype)

    def example_parts(self):
        m, k = 6, 64  # an activation's shape: (tokens, K) codes with per-token qparams
        return [torch.ones(m, k, dtype=torch.int8), torch.ones(m, 1), torch.zeros(m, 1)]

    @staticmethod
    def decompose_pattern(q, scale, zero):
        return dequantize(q, scale, zero, PATTERN_GROUP_SIZE, PATTERN_DTYPE)

    @staticmethod
    def decompose_math(q, scale, zero, *, group_size, out_dtype):
        return reference.dequantize(q, scale, zero, group_size, out_dtype)
