"""Entry points: prepare_pt2e, convert_pt2e, fake-quant control."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.fx
from torch.utils import _pytree as pytree

from qatfx.capture import CaptureError, capture
from qatfx.graph.linear_sites import get_attr_value
from qatfx.graph.meta import CONVERTED, LEARNED_SCALE_SUFFIX, LEARNED_ZERO_SUFFIX, PREPARED
from qatfx.graph.regions import graph_regions, is_regional, model_stage
from qatfx.module import QATGraphModule, captured_copy, keep_model_attributes, copy_model_sharing_tensors, copy_sharing_tensors
from qatfx.passes.annotate import annotate_pass
from qatfx.passes.convert import convert
from qatfx.passes.fake_quant_toggle import set_fake_quant_enabled
from qatfx.passes.finite_check import check_finite_requested, insert_finite_checks, warn_non_finite_weights
from qatfx.passes.infra import run_pass
from qatfx.passes.insert_fake_quant import fake_quant_nodes, insert_fake_quant
from qatfx.passes.lora import LoRA, add_lora, frozen_fake_quant_flags, lora_state, merge_adapters, refresh_frozen_weights
from qatfx.quantizer import Quantizer
from qatfx.quantizer.base import check_one_grid_per_table, quantized_tables
from qatfx.region_capture import Regions, plan_regions, replace_module
from qatfx.summary import layer_reports, outside_report, summary

log = logging.getLogger("qatfx")

PathLike = Union[str, os.PathLike, None]


def prepare_pt2e(
    model: Any,
    quantizer: Quantizer,
    example_inputs: Optional[tuple] = None,
    *,
    example_kwargs: Optional[dict] = None,
    regions: Optional[Regions] = None,
    dynamic_shapes: Any = None,
    strict: bool = False,
    dump_dir: PathLike = None,
    check_finite: Optional[bool] = None,
    lora: Optional[LoRA] = None,
) -> torch.nn.Module:
    """Capture `model` with torch.export and insert fake-quant around its linear layers.

    model: an nn.Module (exported here with `example_inputs`; every input dim is
        Dim.AUTO unless `dynamic_shapes` says otherwise), an ExportedProgram, or
        `ep.module()`. It is not modified; the prepared module shares its parameter tensors
        (training updates them in place, as torchao's QAT does; deepcopy the model first to
        keep a float copy).
    regions: None (default) captures the whole model as one graph and returns a
        QATGraphModule. "auto" (or a list of module names) captures each region separately
        and returns a copy of the user's model object, of its class and with its methods
        (generate, save_pretrained) and parameter names, whose regions are prepared graphs:
        by default every repeated block (decoder layers) and every linear outside them
        (lm_head); see qatfx/region_capture.py. Both compute the same numbers exactly.
    dump_dir: write each pass's graph before/after here (or set QATFX_DUMP_DIR); with
        regions, one subfolder per region.
    check_finite: warn (NonFiniteWarning, naming the layers) whenever a linear input holds
        NaN/inf at run time; costs a copy of each linear input, so off by default (None
        reads QATFX_CHECK_FINITE=1). Non-finite weights are always reported, at prepare
        and at convert.
    lora: a `qatfx.LoRA` config: low-rank adapters on the matched quantized layers, whose
        base weights are frozen (docs/lora.md); whole-model capture only. Fold them with
        `qatfx.merge_lora(prepared)` before convert_pt2e.

    `qatfx.summary(m)` lists quantized and skipped layers; the result is in the model's
    train/eval mode.
    """
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"quantizer must be a qatfx Quantizer, got {type(quantizer).__name__}")
    if regions is not None and dynamic_shapes is not None:
        raise ValueError(
            "dynamic_shapes= describes the whole model's inputs and applies to whole-model capture (regions=None); "
            "with regions, every dim of each region's recorded inputs is Dim.AUTO. Drop one of the two"
        )
    if lora is not None and not isinstance(lora, LoRA):
        raise TypeError(f"lora must be a qatfx.LoRA, got {type(lora).__name__}")
    if lora is not None and regions is not None:
        raise NotImplementedError("LoRA needs whole-model capture: pass regions=None with lora=")
    if regions is not None:
        prepared = _prepare_regions(model, quantizer, example_inputs, example_kwargs or {}, regions, strict, dump_dir, check_finite)
        layers = summary(prepared).layers
    else:
        exported = capture(model, example_inputs, example_kwargs=example_kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
        prepared = captured_copy(exported)
        keep_model_attributes(prepared, model)
        prepared.qatfx_dump_dir = None if dump_dir is None else str(dump_dir)
        if isinstance(model, torch.nn.Module) and not isinstance(model, torch.fx.GraphModule):
            prepared.train(model.training)
        layers = _prepare_graph(prepared, quantizer, prepared.dump_folder(), check_finite)
        if lora is not None:
            _add_lora(prepared, lora)
    graphs = [gm for _, gm in graph_regions(prepared)]
    quantizer.warn_unmatched_rules(graphs, [r.layer for r in getattr(prepared, "qatfx_outside_layers", [])])
    for report in layers:
        if not report.quantized:
            log.warning("qatfx: layer %s left in float: %s", report.layer, report.skip_reason)
    log.info("qatfx: prepared %d linear layers with %r", sum(r.quantized for r in layers), quantizer)
    return prepared


def _prepare_graph(
    gm: QATGraphModule, quantizer: Quantizer, dump_dir: Optional[Path], check_finite: Optional[bool],
    tables: Optional[dict] = None,
) -> list:
    """The prepare passes on one captured graph; returns its layer reports. tables: the
    tensors earlier regions quantize, checked for one grid per tied table across regions."""
    run_pass(gm, "annotate", annotate_pass(quantizer), dump_dir=dump_dir)
    if tables is not None:
        check_one_grid_per_table(tables, quantized_tables(gm), quantizer.describe_choice)
    gm.qatfx_layers = layer_reports(gm)
    if not any(r.quantized for r in gm.qatfx_layers) and not gm.qatfx_region:
        raise ValueError(_nothing_to_quantize(quantizer, gm.qatfx_layers))
    warn_non_finite_weights(gm, "prepare_pt2e")
    run_pass(gm, "insert_fake_quant", insert_fake_quant, dump_dir=dump_dir)
    if check_finite_requested(check_finite):
        run_pass(gm, "check_finite", insert_finite_checks, dump_dir=dump_dir)
    gm.qatfx_stage = PREPARED
    return gm.qatfx_layers


def _nothing_to_quantize(quantizer: Quantizer, layers: list) -> str:
    reasons = "; ".join(f"{r.layer}: {r.skip_reason}" for r in layers)
    return f"{quantizer!r} found nothing to quantize: " + (
        f"every linear layer was skipped ({reasons})" if reasons
        else "the model has no linear layers (aten.linear, or matmul/addmm with a parameter)"
    )


def _prepare_regions(
    model: Any, quantizer: Quantizer, args: Optional[tuple], kwargs: dict, regions: Regions, strict: bool,
    dump_dir: PathLike, check_finite: Optional[bool],
) -> torch.nn.Module:
    """A copy of `model` (sharing its tensors) whose regions are prepared graphs."""
    if not isinstance(model, torch.nn.Module) or isinstance(model, torch.fx.GraphModule):
        raise TypeError(
            f"regions= needs the nn.Module itself (got {type(model).__name__}): region capture keeps the model "
            "object and exports its parts; pass regions=None to prepare an ExportedProgram or GraphModule"
        )
    if args is None:
        raise ValueError("prepare_pt2e(model, quantizer, example_inputs, regions=...): example_inputs are required")
    args = args if isinstance(args, tuple) else (args,)
    calls, outside = plan_regions(model, regions, args, kwargs, embeddings=quantizer.quantizes_embeddings)
    prepared = copy_model_sharing_tensors(model)
    prepared.qatfx_outside_layers = [outside_report(o, type(model).__name__) for o in outside]
    # qatfx.save re-exports the whole model; these are its default example inputs
    prepared.qatfx_example_inputs = pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, (args, kwargs))
    layers = list(prepared.qatfx_outside_layers)
    tables: dict = {}  # a tied embedding and lm_head are two regions: one grid across them
    learned: dict = {}  # ... and, for a learnable spec, one set of trained qparams
    for path, call in calls.items():
        region = prepared.get_submodule(path)
        try:
            exported = capture(region, call.args, example_kwargs=call.kwargs, strict=strict, warn_size_one=False)
        except CaptureError as exc:
            raise CaptureError(
                f"region {path!r} ({type(region).__name__}) could not be captured; name smaller regions with "
                f"regions=[...] or capture the whole model with regions=None.\n{exc}"
            ) from exc
        gm = captured_copy(exported)
        gm.qatfx_region = path
        gm.keep_methods_of(region)
        gm.qatfx_dump_dir = None if dump_dir is None else str(Path(dump_dir) / path)
        gm.train(region.training)
        layers += _prepare_graph(gm, quantizer, gm.dump_folder(), check_finite, tables)
        _share_learned_qparams(gm, learned)
        replace_module(prepared, path, gm)
    if not any(r.quantized for r in layers):
        raise ValueError(_nothing_to_quantize(quantizer, layers))
    log.info("qatfx: captured %d regions of %s: %s", len(calls), type(model).__name__, ", ".join(calls))
    return prepared


def _share_learned_qparams(gm: QATGraphModule, learned: dict) -> None:
    """A table two regions quantize (tied embedding and lm_head) got trained qparams in each:
    the later region reads the first one's parameters instead, so one grid trains."""
    for fq in fake_quant_nodes(gm):
        weight = fq.args[0]
        if len(fq.args) < 2 or weight.op != "get_attr":
            continue
        table = get_attr_value(gm, weight.target)
        key = (table.untyped_storage().data_ptr(), table.storage_offset(), tuple(table.shape))
        reads = [n for n in fq.args[1:] if n is not None]
        first = learned.setdefault(key, [get_attr_value(gm, n.target) for n in reads])
        for read, param in zip(reads, first):
            owner_path, _, name = read.target.rpartition(".")
            setattr(gm.get_submodule(owner_path) if owner_path else gm, name, param)


