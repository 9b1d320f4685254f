"""torchao 0.18 as the reference implementation (test-only import)."""

from __future__ import annotations

import warnings

import torch

warnings.filterwarnings("ignore", module="torchao")

from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, quantize_  # noqa: E402
from torchao.quantization.linear_quant_modules import Int8DynActInt4WeightQuantizer as TorchaoPTQ  # noqa: E402
from torchao.quantization.qat import QATConfig  # noqa: E402
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer  # noqa: E402
from torchao.quantization.qat.linear import (  # noqa: E402
    Int8DynActInt4WeightQATQuantizer as TorchaoQAT,
    _get_8da4w_activation_config,
    _get_8da4w_weight_config,
)


def prepare_8da8w_qat(model: torch.nn.Module) -> torch.nn.Module:
    """torchao's 8da8w QAT (in place): QATConfig of Int8DynamicActivationIntxWeightConfig with
    int8 per-channel weights (scales and activation qparams in the model's dtype)."""
    quantize_(model, QATConfig(_8da8w_config(), step="prepare"))
    return model


def quantize_8da8w_ptq(model: torch.nn.Module) -> torch.nn.Module:
    """torchao's 8da8w PTQ (in place) of the same config."""
    quantize_(model, _8da8w_config())
    return model


def _8da8w_config() -> Int8DynamicActivationIntxWeightConfig:
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))


def activation_fake_quantizer() -> IntxFakeQuantizer:
    return IntxFakeQuantizer(_get_8da4w_activation_config(torch.float32))


def weight_fake_quantizer(group_size: int, scales_precision=torch.float32) -> IntxFakeQuantizer:
    return IntxFakeQuantizer(_get_8da4w_weight_config(group_size, scales_precision))


__all__ = [
    "TorchaoPTQ", "TorchaoQAT", "activation_fake_quantizer", "prepare_8da8w_qat", "quantize_8da8w_ptq", "weight_fake_quantizer",
]
