"""Entry points: prepare_pt2e, convert_pt2e, fake-quant control."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Union

import torch
import torch.fx

from qatfx.capture import capture
from qatfx.graph.meta import CONVERTED, PREPARED
from qatfx.instrument.settings import resolve_dump_dir
from qatfx.module import QATGraphModule, copy_sharing_tensors
from qatfx.passes.annotate import annotate_pass
from qatfx.passes.convert import convert
from qatfx.passes.fake_quant_toggle import set_fake_quant_enabled
from qatfx.passes.finite_check import check_finite_requested, insert_finite_checks, warn_non_finite_weights
from qatfx.passes.infra import run_pass
from qatfx.passes.insert_fake_quant import fake_quant_nodes, insert_fake_quant
from qatfx.quantizer import Quantizer
from qatfx.summary import layer_reports

log = logging.getLogger("qatfx")

PathLike = Union[str, os.PathLike, None]


def prepare_pt2e(
    model: Any,
    quantizer: Quantizer,
    example_inputs: Optional[tuple] = None,
    *,
    example_kwargs: Optional[dict] = None,
    dynamic_shapes: Any = None,
    strict: bool = False,
    dump_dir: PathLike = None,
    check_finite: Optional[bool] = None,
) -> QATGraphModule:
    """Capture `model` with torch.export and insert fake-quant around its linear layers.

    model: an nn.Module (exported here with `example_inputs`; every input dim is
        Dim.AUTO unless `dynamic_shapes` says otherwise), an ExportedProgram, or
        `ep.module()`. It is not modified; the prepared module shares its parameter tensors
        (training updates them in place, as torchao's QAT does; deepcopy the model first to
        keep a float copy).
    dump_dir: write each pass's graph before/after here (or set QATFX_DUMP_DIR).
    check_finite: warn (NonFiniteWarning, naming the layers) whenever a linear input holds
        NaN/inf at run time; costs a copy of each linear input, so off by default (None
        reads QATFX_CHECK_FINITE=1). Non-finite weights are always reported, at prepare
        and at convert.

    Returns a QATGraphModule in the model's train/eval mode; `qatfx.summary(m)` lists
    quantized and skipped layers.
    """
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"quantizer must be a qatfx Quantizer, got {type(quantizer).__name__}")
    exported = capture(model, example_inputs, example_kwargs=example_kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    gm = copy_sharing_tensors(exported)
    gm.qatfx_dump_dir = None if dump_dir is None else str(dump_dir)
    dump_dir = resolve_dump_dir(dump_dir)  # once: every pass of this call dumps to the same folder
    if isinstance(model, torch.nn.Module) and not isinstance(model, torch.fx.GraphModule):
        gm.train(model.training)

    run_pass(gm, "annotate", annotate_pass(quantizer), dump_dir=dump_dir)
    gm.qatfx_layers = layer_reports(gm)
    if not any(r.quantized for r in gm.qatfx_layers):
        reasons = "; ".join(f"{r.layer}: {r.skip_reason}" for r in gm.qatfx_layers)
        raise ValueError(
            f"{quantizer!r} found nothing to quantize: "
            + (f"every linear layer was skipped ({reasons})" if reasons else "the model has no linear layers (aten.linear, or matmul/addmm with a parameter)")
        )
    warn_non_finite_weights(gm, "prepare_pt2e")
    run_pass(gm, "insert_fake_quant", insert_fake_quant, dump_dir=dump_dir)
    if check_finite_requested(check_finite):
        run_pass(gm, "check_finite", insert_finite_checks, dump_dir=dump_dir)
    gm.qatfx_stage = PREPARED
    for report in gm.qatfx_layers:
        if not report.quantized:
            log.warning("qatfx: layer %s left in float: %s", report.layer, report.skip_reason)
    log.info("qatfx: prepared %d linear layers with %r", sum(r.quantized for r in gm.qatfx_layers), quantizer)
    return gm


prepare_qat_pt2e = prepare_pt2e  # torchao's name


def _require_stage(module: Any, stage: str, action: str) -> None:
    current = getattr(module, "qatfx_stage", None)
    if current != stage:
        hint = {
            None: "it is not a qatfx module; call qatfx.prepare_pt2e(model, quantizer, example_inputs) first",
            CONVERTED: "it is already converted",
        }.get(current, f"it is at stage {current!r}")
        raise ValueError(f"{action} needs a module returned by prepare_pt2e: {hint}")


def convert_pt2e(prepared: QATGraphModule, *, dump_dir: PathLike = None) -> QATGraphModule:
    """Rewrite every fake-quant into quantize/dequantize ops with quantized (packed int4)
    weights computed from the current parameters. Returns a new module whose output equals
    `prepared`'s exactly; `prepared` is left as it was."""
    _require_stage(prepared, PREPARED, "convert_pt2e")
    gm = copy_sharing_tensors(prepared)
    run_pass(gm, "convert", convert, dump_dir=resolve_dump_dir(dump_dir if dump_dir is not None else prepared.qatfx_dump_dir))
    gm.qatfx_stage = CONVERTED
    return gm


