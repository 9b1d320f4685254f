"""qatfx as a torchtune QAT quantizer: torchtune's `prepare(model)` / `convert(model)` protocol.

A torchtune QAT recipe config names it as its quantizer component:

    quantizer:
      _component_: qatfx.integrations.torchtune.Int8DynActInt4WeightQATQuantizer
      groupsize: 256

`prepare(model)` is `qatfx.prepare_pt2e(model, ..., regions="auto")` on token ids it makes
up itself (torchtune's recipes pass no example inputs): the model stays a torchtune
`TransformerDecoder`, each decoder layer (inside its activation-checkpointing wrapper, if
the recipe applied one) becomes a prepared graph, and torchtune's FSDP2 helper
(`training.shard_model` with `get_shard_conditions`) shards those layers as before.
`convert(model)` is `qatfx.convert_pt2e`.

Importing this module registers the quantizer with torchtune
(`torchtune.training.quantization`, mode "qatfx-8da4w-qat"): torchtune's recipes refuse a
quantizer whose class has no mode there, and look up the functions their
`fake_quant_after_n_steps` applies to every module by that mode. torchtune 0.6 has no
public registration call; these dicts are how it registers its own quantizers.

The model must hold real tensors: torchtune's `qat_distributed` recipe builds it on the
meta device, which qatfx cannot capture yet; docs/integrations_torchtune.md gives the one
line to change in a copy of the recipe.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch

from qatfx import api
from qatfx.graph.meta import PREPARED
from qatfx.graph.regions import is_qatfx_graph
from qatfx.quantizer import Int8DynActInt4WeightQuantizer

log = logging.getLogger("qatfx.integrations.torchtune")

MODE = "qatfx-8da4w-qat"  # torchtune's recipes require "qat" in the mode of a QAT quantizer
EXAMPLE_BATCH = 2
DOCS = "docs/integrations_torchtune.md"


class Int8DynActInt4WeightQATQuantizer:
    """8da4w QAT (int8 dynamic per-token activations, int4 symmetric per-group weights) with
    the arguments of torchao's quantizer of that name, which torchtune's configs use.

    groupsize: weight group size along the input dim.
    padding_allowed: must be False: a layer whose in_features the group size does not
        divide is left in float (qatfx skips rather than pads; `qatfx.summary` says why).
    precision: the dtype the model's parameters must have (torchtune's recipes set it to
        their training dtype); None accepts the model's. torchao casts the linears to it;
        qatfx shares the model's tensors, so it refuses a mismatch instead.
    scales_precision: dtype of the weight scales.
    skip: layer names (fnmatch patterns) left in float.
    example_inputs: what prepare captures the model with; default: token ids of shape
        (2, example_seq_len) within the vocabulary of `model.tok_embeddings`.
    """

    def __init__(
        self,
        groupsize: int = 256,
        padding_allowed: bool = False,
        precision: Optional[torch.dtype] = None,
        scales_precision: torch.dtype = torch.float32,
        *,
        skip: Iterable[str] = (),
        example_inputs: Optional[tuple] = None,
        example_seq_len: int = 8,
    ) -> None:
        if padding_allowed:
            raise ValueError(
                "padding_allowed=True: qatfx does not pad weights; a layer whose in_features the group size does "
                "not divide stays in float (qatfx.summary(model) lists it). Use padding_allowed=False"
            )
        # >= 3: a size of 1 would be fixed in the graphs, and a size equal to the batch (2)
        # would be captured as the same symbol as the batch
        if example_seq_len < 3:
            raise ValueError(f"example_seq_len must be >= 3 (the captured graphs keep a size of 1 or 2 fixed), got {example_seq_len}")
        self.groupsize = groupsize
        self.padding_allowed = padding_allowed
        self.precision = precision
        self.scales_precision = scales_precision
        self.skip = tuple(skip)
        self.example_inputs = example_inputs
        self.example_seq_len = example_seq_len

    def __repr__(self) -> str:
        return f"{type(self).__name__}(groupsize={self.groupsize}, precision={self.precision}, scales_precision={self.scales_precision})"

    def qatfx_quantizer(self) -> Int8DynActInt4WeightQuantizer:
        return Int8DynActInt4WeightQuantizer(self.groupsize, scales_precision=self.scales_precision, skip=self.skip)

    def prepare(self, model: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        """A copy of `model` (same class, same parameter tensors and names) whose decoder
        layers and linears outside them are prepared graphs. Unlike torchao's, the model
        passed in is not modified: use the returned one (torchtune's recipes do)."""
        self._check_model(model)
        example = self.example_inputs if self.example_inputs is not None else (example_tokens(model, self.example_seq_len),)
        return api.prepare_pt2e(model, self.qatfx_quantizer(), example, regions="auto")

    def convert(self, model: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        """The converted model (int4 weights packed), computing what `model` computes in eval
        mode exactly; `model` is left as it was. Save it with `qatfx.save`."""
        return api.convert_pt2e(model)

    # torchtune's QAT + LoRA recipe swaps its LoRALinear for torchao's QATLoRALinear with
    # these configs: torchao module swapping, which a qatfx graph has no place for.
    def get_activation_fake_quantize_config(self):
        raise NotImplementedError(_NO_LORA)

    def get_weight_fake_quantize_config(self):
        raise NotImplementedError(_NO_LORA)

    def _check_model(self, model: torch.nn.Module) -> None:
        on_meta = next((name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
        if on_meta is not None:
            raise ValueError(
                f"{type(self).__name__}.prepare: the model is on the meta device ({on_meta}); qatfx captures the "
                "model with torch.export and needs its real tensors (torchtune's qat_distributed recipe builds it on "
                "meta). Build it on the training device: in a copy of the recipe (`tune cp qat_distributed .`), "
                f"instantiate the model under `self._device` instead of `torch.device(\"meta\")`; see {DOCS}"
            )
        if self.precision is not None:
            other = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != self.precision})
            if other:
                raise ValueError(
                    f"{type(self).__name__}.prepare: precision is {self.precision} but the model has {', '.join(other)} "
                    "parameters; build the model in that dtype (torchtune's training.set_default_dtype) or set "
                    "precision=None to train in the model's dtype"
                )
        compiled = [name for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
        if compiled:
            log.warning(
                "qatfx: %s were torch.compile'd before prepare (torchtune's compile=True); the prepared graphs that "
                "replace them are not compiled: compile the prepared model instead", ", ".join(compiled[:3])
            )


_NO_LORA = (
    "qatfx's quantizer prepares the model's graph and has no torchao fake-quantize configs for torchtune's "
    "QAT + LoRA recipe (qat_lora_finetune_distributed); use it with the full QAT recipe (qat_distributed)"
)


def example_tokens(model: torch.nn.Module, seq_len: int) -> torch.Tensor:
    """Token ids of shape (2, seq_len) (at most the model's max_seq_len) within the
    vocabulary of `model.tok_embeddings`, on its device."""
    embedding = getattr(model, "tok_embeddings", None)
    vocab = getattr(embedding, "num_embeddings", None)
    if vocab is None:
        raise ValueError(
            f"{type(model).__name__} has no tok_embeddings embedding to take the vocabulary size from; pass "
            "example_inputs=(token_ids,) to the quantizer (e.g. in the recipe config)"
        )
    seq_len = min(seq_len, getattr(model, "max_seq_len", None) or seq_len)
    ids = torch.arange(EXAMPLE_BATCH * seq_len, device=embedding.weight.device) % vocab
    return ids.reshape(EXAMPLE_BATCH, seq_len)


# ---- fake-quant toggles, as torchtune applies them: model.apply(fn) ---------------------------


def disable_fake_quant(module: torch.nn.Module) -> None:
    """For `model.apply`: turn off the fake-quants of `module` if it is a prepared qatfx
    graph (each region of a prepared model is one); any other module is left alone."""
    if is_qatfx_graph(module) and module.qatfx_stage == PREPARED:
        api.disable_fake_quant(module)


def enable_fake_quant(module: torch.nn.Module) -> None:
    """For `model.apply`: turn the fake-quants of a prepared qatfx graph back on."""
    if is_qatfx_graph(module) and module.qatfx_stage == PREPARED:
        api.enable_fake_quant(module)


def _register_with_torchtune() -> None:
    try:
        from torchtune.training import quantization
    except ImportError as exc:
        raise ImportError(
            "qatfx.integrations.torchtune registers its quantizer in torchtune.training.quantization, which failed to "
            f"import ({exc}); install a torchtune with a torchao version it supports"
        ) from exc
    tables = ("_quantizer_to_mode", "_quantizer_mode_to_disable_fake_quant", "_quantizer_mode_to_enable_fake_quant")
    missing = [t for t in tables if not isinstance(getattr(quantization, t, None), dict)]
    if missing:
        raise ImportError(
            f"this torchtune has no {', '.join(missing)} in torchtune.training.quantization, where qatfx registers its "
            "quantizer (written for torchtune 0.6); its recipes would refuse the quantizer"
        )
    quantization._quantizer_to_mode[Int8DynActInt4WeightQATQuantizer] = MODE
    quantization._quantizer_mode_to_disable_fake_quant[MODE] = disable_fake_quant
    quantization._quantizer_mode_to_enable_fake_quant[MODE] = enable_fake_quant


_register_with_torchtune()
