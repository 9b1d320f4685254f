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

# Scale rules (QuantSpec.scale_rule; the ops' `scale_rule` argument).
TORCHAO = "torchao"
GGML = "ggml"
SCALE_RULES = (TORCHAO, GGML)


def check_scale_rule(scale_rule: str, symmetric: bool) -> None:
    """Raise a ValueError naming the fix for a scale rule the numerics do not define."""
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"unknown scale_rule {scale_rule!r}; use one of {SCALE_RULES}")
    if scale_rule == GGML and not symmetric:
        raise ValueError('scale_rule="ggml" scales by absmax, so it needs symmetric=True (or use scale_rule="torchao")')


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
    narrow: drop the most negative value of a signed grid, [-(2^(b-1)-1), 2^(b-1)-1]
        (int8: [-127, 127], llama.cpp's Q8_0), so a symmetric scale is absmax / 127.
    symmetric: zero point 0 and the scale from absmax (see `scale_rule`); otherwise
        asymmetric with an integer zero point.
    dynamic: qparams recomputed from the current tensor on every call (the only mode
        qatfx supports for activations; weights are always recomputed during training and
        frozen by convert).
    eps: smallest allowed scale; None means `finfo(x.dtype).smallest_normal`.
    scale_dtype: dtype scales (and zero points) are cast to after being computed in the
        input dtype; None keeps the input dtype.
    scale_rule: how a symmetric spec turns absmax into codes, with h = (qmax - qmin) / 2
        (7.5 for int4, 127 for narrow int8) and everything in the input dtype:
        "torchao" (torchao's rule, the default):
            s = max(absmax / h, eps) cast to scale_dtype;  q = clamp(round(x * (1 / s)))
            so codes are rounded with the *cast* scale.
        "ggml" (llama.cpp's quantize_row_q8_0, x86 AVX/AVX2 path):
            m = h / absmax (0 where absmax == 0);          q = clamp(round(x * m))
            s = max(absmax / h, eps) cast to scale_dtype,  used only to dequantize
            so codes are rounded with the uncast multiplier, and q * s uses the cast scale.
        `round` is ties-to-even in both; x_fq = q * s.
    learnable: weights only. The scale (and an asymmetric spec's zero point) is a trained
        parameter instead of being recomputed from the tensor: initialised by the rule
        above, trained with the LSQ gradient, rounded to scale_dtype in every forward, and
        stored by convert as trained (reference.fake_quantize_learned, docs/learnable_scales.md).
        Codes are then round(x * (1 / s)) whatever the rule: the "ggml" rule only gives the
        starting scale (its multiplier h / absmax has no trained counterpart); a Q8_0 block
        is still codes and d = s.
    """

    bits: int
    granularity: Granularity
    symmetric: bool
    signed: bool = True
    dynamic: bool = True
    eps: Optional[float] = None
    scale_dtype: Optional[torch.dtype] = torch.float32
    narrow: bool = False
    scale_rule: str = TORCHAO
    learnable: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits must be in [2, 8], got {self.bits}")
        if self.symmetric and not self.signed:
            raise ValueError("a symmetric spec needs a signed integer grid (signed=True)")
        if self.narrow and not self.signed:
            raise ValueError("narrow=True drops the most negative value of a signed grid; use signed=True or narrow=False")
        if self.eps is not None and not self.eps > 0:
            raise ValueError(f"QuantSpec.eps must be positive, got {self.eps}")
        check_scale_rule(self.scale_rule, self.symmetric)

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

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
        """Keyword arguments for `qatfx::fake_quantize` / `qatfx::quantize_dynamic`.
        `narrow` is carried by qmin; `scale_rule` only when it is not the default, so a
        torchao-rule graph has the same nodes as before the option existed."""
        kwargs = dict(
            qmin=self.qmin,
            qmax=self.qmax,
            group_size=self.group_size,
            symmetric=self.symmetric,
            eps=self.eps,
            scale_dtype=self.scale_dtype,
        )
        if self.scale_rule != TORCHAO:
            kwargs["scale_rule"] = self.scale_rule
        return kwargs

    def describe(self) -> str:
        g = self.granularity
        gran = f"group{g.group_size}" if isinstance(g, PerGroup) else type(g).__name__
        kind = "sym" if self.symmetric else "asym"
        extras = ("/narrow" if self.narrow else "") + ("" if self.scale_rule == TORCHAO else f"/{self.scale_rule}")
        extras += "/learned" if self.learnable else ""
        return f"{'int' if self.signed else 'uint'}{self.bits}/{gran}/{kind}{extras}"


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


def int8_per_channel_weight(scale_dtype: torch.dtype = torch.float32) -> QuantSpec:
    """int8 symmetric per-channel weights, scale = absmax / 127.5 (torchao's rule, codes in
    [-128, 127]): the weights of torchao's Int8DynamicActivationIntxWeightConfig(weight_dtype=
    torch.int8, weight_granularity=PerAxis(0)) and of ExecuTorch's 8da8w output layer."""
    return QuantSpec(8, PerChannel(), symmetric=True, scale_dtype=scale_dtype)


# Embedding tables (V, D): groups run along D, the last dim, as for any weight.


def int4_per_group_embedding(group_size: int = 32, scale_dtype: torch.dtype = torch.float32) -> QuantSpec:
    """int4 symmetric per-group embedding table (ExecuTorch's `--embedding-quantize 4,32`);
    the same rule as `int4_per_group_weight`, so a tied lm_head can share one grid."""
    return int4_per_group_weight(group_size, scale_dtype)


def int8_per_row_embedding(scale_dtype: torch.dtype = torch.float32) -> QuantSpec:
    """int8 symmetric embedding table, one scale per row (`--embedding-quantize 8,0`); the
    same rule as `int8_per_channel_weight`, so a tied 8da8w lm_head shares one grid."""
    return int8_per_channel_weight(scale_dtype)


# llama.cpp's CPU formats (docs/numerics_for_users.md, "llama.cpp's Q4_0 x Q8_0").

# fp16(x) is 0 for every x <= 2^-25 (half the smallest fp16 subnormal, a tie that rounds to
# even, 0), so with this eps fp16(max(absmax / 127, eps)) == fp16(absmax / 127) for every
# block: all-zero blocks store scale 0 as llama.cpp does, and no other block moves. It is
# the largest eps with that property; any smaller one is exact too.
Q8_0_EPS = 2.0**-25


def q8_0_activation() -> QuantSpec:
    """llama.cpp's Q8_0 activations on the x86 AVX/AVX2 path: blocks of 32 along the last
    dim, codes round(x * (127 / absmax)) in [-127, 127], dequantized with fp16(absmax / 127)."""
    return QuantSpec(
        8, PerGroup(32), symmetric=True, narrow=True, scale_rule=GGML, eps=Q8_0_EPS, scale_dtype=torch.float16
    )


# torchao's rule rounds with 1 / s computed in the scale's dtype, and in fp16 that is inf
# for s < 1/65520: every zero of such a group becomes 0 * inf = NaN and every other value
# saturates. The default eps (finfo(w.dtype).smallest_normal) does not prevent it, so one
# all-zero group would poison training. 2^-15 is the smallest power of two whose fp16
# reciprocal is finite (and exact in bf16 too, where weights compute their scales); only
# groups with absmax < 7.5 * 2^-15 = 2.3e-4 get it, whose fp16 scale is subnormal anyway.
Q4_0_EPS = 2.0**-15


def q4_0_weight() -> QuantSpec:
    """llama.cpp's Q4_0 weights: torchao's int4 rule in groups of 32 with fp16 scales maps
    onto Q4_0 losslessly (code + 8, d = scale): `int4_per_group_weight(32, torch.float16)`
    and eps = Q4_0_EPS, so all-zero and tiny groups quantize to 0 and small values instead
    of NaN."""
    return QuantSpec(4, PerGroup(32), symmetric=True, eps=Q4_0_EPS, scale_dtype=torch.float16)


def q8_0_weight() -> QuantSpec:
    """llama.cpp's Q8_0 weights (and token embeddings): the same grid as `q8_0_activation`,
    blocks of 32 along K, codes in [-127, 127], fp16 scales d = fp16(absmax / 127). A block's
    codes and its fp16 scale are a Q8_0 block as they are (qatfx.export.gguf writes them so)."""
    return q8_0_activation()


def scheme_name(input_spec: Optional[QuantSpec], weight_spec: Optional[QuantSpec]) -> str:
    """torchao-style short name of a layer's scheme: 8da4w (int8 dynamic activations, int4
    weights), 8da8w, 4w, 8w; "ggml-8da4w" for llama.cpp's Q8_0 x Q4_0; "float" for none."""
    if weight_spec is None:
        return "float"
    if input_spec is not None and input_spec.scale_rule != TORCHAO:
        return f"{input_spec.scale_rule}-{input_spec.bits}da{weight_spec.bits}w"
    weights = f"{weight_spec.bits}w"
    return weights if input_spec is None else f"{input_spec.bits}da{weights}"
