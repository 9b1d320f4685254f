"""The schemes real QAT checkpoints ship with, one MixedQuantizer each, named by where the
model is deployed. Each docstring names the recipe it reproduces.

    qatfx.prepare_pt2e(model, qatfx.presets.executorch_llama(), (tokens,))
    qatfx finetune --preset executorch_llama

The output projection is found by name: "lm_head" (transformers, qatfx's CausalLM) or
"output" (torchtune, ExecuTorch's Llama); a tied one is matched by its module path too.
"""

from __future__ import annotations

from typing import Callable

import torch

from qatfx.quantizer import (
    Int4WeightOnlyQuantizer,
    Int8DynActInt4WeightQuantizer,
    Int8DynActInt8WeightQuantizer,
    LlamaCppQuantizer,
    MixedQuantizer,
    Quantizer,
)
from qatfx.spec import int8_per_row_embedding, q8_0_activation, q8_0_weight

OUTPUT_LAYERS = ("lm_head", "*.lm_head", "output")


def executorch_llama(group_size: int = 32) -> MixedQuantizer:
    """ExecuTorch's Llama QAT recipe (examples/models/llama/config/llama_xnnpack_qat.yaml:
    `preq_mode: preq_8da4w_out_8da8w`, `preq_group_size: 32`, `preq_embedding_quantize: 8,0`):

    - every linear but the output: 8da4w, int4 groups of `group_size` with bfloat16 scales
      (XNNPACK stores groupwise scales in bfloat16, so the trained grid is the one it runs);
    - the output projection: 8da8w, int8 per-channel weights with float32 scales (XNNPACK's
      per-channel int8 weights keep float32 scales);
    - token embeddings: int8, one float32 scale per row (ExecuTorch's quantized embedding
      kernel); a tied output shares this grid (the same spec).
    """
    embeddings = int8_per_row_embedding(torch.float32)
    return MixedQuantizer(
        [(OUTPUT_LAYERS, Int8DynActInt8WeightQuantizer(embedding_spec=embeddings))],
        default=Int8DynActInt4WeightQuantizer(group_size, scales_precision=torch.bfloat16, embedding_spec=embeddings),
    )


def llama_cpp_q4_0() -> MixedQuantizer:
    """llama.cpp's Q4_0 checkpoints (Gemma 3 QAT's q4_0 GGUFs; `llama-quantize ... Q4_0`,
    which keeps `output.weight` and, with --token-embedding-type q8_0, `token_embd.weight`
    at 8 bits):

    - every linear but the output: Q4_0 weights x Q8_0 activations on llama.cpp's CPU
      arithmetic (`LlamaCppQuantizer`);
    - the output projection: Q8_0 weights x Q8_0 activations (`spec.q8_0_weight()`, blocks
      of 32, fp16 scales: each block is a Q8_0 block as it is);
    - token embeddings: Q8_0 (the same grid; a tied output shares it).
    """
    embeddings = q8_0_weight()
    return MixedQuantizer(
        [(OUTPUT_LAYERS, Quantizer(q8_0_activation(), q8_0_weight(), embedding_spec=embeddings))],
        default=LlamaCppQuantizer(embedding_spec=embeddings),
    )


def vllm_w4a16(group_size: int = 128, *, scales_precision: torch.dtype = torch.bfloat16) -> MixedQuantizer:
    """vLLM's W4A16 (llm-compressor's `W4A16` scheme: int4 symmetric groups of 128 along K,
    `ignore: ["lm_head"]`, what `qatfx.export.hf` writes as compressed-tensors
    pack-quantized): int4 weight-only linears with `scales_precision` scales (bfloat16:
    vLLM serves in bfloat16 / float16 and casts the scales to it), the output projection and
    the embeddings in float.
    """
    return MixedQuantizer(
        [(OUTPUT_LAYERS, None)],
        default=Int4WeightOnlyQuantizer(group_size, scales_precision=scales_precision),
    )


PRESETS: dict[str, Callable[[], MixedQuantizer]] = {
    "executorch_llama": executorch_llama,
    "llama_cpp_q4_0": llama_cpp_q4_0,
    "vllm_w4a16": vllm_w4a16,
}


def preset(name: str) -> MixedQuantizer:
    """The preset called `name` with its default arguments (the CLI's `--preset`)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown qatfx preset {name!r}; choose one of {', '.join(PRESETS)}") from None
