"""qatfx: compiler-pass based quantization-aware training for PyTorch.

    m = prepare_pt2e(model, Int8DynActInt4WeightQuantizer(group_size=32), (tokens,))
    ... train torch.compile(m) ...
    q = convert_pt2e(m)
"""

from qatfx import formats, ops, presets  # noqa: F401  formats / ops register the qatfx:: torch.library ops
from qatfx.api import (
    FakeQuantAfterNSteps,
    convert_pt2e,
    disable_fake_quant,
    enable_fake_quant,
    fake_quant_enabled,
    learned_qparams,
    merge_lora,
    prepare_pt2e,
    prepare_qat_pt2e,
)
from qatfx.capture import CaptureError
from qatfx.distillation import TeacherMemory, distillation_loss, frozen_teacher
from qatfx.module import QATGraphModule
from qatfx.passes.finite_check import NonFiniteWarning
from qatfx.passes.lora import LoRA
from qatfx.quantizer import (
    Int4WeightOnlyQuantizer,
    Int8DynActInt4WeightQuantizer,
    Int8DynActInt8WeightQuantizer,
    Int8WeightOnlyQuantizer,
    LlamaCppQuantizer,
    MixedQuantizer,
    Quantizer,
)
from qatfx.lean.compiled import compile_options
from qatfx.regional_compile import compile_regions
from qatfx.serialization import SerializationError, load, save
from qatfx.spec import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec
from qatfx.summary import QuantizationSummary, summary

__all__ = [
    "CaptureError",
    "FakeQuantAfterNSteps",
    "Int4WeightOnlyQuantizer",
    "Int8DynActInt4WeightQuantizer",
    "Int8DynActInt8WeightQuantizer",
    "Int8WeightOnlyQuantizer",
    "LlamaCppQuantizer",
    "MixedQuantizer",
    "LoRA",
    "NonFiniteWarning",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "PerToken",
    "QATGraphModule",
    "QuantSpec",
    "QuantizationSummary",
    "Quantizer",
    "SerializationError",
    "TeacherMemory",
    "compile_options",
    "compile_regions",
    "convert_pt2e",
    "disable_fake_quant",
    "distillation_loss",
    "enable_fake_quant",
    "fake_quant_enabled",
    "frozen_teacher",
    "learned_qparams",
    "load",
    "merge_lora",
    "prepare_pt2e",
    "prepare_qat_pt2e",
    "save",
    "summary",
]

# Subpackages reached as attributes after `import qatfx` (`qatfx.export.gguf(...)`), imported
# on first use so that `import qatfx` loads no runtime (ExecuTorch, gguf, transformers).
_LAZY_SUBPACKAGES = ("debug", "export", "integrations")


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f"qatfx.{name}")
    raise AttributeError(f"module 'qatfx' has no attribute {name!r}")
