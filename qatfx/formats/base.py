"""What a stored weight format is: the one owner of "how a quantized weight is stored".

A spec (qatfx/spec.py) says which numbers a weight takes: integer codes q, scales s, zero
points z, with w ~ (q - z) * s per group. A format says how those numbers are laid out in
the converted model, and everything that follows from the layout:

- `pack`: convert's buffers, named `<weight>_<part>` for each of `parts`;
- `dequantize_op`: the opaque op convert puts in the graph, called as
  `op(*parts, group_size, out_dtype)`, and `dequantize`, its reference math (the op's
  eager implementation and the lowering's decomposition both call it);
- `nbytes`: the bytes the parts take, which the summary reports;
- `decompose_pattern` / `decompose_math`: the lowering rule that turns the op back into
  aten math for Inductor (written as plain functions: the lowering wraps them);
- `example_parts`: small tensors of the parts' dtypes and ranks, to trace patterns with.

A fused-linear kernel for a format lives in qatfx/lowering/ and finds the format here by name.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from qatfx.spec import ROW, TENSOR, QuantSpec

# Literals a dequantize pattern is traced with; the pattern matches any value there.
PATTERN_GROUP_SIZE = 32
PATTERN_DTYPE = torch.float32


class WeightFormat(abc.ABC):
    name: ClassVar[str]
    # Buffer suffixes in the dequantize op's argument order; a part `pack` returns as None
    # (a symmetric spec's zero points) is not stored and is passed to the op as None.
    parts: ClassVar[tuple[str, ...]]
    dequantize_op: ClassVar[torch._ops.OpOverload]

    @abc.abstractmethod
    def accepts(self, spec: QuantSpec) -> bool:
        """Whether this format stores weights quantized with `spec`."""

    @abc.abstractmethod
    def pack(
        self, q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], spec: QuantSpec
    ) -> dict[str, Optional[torch.Tensor]]:
        """The parts for codes `q` (N, K) (reference.quantize) and their qparams."""

    @abc.abstractmethod
    def dequantize(self, parts: Sequence[Optional[torch.Tensor]], group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
        """(N, K) out_dtype from the parts in `parts` order: the op's reference math."""

    @abc.abstractmethod
    def nbytes(self, spec: QuantSpec, shape: tuple[int, int], weight_dtype: torch.dtype) -> int:
        """Bytes of the parts `pack` stores for an (N, K) weight of `weight_dtype`."""

    @abc.abstractmethod
    def example_parts(self) -> list[torch.Tensor]:
        """Small parts (K = 64, group size 32) of the dtypes and ranks convert stores, to
        trace the lowering patterns with."""

    # The lowering rule, as two static methods (plain functions: Inductor traces them, and
    # binds the pattern's arguments to the replacement's by name, one per part):
    #   decompose_pattern(*parts): the op called with PATTERN_GROUP_SIZE / PATTERN_DTYPE,
    #       which match any value;
    #   decompose_math(*parts, group_size, out_dtype): `dequantize` as aten ops.
    decompose_pattern: ClassVar[Callable[..., torch.Tensor]]
    decompose_math: ClassVar[Callable[..., torch.Tensor]]

    def layout_problem(self, spec: QuantSpec, k: int) -> Optional[str]:
        """Why a weight with K = `k` input features cannot be stored in this format (the
        quantizer skips the layer with this reason), or None."""
        return None

    def op_args(self, parts: dict[str, Any], group_size: int, out_dtype: torch.dtype) -> tuple:
        """Arguments of `dequantize_op` for `parts` (tensors or graph nodes by part name)."""
        return (*(parts.get(part) for part in self.parts), group_size, out_dtype)

    def __repr__(self) -> str:
        return f"<weight format {self.name}: {', '.join(self.parts)}>"


# ---- shared arithmetic of the formats ------------------------------------------------------


def two_per_byte_unpacked(packed: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) result of dequantizing an (N, K // 2) two-per-byte weight: the fake
    (shape-only) kernel of such a format's dequantize op."""
    n, half_k = packed.shape
    return packed.new_empty((n, 2 * half_k), dtype=out_dtype)


def elements_per_group(group_size: int, k: int) -> int:
    """Elements sharing one scale along K: the whole row for ROW (per channel)."""
    return k if group_size == ROW else group_size


def two_per_byte_problem(fmt: WeightFormat, spec: QuantSpec, k: int) -> Optional[str]:
    """A two-codes-per-byte format packs each group (each row, per channel) in halves."""
    if elements_per_group(spec.group_size, k) % 2:
        return f"in_features {k} is odd; the {fmt.name} format stores two int4 codes per byte and needs an even K"
    return None


def qparam_count(spec: QuantSpec, n: int, k: int) -> int:
    """How many scales (or zero points) an (N, K) weight quantized with `spec` has."""
    if spec.group_size == TENSOR:
        return 1
    return n * (k // elements_per_group(spec.group_size, k))


def qparam_bytes(spec: QuantSpec, n: int, k: int, weight_dtype: torch.dtype) -> int:
    """Bytes of the scales, plus the zero points of an asymmetric spec (same dtype)."""
    itemsize = (spec.scale_dtype or weight_dtype).itemsize
    return qparam_count(spec, n, k) * itemsize * (1 if spec.symmetric else 2)
