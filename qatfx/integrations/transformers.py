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

Knowledge distillation from the float model (docs/distillation.md):

    prepared = prepare_for_trainer(model, quantizer, example_batch)   # trains model's tensors in place
    teacher = qatfx.frozen_teacher(model, student=prepared)            # before training: copies what trains
    DistillationTrainer(model=prepared, teacher=teacher, kd_weight=0.5, temperature=1.0,
                        args=args, train_dataset=ds, callbacks=[QATCallback()]).train()

trains on (1 - kd_weight) x the causal-LM cross-entropy + kd_weight x
`qatfx.distillation_loss(student, teacher, temperature)` over the positions the labels
score (labels shifted by one as Hugging Face shifts them, -100 left out), both terms
normalized as Trainer normalizes the model's own loss (gradient accumulation, devices).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, Trainer, TrainerCallback

from qatfx.capture import kv_cache_off
from qatfx.distillation import check_kd_weight, check_teacher, check_temperature, distillation_loss
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


IGNORE_INDEX = -100  # Hugging Face's label for a position that is not scored


class DistillationTrainer(Trainer):
    """`transformers.Trainer` for a causal LM whose loss is

        (1 - kd_weight) x cross-entropy + kd_weight x distillation_loss(student, teacher, temperature)

    over the positions the labels score: the logits at position i are scored against label
    i + 1 (Hugging Face's shift; a collator's `shift_labels` is used as given), positions
    labelled -100 are left out of both terms. The cross-entropy is transformers' own causal-LM
    loss; both terms go through Trainer's `compute_loss_func` path, so Trainer normalizes them
    alike: over the tokens of the whole accumulated batch (`num_items_in_batch`), across
    devices when it averages tokens. Evaluation reports the same combined loss.

    teacher: the frozen float model, `qatfx.frozen_teacher(model, student=prepared)` built
        after prepare and before training; a teacher sharing storage with a parameter the
        student trains is refused. It runs in eval mode under no_grad on the batch without
        its labels (and with use_cache=False), on the student's device (moved there when it
        is elsewhere, which gives it its own copy: move the model before prepare and
        frozen_teacher to keep the sharing).
    kd_weight: in [0, 1]; 1 is distillation alone. temperature: > 0.
    The other arguments are Trainer's (compute_loss_func and label smoothing excepted: the
    loss is this one).
    """

    def __init__(self, *args: Any, teacher: torch.nn.Module, kd_weight: float = 0.5, temperature: float = 1.0, **kwargs: Any) -> None:
        check_kd_weight(kd_weight)
        check_temperature(temperature)
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("DistillationTrainer computes the loss itself (cross-entropy + distillation); drop compute_loss_func")
        super().__init__(*args, compute_loss_func=self._combined_loss, **kwargs)
        if self.args.label_smoothing_factor:
            raise ValueError("DistillationTrainer: label smoothing is not applied to its cross-entropy; set label_smoothing_factor=0")
        check_teacher(teacher, self.model)
        self.teacher = self._on_student_device(teacher).eval()
        self.kd_weight, self.temperature = kd_weight, temperature
        self._teacher_logits: Optional[torch.Tensor] = None
        self._shift_labels: Optional[torch.Tensor] = None

    def _on_student_device(self, teacher: torch.nn.Module) -> torch.nn.Module:
        device = next(self.model.parameters()).device
        if all(t.device == device for t in (*teacher.parameters(), *teacher.buffers())):
            return teacher
        log.warning("DistillationTrainer: moving the teacher to %s gives it its own copy of every weight there; "
                    "move the model before prepare and frozen_teacher to share them", device)
        return teacher.to(device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError("DistillationTrainer needs labels in each batch: they say which positions are scored "
                             "(use a causal-LM data collator, or labels = input_ids)")
        teacher_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        with torch.no_grad():
            out = self.teacher(**teacher_inputs, use_cache=False)
        # Trainer's compute_loss runs the student, then calls _combined_loss(outputs, labels, num_items_in_batch)
        self._teacher_logits = out.logits if hasattr(out, "logits") else out
        self._shift_labels = inputs.get("shift_labels")
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            self._teacher_logits = self._shift_labels = None

    def _combined_loss(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        from transformers.loss.loss_utils import ForCausalLMLoss

        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        shift = self._shift_labels
        if shift is None:  # as ForCausalLMLoss shifts: logits[i] predicts labels[i + 1]; the last predicts nothing
            shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        scored = shift.to(logits.device) != IGNORE_INDEX
        given = {} if self._shift_labels is None else {"shift_labels": self._shift_labels}
        ce = ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch, **given)
        kd = distillation_loss(logits, self._teacher_logits, self.temperature, mask=scored)
        if num_items_in_batch is not None:
            # ce is this batch's sum over the whole accumulated batch's token count: the same for kd
            kd = kd * scored.sum() / num_items_in_batch
        return (1.0 - self.kd_weight) * ce + self.kd_weight * kd


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