def _unwrap_compiled(module: Any) -> Any:
    """The module behind a torch.compile wrapper (OptimizedModule), or `module` itself."""
    return getattr(module, "_orig_mod", module)


def _set_fake_quant(module: Any, enabled: bool) -> None:
    target = _unwrap_compiled(module)
    _require_stage(target, PREPARED, "enable_fake_quant / disable_fake_quant")
    name = "enable_fake_quant" if enabled else "disable_fake_quant"
    run_pass(target, name, set_fake_quant_enabled(enabled), dump_dir=resolve_dump_dir(target.qatfx_dump_dir))


def disable_fake_quant(module: Any) -> None:
    """Make every fake-quant an exact identity: the module computes the float model."""
    _set_fake_quant(module, False)


def enable_fake_quant(module: Any) -> None:
    _set_fake_quant(module, True)


def fake_quant_enabled(module: Any) -> bool:
    return any(n.kwargs.get("enabled", True) for n in fake_quant_nodes(_unwrap_compiled(module)))


class FakeQuantAfterNSteps:
    """torchtune's `fake_quant_after_n_steps`: fake-quant is off for the first `n_steps`
    optimizer steps, then on. Call `step()` once per training step, after the optimizer.

        schedule = FakeQuantAfterNSteps(prepared, n_steps=1000)
        for batch in data:
            loss = compiled(batch).loss; loss.backward(); opt.step(); opt.zero_grad()
            schedule.step()

    Each switch recompiles a torch.compile'd module once (the graph changes).
    """

    def __init__(self, module: Any, n_steps: int) -> None:
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        self.module = module
        self.n_steps = n_steps
        self.steps_done = 0
        if n_steps > 0:
            disable_fake_quant(module)
        else:
            enable_fake_quant(module)

    def step(self) -> None:
        self.steps_done += 1
        if self.steps_done == self.n_steps:
            enable_fake_quant(self.module)
            log.info("qatfx: fake-quant enabled after %d steps", self.n_steps)

    def state_dict(self) -> dict:
        """The step counter, saved beside the optimizer's state to resume a run."""
        return {"n_steps": self.n_steps, "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved schedule: fake-quant is switched on at the same step as in the
        uninterrupted run (and is on already if the saved run had passed n_steps)."""
        if state["n_steps"] != self.n_steps:
            raise ValueError(f"the saved schedule switches after {state['n_steps']} steps, this one after {self.n_steps}")
        self.steps_done = state["steps_done"]
        enabled = self.steps_done >= self.n_steps
        if fake_quant_enabled(self.module) != enabled:  # an unchanged graph keeps its compiled code
            _set_fake_quant(self.module, enabled)
