"""QAT inside Hugging Face `transformers.Trainer`.

    model = qatfx.integrations.transformers.prepare_for_trainer(model, quantizer, example_batch)
    qat = QATCallback(fake_quant_after_n_steps=1000)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[qat]).train()
    qat.converted  # the converted model, also saved with qatfx.save to qat.saved_to

`prepare_for_trainer` is `qatfx.prepare_pt2e(..., regions="auto")` recorded with the KV
cache on: the model stays a `PreTrainedModel` of its class (Trainer needs `config`,
`save_pretrained` and a forward that takes `labels` and returns the loss); only its
attention projections, MLPs and `lm_head` become prepared graphs, so the attention code,
the loss and `generate()` with its KV cache stay Hugging Face's. `QATCallback` keeps
fake-quant off for the first n optimizer steps (torchtune's `fake_quant_after_n_steps`)
and, when training ends, converts and saves the model. Trainer's own checkpoints
(`save_pretrained`) hold the float weights under their usual names, so
`resume_from_checkpoint` works unchanged. docs/integrations_transformers.md has more.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import PreTrainedModel, TrainerCallback

from qatfx.capture import kv_cache_off
from qatfx.api import convert_pt2e, disable_fake_quant, enable_fake_quant, fake_quant_enabled, prepare_pt2e
from qatfx.graph.meta import PREPARED
from qatfx.graph.regions import is_regional, model_stage
from qatfx.quantizer import Quantizer
from qatfx.serialization import save

log = logging.getLogger("qatfx.integrations.transformers")

SAVE_SUBDIR = "qatfx"


def prepare_for_trainer(
    model: PreTrainedModel, quantizer: Quantizer, example_batch: Union[dict, torch.Tensor], **prepare_kwargs: Any
) -> PreTrainedModel:
    """`model` prepared for QAT, its attention projections, MLPs and `lm_head` captured as
    regions: a copy of the same class sharing the parameter tensors, for `Trainer(model=...)`.

    example_batch: a batch as the Trainer feeds it (the data collator's output, a dict of
        tensors such as input_ids, attention_mask, labels) or an input_ids tensor. Its batch
        and sequence sizes must be >= 2: a size of 1 would be fixed in the captured graphs.
    prepare_kwargs: passed on to `qatfx.prepare_pt2e` (dump_dir, check_finite, regions).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"prepare_for_trainer needs a transformers PreTrainedModel, got {type(model).__name__}; "
            "for another nn.Module call qatfx.prepare_pt2e(model, quantizer, example_inputs, regions='auto')"
        )
    batch = {"input_ids": example_batch} if isinstance(example_batch, torch.Tensor) else dict(example_batch)
    small = {k: tuple(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() >= 2 and min(v.shape[:2]) < 2}
    if small:
        raise ValueError(
            f"prepare_for_trainer: example_batch has a batch or sequence size of 1 ({small}), which the captured "
            "graphs would keep fixed; pass a batch of >= 2 sequences of >= 2 tokens"
        )
    if getattr(model.config, "use_cache", None) is not None:
        # A decoder layer that receives a KV cache is split into its projections and MLP,
        # which are called with hidden states only. Captured whole (a use_cache=False run),
        # a layer graph would refuse the extra keyword arguments its model forwards to it
        # (Trainer's num_items_in_batch, generate's cache).
        batch["use_cache"] = True
    prepare_kwargs.setdefault("regions", "auto")
    return prepare_pt2e(model, quantizer, (), example_kwargs=batch, **prepare_kwargs)


class QATCallback(TrainerCallback):
    """Drives a prepared model through `transformers.Trainer`.

    fake_quant_after_n_steps: fake-quant is off (the model trains in float) for this many
        optimizer steps, then on. Read from `state.global_step`, so a run resumed from a
        checkpoint switches at the same step.
    convert_at_end: when training ends, `qatfx.convert_pt2e` the trained model into
        `self.converted` (eval mode) and, on the main process, `qatfx.save` it to
        `output_dir` (default: `<args.output_dir>/qatfx`), recorded in `self.saved_to`.
    save_kwargs: passed to `qatfx.save` (example_inputs, example_kwargs, dynamic_shapes);
        by default the saved program takes the tensors of the example batch given at
        prepare except labels (`loaded(input_ids=...)` returns the logits), exported with
        the config's use_cache off (a program cannot return the KV cache).
    """

    def __init__(
        self,
        fake_quant_after_n_steps: int = 0,
        convert_at_end: bool = True,
        output_dir: Union[str, os.PathLike, None] = None,
        save_kwargs: Optional[dict] = None,
    ) -> None:
        if fake_quant_after_n_steps < 0:
            raise ValueError(f"fake_quant_after_n_steps must be >= 0, got {fake_quant_after_n_steps}")
        self.fake_quant_after_n_steps = fake_quant_after_n_steps
        self.convert_at_end = convert_at_end
        self.output_dir = output_dir
        self.save_kwargs = save_kwargs
        self.converted: Optional[torch.nn.Module] = None
        self.saved_to: Optional[Path] = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _require_prepared(model)
        self._follow_schedule(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._follow_schedule(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.convert_at_end:
            return
        self.converted = convert_pt2e(model).eval()
        if state.is_world_process_zero:
            target = Path(self.output_dir) if self.output_dir is not None else Path(args.output_dir) / SAVE_SUBDIR
            with kv_cache_off(self.converted):
                self.saved_to = save(self.converted, target, **(self.save_kwargs or _default_save_kwargs(self.converted)))
            log.info("qatfx: converted model saved to %s (load it with qatfx.load)", self.saved_to)

    def _follow_schedule(self, model: torch.nn.Module, step: int) -> None:
        wanted = step >= self.fake_quant_after_n_steps
        if fake_quant_enabled(model) != wanted:  # an unchanged graph keeps its compiled code
            (enable_fake_quant if wanted else disable_fake_quant)(model)
            log.info("qatfx: fake-quant %s at step %d", "enabled" if wanted else "disabled", step)


def _require_prepared(model: Any) -> None:
    stage = model_stage(model)
    if stage == PREPARED:
        return
    got = f"a model at stage {stage!r}" if stage else f"a {type(model).__name__} that qatfx has not prepared"
    raise ValueError(
        f"QATCallback: Trainer is training {got}; pass Trainer(model=prepare_for_trainer(model, quantizer, "
        "example_batch)) (or qatfx.prepare_pt2e(model, quantizer, example_inputs, regions='auto'))"
    )


def _default_save_kwargs(converted: torch.nn.Module) -> dict:
    """The example inputs of the re-export in qatfx.save: those given at prepare without
    labels and use_cache (the saved program computes logits, not the loss or a cache)."""
    if not is_regional(converted):
        return {}
    args, kwargs = converted.qatfx_example_inputs
    return {"example_inputs": args, "example_kwargs": {k: v for k, v in kwargs.items() if k not in ("labels", "use_cache")}}
