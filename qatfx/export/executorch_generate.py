"""`qatfx.export.executorch_generate(converted, path)`: a `.pte` that generates with a static
KV cache, for a Hugging Face decoder-only LM converted by qatfx; `generate_pte` decodes with it
greedily in ExecuTorch's runtime.

The converted model must be a region capture of the HF model prepared with `use_cache=True`
(docs/regions.md): its q/k/v/o projections, MLPs and lm_head are qatfx graphs and the
attention code with its cache is the model's own Python. So transformers' own exporter
wrapper (`TorchExportableModuleWithStaticCache`: a `StaticCache` whose tensors are module
buffers, forward(input_ids, cache_position) -> logits) takes the model as it is, after every
region graph is rewritten into XNNPACK's 8da4w patterns (`rewritten_copy`). The program is
exported once with a dynamic prompt length (prefill) that also serves single-token decode.

The export is strict (TorchDynamo), as transformers' `convert_and_export_with_cache` does:
non-strict export fakes the module's buffers, but the cache layer objects keep references to
the real tensors, so their in-place updates land on lifted constants and lowering fails
(`AssertionError: expected compiled_fn to be GraphModule`; docs/export_executorch_generation.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from qatfx.export.executorch import (
    ExecuTorchExport,
    ExportError,
    _differences,
    _executorch,
    delegation,
    rewritten_copy,
    weight_kinds,
    write_program,
)
from qatfx.graph.meta import CONVERTED
from qatfx.graph.regions import graph_regions, model_stage
from qatfx.module import copy_model_sharing_tensors
from qatfx.summary import summary

log = logging.getLogger("qatfx.export")

# The program's metadata, as ExecuTorch's LLM runner reads it (constant methods).
MAX_SEQ_LEN = "get_max_seq_len"
MAX_CONTEXT_LEN = "get_max_context_len"
MAX_PROMPT_LEN = "get_max_prompt_len"
VOCAB_SIZE = "get_vocab_size"
USE_KV_CACHE = "use_kv_cache"
DYNAMIC_SHAPE = "enable_dynamic_shape"


@dataclass
class GenerationExport(ExecuTorchExport):
    max_seq_len: int = 0  # cache length: prompt + generated tokens
    max_prompt_len: int = 0  # tokens one call takes (longer prompts are fed in chunks)

    def __str__(self) -> str:
        return super().__str__() + f"\n  static KV cache of {self.max_seq_len} positions; prompts of up to {self.max_prompt_len} tokens per call"


def _check_model(model: torch.nn.Module, allow_float: bool) -> None:
    stage = model_stage(model)
    regions = graph_regions(model)
    if stage is None and allow_float:
        return
    if stage != CONVERTED:
        raise ExportError(
            "qatfx.export.executorch_generate needs a module returned by qatfx.convert_pt2e "
            f"(got {'a module at stage ' + repr(stage) if stage else type(model).__name__}); convert it first "
            "(or pass allow_float=True to export a float model as the fp32 baseline)"
        )
    if regions and regions[0][0] == "":
        raise ExportError(
            "qatfx.export.executorch_generate needs a region capture (the model's own class, its attention "
            "code and KV cache in Python), got a whole-model graph; prepare the Hugging Face model with "
            "prepare_pt2e(model, quantizer, example_inputs, regions='auto') and its config use_cache=True"
        )


def _check_hf_model(model: torch.nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None or getattr(model, "generation_config", None) is None:
        raise ExportError(
            f"qatfx.export.executorch_generate exports Hugging Face causal LMs (a PreTrainedModel with config "
            f"and generation_config); got {type(model).__name__}. For other models use qatfx.export.executorch"
        )
    if not getattr(config.get_text_config(), "use_cache", False):
        raise ExportError(
            "the model's config has use_cache=False: build it with use_cache=True before prepare_pt2e "
            "(regions then split around the attention code and the KV cache stays usable)"
        )


def _static_cache_module(model: torch.nn.Module, max_seq_len: int) -> torch.nn.Module:
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    # `model` is our copy: its generation_config is too (deepcopy), the user's stays as it was
    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    return TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_seq_len, device=torch.device("cpu"))


def _export(wrapper: torch.nn.Module, max_prompt_len: int) -> torch.export.ExportedProgram:
    n = min(2, max_prompt_len)
    kwargs = {"input_ids": torch.full((1, n), 3, dtype=torch.long), "cache_position": torch.arange(n)}
    dynamic_shapes = None
    if max_prompt_len > 1:
        tokens = torch.export.Dim("tokens", min=1, max=max_prompt_len)
        dynamic_shapes = {"input_ids": {1: tokens}, "cache_position": {0: tokens}}
    with torch.no_grad():
        return torch.export.export(wrapper, (), kwargs, dynamic_shapes=dynamic_shapes, strict=True)


def _check_cache_updated(ep: torch.export.ExportedProgram, layers: int) -> None:
    """Each layer's K and V cache must be a buffer the program writes; a layer whose attention
    is inside a region graph (captured with use_cache=False) would never write it."""
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    missing = [f"{kind}_cache_{i}" for i in range(layers) for kind in ("key", "value") if f"{kind}_cache_{i}" not in mutated]
    if missing:
        raise ExportError(
            f"the exported program does not write the KV cache buffers {', '.join(missing)} (transformers' "
            "TorchExportableModuleWithStaticCache registers them): those layers' attention did not update the "
            "cache; prepare the model with config use_cache=True and regions='auto'"
        )


def executorch_generate(
    model: torch.nn.Module,
    path: Union[str, os.PathLike],
    *,
    max_seq_len: int = 128,
    max_prompt_len: Optional[int] = None,
    allow_float: bool = False,
) -> GenerationExport:
    """Write a converted HF causal LM (region capture, use_cache=True) to `path` as an
    ExecuTorch program with a static KV cache of `max_seq_len` positions, delegated to
    XNNPACK. The program's forward(input_ids (1, n), cache_position (n,)) -> logits (1, n,
    vocab) takes n <= `max_prompt_len` tokens per call (default: `max_seq_len`; 1 exports a
    static one-token program). `allow_float=True` accepts an unprepared float model (the fp32
    XNNPACK baseline)."""
    module = getattr(model, "_orig_mod", model)
    _check_model(module, allow_float)
    _check_hf_model(module)
    max_prompt_len = max_seq_len if max_prompt_len is None else max_prompt_len
    if not 1 <= max_prompt_len <= max_seq_len:
        raise ExportError(f"max_prompt_len={max_prompt_len} must be between 1 and max_seq_len={max_seq_len}")
    to_edge_transform_and_lower, XnnpackPartitioner = _executorch()
    quantized = model_stage(module) == CONVERTED
    if quantized:
        copy, weights, left = rewritten_copy(module)
    else:
        copy, weights, left = copy_model_sharing_tensors(module), [], []
    copy.eval()
    text_config = copy.config.get_text_config()
    metadata = {
        MAX_SEQ_LEN: max_seq_len, MAX_CONTEXT_LEN: max_seq_len, MAX_PROMPT_LEN: max_prompt_len,
        VOCAB_SIZE: text_config.vocab_size, USE_KV_CACHE: True, DYNAMIC_SHAPE: max_prompt_len > 1,
    }
    try:
        ep = _export(_static_cache_module(copy, max_seq_len), max_prompt_len)
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()], constant_methods=metadata)
        program = edge.to_executorch()
    except Exception as exc:
        raise ExportError(
            f"exporting {type(module).__name__} with a static KV cache failed: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}\n"
            "The model must be a region capture prepared with config use_cache=True (regions='auto' then keeps "
            "the attention code and its cache outside the graphs; a region holding a whole decoder layer, "
            "captured with use_cache=False, refuses the cache)"
        ) from exc
    _check_cache_updated(edge.exported_program(), text_config.num_hidden_layers)
    delegated, not_delegated = delegation(edge.exported_program(), weights, left)
    target = write_program(program, path)
    report = GenerationExport(
        path=target,
        bytes=len(program.buffer),
        quantized_layers=len(weights),
        delegated=delegated,
        not_delegated=not_delegated,
        float_layers=[f"{r.layer} ({r.skip_reason})" for r in summary(module).skipped] if quantized else [],
        differences=_differences(module) if quantized else [],
        weight_kinds=weight_kinds(copy, weights),
        max_seq_len=max_seq_len,
        max_prompt_len=max_prompt_len,
    )
    log.info("qatfx: %s", report)
    return report


class PteDecoder:
    """One sequence through a program from `executorch_generate`: `prefill(prompt)` fills the
    cache from position 0 (in chunks of `prompt_chunk` tokens, default the program's max
    prompt length), `step(token)`
    appends one token; both return the logits of the last position, shape (vocab,)."""

    def __init__(self, pte: Union[str, os.PathLike], *, prompt_chunk: Optional[int] = None) -> None:
        from executorch.runtime import Runtime

        program = Runtime.get().load_program(str(pte))
        names = program.method_names
        if MAX_SEQ_LEN not in names or MAX_PROMPT_LEN not in names:
            raise ExportError(f"{pte} has no {MAX_SEQ_LEN}/{MAX_PROMPT_LEN} methods: write it with qatfx.export.executorch_generate")
        self.max_seq_len = int(program.load_method(MAX_SEQ_LEN).execute([])[0])
        self.max_prompt_len = int(program.load_method(MAX_PROMPT_LEN).execute([])[0])
        # prompt tokens per call: the program's maximum, or fewer (1: token by token)
        self.prompt_chunk = self.max_prompt_len if prompt_chunk is None else prompt_chunk
        if not 1 <= self.prompt_chunk <= self.max_prompt_len:
            raise ValueError(f"prompt_chunk={prompt_chunk} must be between 1 and the program's max prompt length {self.max_prompt_len}")
        self.forward = program.load_method("forward")
        self.position = 0

    def _run(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        if self.position + n > self.max_seq_len:
            raise ValueError(
                f"position {self.position + n} is past the program's static KV cache ({self.max_seq_len} positions); "
                "export with a larger max_seq_len or generate fewer tokens"
            )
        logits = self.forward.execute([tokens, torch.arange(self.position, self.position + n)])[0]
        self.position += n
        return logits[0, -1]

    def prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1 or prompt_ids.shape[1] == 0:
            raise ValueError(f"prompt_ids must have shape (1, n) with n >= 1 (one sequence), got {tuple(prompt_ids.shape)}")
        prompt_ids = prompt_ids.to(torch.long).contiguous()
        self.position = 0  # the program resets the cache's length to cache_position[0]
        for start in range(0, prompt_ids.shape[1], self.prompt_chunk):
            logits = self._run(prompt_ids[:, start : start + self.prompt_chunk].contiguous())
        return logits

    def step(self, token: int) -> torch.Tensor:
        return self._run(torch.tensor([[token]], dtype=torch.long))


def generate_pte(
    pte: Union[str, os.PathLike, PteDecoder],
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_token_id: Optional[int] = None,
) -> torch.Tensor:
    """Greedy decoding in ExecuTorch's runtime: the prompt followed by up to `max_new_tokens`
    tokens, shape (1, n + new), as `model.generate(prompt_ids, do_sample=False, ...)` returns
    (stopping after `eos_token_id` when given)."""
    decoder = pte if isinstance(pte, PteDecoder) else PteDecoder(pte)
    logits = decoder.prefill(prompt_ids)
    new: list[int] = []
    while len(new) < max_new_tokens:
        new.append(int(logits.argmax()))
        if new[-1] == eos_token_id or len(new) == max_new_tokens:
            break
        logits = decoder.step(new[-1])
    return torch.cat([prompt_ids.to(torch.long), torch.tensor([new], dtype=torch.long)], dim=1)
