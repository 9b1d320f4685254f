"""Exports of converted models to serving runtimes: `qatfx.export.executorch` (an XNNPACK
`.pte`, checked against the converted model by `verify_pte`), `qatfx.export.gguf` (a
llama.cpp GGUF file holding the trained grid, checked by `verify_gguf`) and `qatfx.export.hf`
(a compressed-tensors directory for transformers / vLLM, checked by `verify_hf`). Each imports
its runtime only when called. `qatfx.export.peft.save_peft_adapters` writes a prepared model's
LoRA adapters alone, in the layout the `peft` package loads."""

from qatfx.export.executorch import ExecuTorchExport, ExportError, executorch
from qatfx.export.verify import VerificationError, VerifyReport, held_out_inputs, verify_pte
from qatfx.export.executorch_generate import GenerationExport, PteDecoder, executorch_generate, generate_pte
from qatfx.export.gguf import GGUFExport, gguf, verify_gguf
from qatfx.export.hf import HfExport, HfVerifyReport, hf, verify_hf
from qatfx.export.peft import save_peft_adapters

__all__ = ["ExecuTorchExport", "ExportError", "VerificationError", "VerifyReport", "executorch", "held_out_inputs", "verify_pte"]
__all__ += ["GenerationExport", "PteDecoder", "executorch_generate", "generate_pte"]
__all__ += ["GGUFExport", "gguf", "verify_gguf"]
__all__ += ["HfExport", "HfVerifyReport", "hf", "verify_hf"]
__all__ += ["save_peft_adapters"]
