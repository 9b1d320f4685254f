"""The spec language: how one tensor is quantized.

A `QuantSpec` is a frozen description (bit width, granularity, symmetry, dynamic or not,
eps, scale dtype). Quantizers write specs into `node.meta`; prepare and convert read them
generically, so a new scheme is a new combination of specs, not new pass code.

Every granularity is expressed as groups along the last dimension, which is what the ops
take (`group_size`):

    PerToken / PerChannel  -> one group per row of the last dim   (group_size = ROW)
    PerGroup(G)            -> groups of G along the last dim       (group_size = G)
    PerTensor              -> one group for the whole tensor       (group_size = TENSOR)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

# Sentinels for the ops' `group_size` argument.
ROW = -1
TENSOR = 0


@dataclass(frozen=True)
class PerToken:
    """One scale per row of the last dim of an activation (a token)."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel of a weight (a row of the (N, K) weight)."""


@dataclass(frozen=True)
class PerGroup:
    """One scale per `group_size` consecutive elements along the input (last) dim."""

    group_size: int

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"PerGroup group_size must be >= 2, got {self.group_size}")


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


Granularity = Union[PerToken, PerChannel, PerGroup, PerTensor]


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    bits / signed: the integer grid; signed b bits is [-2^(b-1), 2^(b-1)-1].
    symmetric: zero point 0 and scale = absmax / ((qmax - qmin) / 2) (torchao's rule);
        otherwise asymmetric with an integer zero point.
    dynamic: qparams recomputed from the current tensor on every call (the only mode
        qatfx supports for activations; weights are always recomputed during training and
        frozen by convert).
    eps: smallest allowed scale; None means `finfo(x.dtype).smallest_normal`.
    scale_dtype: dtype scales (and zero points) are cast to after being computed in the
        input dtype; None keeps the input dtype.
    """

    bits: int
    granularity: Granularity
    symmetric: bool
    signed: bool = True
    dynamic: bool = True
    eps: Optional[float] = None
    scale_dtype: Optional[torch.dtype] = torch.float32

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits must be in [2, 8], got {self.bits}")
        if self.symmetric and not self.signed:
            raise ValueError("a symmetric spec needs a signed integer grid (signed=True)")
        if self.eps is not None and not self.eps > 0:
            raise ValueError(f"QuantSpec.eps must be positive, got {self.eps}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def group_size(self) -> int:
        """The ops' `group_size` argument for this granularity."""
        g = self.granularity
        if isinstance(g, PerGroup):
            return g.group_size
        if isinstance(g, PerTensor):
            return TENSOR
        return ROW

    def op_kwargs(self) -> dict:
        """Keyword arguments for `qatfx::fake_quantize` / `qatfx::quantize_dynamic`."""
        return dict(
            qmin=self.qmin,
            qmax=self.qmax,
            group_size=self.group_size,
            symmetric=self.symmetric,
            eps=self.eps,
            scale_dtype=self.scale_dtype,
        )

    def describe(self) -> str:
        g = self.granularity
        gran = f"group{g.group_size}" if isinstance(g, PerGroup) else type(g).__name__
        kind = "sym" if self.symmetric else "asym"
        return f"{'int' if self.signed else 'uint'}{self.bits}/{gran}/{kind}"


# The 8da4w specs, exactly torchao's Int8DynActInt4WeightQATQuantizer (see docs/numerics.md).
FP32_EPS = torch.finfo(torch.float32).eps


def int8_per_token_activation(*, legacy_eps: bool = True) -> QuantSpec:
    """int8 asymmetric per-token dynamic activations.

    legacy_eps=True is torchao's Int8DynActInt4WeightQATQuantizer: eps = fp32 eps and
    qparams cast to float32. legacy_eps=False is torchao's newer
    Int8DynamicActivationIntxWeightConfig QAT: eps = finfo(x.dtype).smallest_normal and
    qparams in x.dtype (identical in fp32, different in bf16).
    """
    if legacy_eps:
        return QuantSpec(8, PerToken(), symmetric=False, eps=FP32_EPS, scale_dtype=torch.float32)
    return QuantSpec(8, PerToken(), symmetric=False, eps=None, scale_dtype=None)


def int4_per_group_weight(group_size: int, scale_dtype: torch.dtype = torch.float32) -> QuantSpec:
    """int4 symmetric per-group weights, scale = absmax / 7.5 (torchao's rule)."""
    return QuantSpec(4, PerGroup(group_size), symmetric=True, scale_dtype=scale_dtype)


# Embedding tables (V, D): groups run along D, the last dim, as for any weight.


def int4_per_group_embedding(group_size: int = 32, scale_dtype: torch.dtype = torch.float32) -> QuantSpec:
    """int4 symmetric per-group embedding table (ExecuTorch's `--embedding-quantize 4,32`);
    the same rule as `int4_per_group_weight`, so a tied lm_head can share one grid."""
    return int4_per_group_weight(group_size, scale_dtype)


def int8_per_row_embedding(scale_dtype: torch.dtype = torch.float32) -> QuantSpec:
    """int8 symmetric embedding table, one scale per row (`--embedding-quantize 8,0`)."""
    return QuantSpec(8, PerChannel(), symmetric=True, scale_dtype=scale_dtype)
