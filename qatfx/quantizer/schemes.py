"""The ready-made quantizers: one scheme each, as torchao and llama.cpp define them."""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch

from qatfx.quantizer.base import Quantizer
from qatfx.spec import (
    QuantSpec,
    int4_per_group_weight,
    int8_per_channel_weight,
    int8_per_token_activation,
    q4_0_weight,
    q8_0_activation,
)


class Int8DynActInt4WeightQuantizer(Quantizer):
    """8da4w: int8 dynamic per-token asymmetric activations, int4 symmetric per-group
    weights; numerically identical to torchao's Int8DynActInt4WeightQATQuantizer.

    group_size: weight group size along the input dim (torchao's default 256).
    scales_precision: dtype of the weight scales (float32, or bfloat16 to save bytes).
    embedding_spec: see `Quantizer` (None: embeddings stay in float).
    legacy_eps: see `qatfx.spec.int8_per_token_activation`.
    """

    def __init__(
        self,
        group_size: int = 256,
        *,
        scales_precision: torch.dtype = torch.float32,
        legacy_eps: bool = True,
        skip: Iterable[str] = (),
        skip_types: Iterable[Union[str, type]] = (),
        embedding_spec: Optional[QuantSpec] = None,
        learnable_scales: bool = False,
    ) -> None:
        super().__init__(
            int8_per_token_activation(legacy_eps=legacy_eps),
            int4_per_group_weight(group_size, scales_precision),
            skip=skip,
            skip_types=skip_types,
            embedding_spec=embedding_spec,
            learnable_scales=learnable_scales,
        )
        self.group_size = group_size


class Int8DynActInt8WeightQuantizer(Quantizer):
    """8da8w: int8 dynamic per-token asymmetric activations, int8 symmetric per-channel
    weights (scale = absmax / 127.5, codes in [-128, 127]); ExecuTorch's 8da8w output layer.

    With scales_precision equal to the model's dtype and legacy_eps=False it is numerically
    torchao 0.18's `QATConfig(Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8,
    weight_granularity=PerAxis(0)))` (which computes scales in the model's dtype).

    scales_precision: dtype of the weight scales (float32; bfloat16 / float16 store what
        XNNPACK and GGUF hold, so the trained grid is the exported one).
    legacy_eps: the activations' eps rule (see `qatfx.spec.int8_per_token_activation`);
        False by default, as torchao's config does.
    embedding_spec: see `Quantizer` (None: embeddings stay in float); a table tied to a
        quantized 8da8w linear needs `spec.int8_per_row_embedding(scales_precision)`.
    """

    def __init__(
        self,
        *,
        scales_precision: torch.dtype = torch.float32,
        legacy_eps: bool = False,
        skip: Iterable[str] = (),
        skip_types: Iterable[Union[str, type]] = (),
        embedding_spec: Optional[QuantSpec] = None,
        learnable_scales: bool = False,
    ) -> None:
        super().__init__(
            int8_per_token_activation(legacy_eps=legacy_eps),
            int8_per_channel_weight(scales_precision),
            skip=skip,
            skip_types=skip_types,
            embedding_spec=embedding_spec,
            learnable_scales=learnable_scales,
        )


class Int8WeightOnlyQuantizer(Quantizer):
    """int8 symmetric per-channel weights, float activations."""

    def __init__(
        self, *, skip: Iterable[str] = (), skip_types: Iterable[Union[str, type]] = (), learnable_scales: bool = False
    ) -> None:
        super().__init__(None, int8_per_channel_weight(), skip=skip, skip_types=skip_types, learnable_scales=learnable_scales)


class Int4WeightOnlyQuantizer(Quantizer):
    """int4 symmetric per-group weights, float activations."""

    def __init__(
        self,
        group_size: int = 128,
        *,
        scales_precision: torch.dtype = torch.float32,
        skip: Iterable[str] = (),
        skip_types: Iterable[Union[str, type]] = (),
        embedding_spec: Optional[QuantSpec] = None,
        learnable_scales: bool = False,
    ) -> None:
        super().__init__(
            None, int4_per_group_weight(group_size, scales_precision), skip=skip, skip_types=skip_types,
            embedding_spec=embedding_spec,
            learnable_scales=learnable_scales,
        )
        self.group_size = group_size


class LlamaCppQuantizer(Quantizer):
    """Trains on llama.cpp's CPU arithmetic for Q4_0 weights x Q8_0 activations.

    Weights: `spec.q4_0_weight()`, torchao's symmetric int4 rule in groups of 32 along K
    with fp16 scales; a group's codes + 8 and its scale are a Q4_0 block as they are
    (qatfx.export.gguf writes them so; llama-quantize would recompute them from floats).
    Activations: `spec.q8_0_activation()`, what llama.cpp does to a linear's input before
    its Q4_0 x Q8_0 dot product (ggml quantize_row_q8_0, x86 AVX/AVX2 path): per block
    of 32 along K, d = absmax / 127 stored as fp16(d), codes round-half-even(x * (127 /
    absmax)) in [-127, 127], values codes * fp16(d) (scale_rule="ggml"). Codes and scales
    are llama.cpp's bit for bit in float32 models. ARM NEON and the scalar reference
    (quantize_row_q8_0_ref) round x * (1 / d) instead, the reference half away from zero,
    so there a code can differ by one at ulp-level ties. In a bfloat16 model the rule runs
    in bfloat16 (the multiplier and x * m), so codes are not llama.cpp's float32 ones.

    Layers whose in_features is not a multiple of 32 are skipped (both grids need whole
    blocks), as are those named by skip / skip_types. embedding_spec: see `Quantizer`; a
    table tied to a quantized linear needs `spec.q4_0_weight()`.
    """

    def __init__(
        self,
        *,
        skip: Iterable[str] = (),
        skip_types: Iterable[Union[str, type]] = (),
        embedding_spec: Optional[QuantSpec] = None,
        learnable_scales: bool = False,
    ) -> None:
        super().__init__(
            q8_0_activation(), q4_0_weight(), skip=skip, skip_types=skip_types, embedding_spec=embedding_spec,
            learnable_scales=learnable_scales,
        )
        self.group_size = 32
