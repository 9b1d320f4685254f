"""torchao 0.18 as the reference implementation (test-only import)."""

from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore", module="torchao")

from torchao.quantization.linear_quant_modules import Int8DynActInt4WeightQuantizer as TorchaoPTQ  # noqa: E402
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer  # noqa: E402
from torchao.quantization.qat.linear import (  # noqa: E402
    Int8DynActInt4WeightQATQuantizer as TorchaoQAT,
    _get_8da4w_activation_config,
    _get_8da4w_weight_config,
)


def activation_fake_quantizer() -> IntxFakeQuantizer:
    return IntxFakeQuantizer(_get_8da4w_activation_config(torch.float32))


def weight_fake_quantizer(group_size: int, scales_precision=torch.float32) -> IntxFakeQuantizer:
    return IntxFakeQuantizer(_get_8da4w_weight_config(group_size, scales_precision))


__all__ = ["TorchaoPTQ", "TorchaoQAT", "activation_fake_quantizer", "weight_fake_quantizer"]