prepare_qat_pt2e = prepare_pt2e  # torchao's name


def learned_qparams(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trained scales (and zero points) of a model prepared with learnable_scales=True,
    by parameter name: give them their own optimizer group, e.g.

        scales = qatfx.learned_qparams(prepared)
        others = [p for p in prepared.parameters() if all(p is not s for s in scales.values())]
        torch.optim.AdamW([{"params": others}, {"params": list(scales.values()), "lr": 1e-4}], lr=1e-5)
    """
    return {
        name: param for name, param in model.named_parameters()
        if name.endswith((LEARNED_SCALE_SUFFIX, LEARNED_ZERO_SUFFIX))
    }


def _add_lora(gm: QATGraphModule, config: LoRA) -> None:
    run_pass(gm, "add_lora", add_lora(config), dump_dir=gm.dump_folder())
    if config.mode == "torchtune":
        # fq(W) is a non-persistent buffer: recompute it from the W a state_dict brings
        gm.register_load_state_dict_post_hook(_refresh_after_load)


def _refresh_after_load(module: torch.nn.Module, _incompatible_keys) -> None:
    refresh_frozen_weights(module)


def merge_lora(prepared: torch.nn.Module) -> torch.nn.Module:
    """A copy of `prepared` (sharing its other tensors) with every LoRA adapter folded into its
    weight, W + s * (B @ A) with the graph's own ops, and plain fake-quant sites: ready for
    convert_pt2e. In torchtune mode the copy's `qatfx_lora_merge_gap` maps each layer to the
    weight-space SQNR (dB) of deployed fq(W + sBA) against trained fq(W) + sBA."""
    target = _unwrap_compiled(prepared)
    _require_stage(target, PREPARED, "merge_lora")
    if is_regional(target) or lora_state(target) is None:
        raise ValueError(
            "merge_lora: this model has no LoRA adapters (prepare it with prepare_pt2e(..., lora=qatfx.LoRA(...)))"
        )
    merged = copy_sharing_tensors(target)
    gaps: dict = {}
    run_pass(merged, "merge_lora", merge_adapters(gaps), dump_dir=merged.dump_folder())
    merged.qatfx_lora_merge_gap = gaps
    for layer, db in gaps.items():
        log.info("qatfx: LoRA merge gap %s: %.1f dB", layer, db)
    return merged


def _require_stage(module: Any, stage: str, action: str) -> None:
    current = model_stage(module)
    if current != stage:
        hint = {
            None: "it is not a qatfx module; call qatfx.prepare_pt2e(model, quantizer, example_inputs) first",
            CONVERTED: "it is already converted",
        }.get(current, f"it is at stage {current!r}")
        raise ValueError(f"{action} needs a module returned by prepare_pt2e: {hint}")


def convert_pt2e(prepared: torch.nn.Module, *, dump_dir: PathLike = None) -> torch.nn.Module:
    """Rewrite every fake-quant into quantize/dequantize ops with quantized (packed int4)
    weights computed from the current parameters. Returns a new module (of the model's class
    for a region capture) whose output equals `prepared`'s exactly; `prepared` is left as it was."""
    _require_stage(prepared, PREPARED, "convert_pt2e")
    if not is_regional(prepared) and lora_state(prepared) is not None:
        raise ValueError("convert_pt2e: the model has unmerged LoRA adapters; call qatfx.merge_lora(prepared) first")
    if is_regional(prepared):
        converted = copy_model_sharing_tensors(prepared)
        regions = graph_regions(converted)
    else:
        converted = copy_sharing_tensors(prepared)
        regions = [("", converted)]
    for _, gm in regions:
        run_pass(gm, "convert", convert, dump_dir=gm.dump_folder(dump_dir))
        gm.qatfx_stage = CONVERTED
    return converted


def _unwrap_compiled(module: Any) -> Any:
    """The module behind a torch.compile wrapper (OptimizedModule), or `module` itself."""
    return getattr(module, "_orig_mod", module)


def _set_fake_quant(module: Any, enabled: bool) -> None:
    target = _unwrap_compiled(module)
    _require_stage(target, PREPARED, "enable_fake_quant / disable_fake_quant")
    name = "enable_fake_quant" if enabled else "disable_fake_quant"
    for _, gm in graph_regions(target):
        run_pass(gm, name, set_fake_quant_enabled(enabled), dump_dir=gm.dump_folder())
        refresh_frozen_weights(gm, enabled)  # torchtune-mode LoRA keeps fq(W) in a buffer


def disable_fake_quant(module: Any) -> None:
    """Make every fake-quant an exact identity: the module computes the float model."""
    _set_fake_quant(module, False)


def enable_fake_quant(module: Any) -> None:
    _set_fake_quant(module, True)


def fake_quant_enabled(module: Any) -> bool:
    # torchtune-mode LoRA's fq(W) buffers count too: they may be the only fake-quants left
    return any(
        any(n.kwargs.get("enabled", True) for n in fake_quant_nodes(gm)) or any(frozen_fake_quant_flags(gm))
        for _, gm in graph_regions(module)
    )


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
