"""`compare(float_model, quantized, inputs)`: which linear layer loses the most accuracy.

For every linear site of a prepared (fake-quant) or converted qatfx module, the layer's
output is compared with the float model's output of the same layer:

- end to end: a full run of the quantized model, so errors compound through the network;
- local: the quantized layer fed the float model's own input of the layer, so only this
  layer's quantization error is measured. This is the column that finds the layer to fix.
  It is also split into weights only (float input, quantized weight) and, for a prepared
  model, activations only (quantized input, float weight).

Float activations come from forward hooks on the float model's modules (sites.py maps each
graph site to its module). Quantized activations come from running the graph with a
`torch.fx.Interpreter` in eager; the local outputs replay the site's quantization nodes
(fake_quantize, or quantize_dynamic -> dequantize) on the float input.

Given a prepared module, a converted copy is made with `convert_pt2e` and compared too;
by the numerics contract its outputs equal the fake-quant ones exactly. Neither model is
modified: the graphs run as eval-mode copies sharing their tensors, all under no_grad.

A region capture (`prepare_pt2e(..., regions="auto")`) is compared graph by graph: one run
of the float model records what each region is called with (forward pre-hooks at the region
paths) besides the linears' activations, and each region graph is then run on its region's
float inputs, with the float model's module at that path as its reference. Rows keep the
layers' full names. End to end therefore means from the region's input: the error of the
earlier layers of the same region, not of the regions before it.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.fx
from torch.fx._pytree import tree_flatten_spec
from torch.utils import _pytree as pytree

from qatfx.debug.compare_report import (
    CompareReport,
    CompareRow,
    Error,
    ErrorAccumulator,
    ModelErrors,
    mark_outliers,
    sort_key,
    sqnr_db,
)
from qatfx.debug.sites import Site, find_sites
from qatfx.graph.meta import CONVERTED, PREPARED, ROLE_META_KEY, WEIGHT
from qatfx.graph.regions import graph_regions, is_regional, model_stage
from qatfx.instrument.dumping import register_report
from qatfx.instrument.settings import resolve_dump_dir
from qatfx.module import copy_sharing_tensors
from qatfx.ops import fake_quantize
from qatfx.passes.convert import convert
from qatfx.passes.insert_fake_quant import fake_quant_nodes
from qatfx.passes.train_eval import set_training_mode
from qatfx.spec import scheme_name

log = logging.getLogger("qatfx.debug")

HTML_NAME = "compare.html"
# What a local replay quantizes: (activation, weight).
_LOCAL = {"local": (True, True), "weights_only": (False, True), "activations_only": (True, False)}


# ---- float model ------------------------------------------------------------------------


@dataclass
class _GraphCall:
    """One call of a graph during the float run: its arguments (the batch itself for a
    whole-model graph), and each linear module's float (input, output) per call within it."""

    args: tuple
    kwargs: dict
    float_io: dict = field(default_factory=lambda: defaultdict(list))  # module path -> [(x, y)]


def _capture_float(model: torch.nn.Module, graphs: list["_Graph"], args: tuple) -> dict[str, list[_GraphCall]]:
    """region path -> the calls of its graph in one run of the float model on `args`, from
    forward pre-hooks at the region paths and forward hooks on the linear modules."""
    calls: dict[str, list[_GraphCall]] = {g.region: [] for g in graphs}
    current: dict[str, _GraphCall] = {}  # region -> its call running now
    if not graphs[0].region:  # a whole-model graph: its one call is the batch
        current[""] = _GraphCall(args, {})
        calls[""].append(current[""])
        if not graphs[0].modules:
            return calls  # nothing to capture: do not run a model that may not even match

    def enter(region):
        def hook(_module, hook_args, hook_kwargs):
            # cloned: the model may update a block's input in place after the call (x += block(x))
            call_args, call_kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (hook_args, hook_kwargs))
            current[region] = _GraphCall(tuple(call_args), dict(call_kwargs))
            calls[region].append(current[region])

        return hook

    def leave(region):
        def hook(_module, _args, _output):
            current.pop(region, None)

        return hook

    def record(region, path):
        def hook(_module, hook_args, hook_kwargs, output):
            call = current.get(region)
            if call is not None:
                x = hook_args[0] if hook_args else next(iter(hook_kwargs.values()))
                call.float_io[path].append((x.detach(), output.detach()))

        return hook

    handles = []
    try:
        for g in graphs:
            region_module = model.get_submodule(g.region) if g.region else None
            if region_module is not None:
                handles.append(region_module.register_forward_pre_hook(enter(g.region), with_kwargs=True))
            for path in g.modules:
                handles.append(model.get_submodule(path).register_forward_hook(record(g.region, path), with_kwargs=True))
            if region_module is not None:  # after the linears' hooks: a region may be the linear itself
                handles.append(region_module.register_forward_hook(leave(g.region), always_call=True))
        model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return calls


class _EvalMode:
    """Puts every submodule in eval mode and restores each one's flag afterwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.flags = [(m, m.training) for m in model.modules()]

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc) -> None:
        for module, flag in self.flags:
            module.training = flag


# ---- quantized model --------------------------------------------------------------------


class _SiteInterpreter(torch.fx.Interpreter):
    """Runs the graph eagerly; at each site records the end-to-end output and the local
    outputs: the site's quantization replayed on the float model's input of the layer."""

    def __init__(self, gm: torch.fx.GraphModule, sites: list[Site], float_io: dict) -> None:
        super().__init__(gm)
        self.sites = {s.node: s for s in sites}
        self.raw_shapes = {s.raw_input: None for s in sites}
        self.float_io = float_io
        self.outputs = {}  # site key -> {"end_to_end": tensor, "local": tensor, ...}

    def run_node(self, node: torch.fx.Node) -> Any:
        out = super().run_node(node)
        if node in self.raw_shapes:
            self.raw_shapes[node] = out.shape  # the value itself may be freed before the site runs
        site = self.sites.get(node)
        if site is not None:
            self.outputs[site.key] = {"end_to_end": out, **self._local(site)}
        return out

    def _float_input(self, site: Site) -> Optional[torch.Tensor]:
        io = self.float_io.get(site.module)
        if not site.capturable or io is None or site.call >= len(io):
            return None
        x = io[site.call][0]
        shape = self.raw_shapes[site.raw_input]
        return x.reshape(shape) if x.numel() == shape.numel() else None

    def _local(self, site: Site) -> dict:
        x = self._float_input(site)
        if x is None:
            return {}
        outs = {}
        for name, (quantize_activation, quantize_weight) in _LOCAL.items():
            if not quantize_weight and site.weight_chain is None:
                continue  # converted: the float weight is gone
            outs[name] = self._replay(site, x, quantize_activation, quantize_weight)
        return outs

    def _replay(self, site: Site, x: torch.Tensor, quantize_activation: bool, quantize_weight: bool) -> torch.Tensor:
        values = {site.raw_input: x} if quantize_activation else {site.activation_operand: x}
        nodes = [*(site.activation_chain if quantize_activation else []), *(site.weight_chain if not quantize_weight else []), site.node]
        fetch = lambda n: values[n] if n in values else self.env[n]  # noqa: E731
        for node in nodes:
            if node.op == "get_attr":
                values[node] = self.fetch_attr(node.target)
                continue
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), fetch)
            if node.target is fake_quantize and node.meta.get(ROLE_META_KEY) == WEIGHT and not quantize_weight:
                values[node] = args[0]  # fake-quant off: the float weight
            else:
                values[node] = node.target(*args, **kwargs)
        return values[site.node]


def _eval_copy(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """An eval-mode copy sharing `module`'s tensors. The train/eval pass is applied directly,
    not through run_pass: this private copy's mode switch must not appear in the dumps."""
    copied = copy_sharing_tensors(module)
    set_training_mode(False)(copied)
    copied.recompile()
    return copied.train(False)  # the graph is in eval already: this only sets the flags


def _converted_copy(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """What convert_pt2e returns, with the convert pass applied directly for the same
    reason as in _eval_copy: this private conversion must not appear in the dumps."""
    converted = copy_sharing_tensors(prepared)
    convert(converted)
    converted.recompile()
    converted.qatfx_stage = CONVERTED
    return converted


def _flat_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list:
    spec = getattr(gm, "_in_spec", None)
    return list(tree_flatten_spec((list(args), kwargs), spec)) if spec is not None else list(args)


def _batches(inputs: Any) -> list[tuple]:
    if isinstance(inputs, torch.Tensor):
        return [(inputs,)]
    if isinstance(inputs, tuple):
        return [inputs]
    if isinstance(inputs, list) and inputs:
        return [b if isinstance(b, tuple) else (b,) for b in inputs]
    raise TypeError(
        "compare(..., inputs): pass a tuple of model arguments (like example_inputs) or a "
        f"non-empty list of batches, got {type(inputs).__name__}"
    )


# ---- driver -----------------------------------------------------------------------------


@dataclass
class _Graph:
    """One qatfx graph to compare: its path in the model ("" for a whole-model capture), the
    eval-mode copies to run ("fake_quant", "converted"), and the sites of each."""

    region: str
    models: dict
    sites: dict

    @property
    def rows_sites(self) -> list[Site]:
        return next(iter(self.sites.values()))

    @property
    def modules(self) -> set:
        """Paths of the float modules whose hooks see this graph's linears."""
        return {s.module for s in self.rows_sites if s.capturable}


def _graphs(quantized: torch.nn.Module, float_model: torch.nn.Module) -> list[_Graph]:
    stage = model_stage(quantized) if isinstance(quantized, torch.nn.Module) else None
    if stage not in (PREPARED, CONVERTED):
        raise TypeError(
            f"compare needs a module returned by qatfx.prepare_pt2e or convert_pt2e, got {type(quantized).__name__}"
            + (f" at stage {stage!r}" if stage else "")
        )
    if stage == PREPARED:
        log.info("qatfx compare: converting a copy of the prepared module to compare it too")
    graphs = []
    for region, gm in graph_regions(quantized):
        models = _graph_models(gm, stage)
        graphs.append(_Graph(region, models, {name: find_sites(m, float_model, region) for name, m in models.items()}))
    if stage == PREPARED and not any(n.kwargs.get("enabled", True) for g in graphs for n in fake_quant_nodes(g.models["fake_quant"])):
        log.warning("qatfx compare: fake-quant is disabled in this module; its columns show the float model")
    return graphs


def _graph_models(gm: torch.fx.GraphModule, stage: str) -> dict:
    if stage == CONVERTED:
        return {"converted": _eval_copy(gm)}
    fake_quant = _eval_copy(gm)
    return {"fake_quant": fake_quant, "converted": _converted_copy(fake_quant)}


def _check_regions_exist(float_model: torch.nn.Module, graphs: list[_Graph]) -> None:
    for g in graphs:
        try:
            float_model.get_submodule(g.region)
        except AttributeError:
            raise ValueError(
                f"compare: float_model ({type(float_model).__name__}) has no module {g.region!r}, a region of the "
                "quantized model whose float inputs compare needs; pass the nn.Module that was prepared"
            ) from None


def compare(
    float_model: torch.nn.Module,
    quantized: torch.nn.Module,
    inputs: Union[tuple, list, torch.Tensor],
    *,
    dump_dir: Union[str, os.PathLike, None] = None,
) -> CompareReport:
    """Per-linear SQNR and max abs error of a prepared or converted qatfx module against
    the float model, sorted worst local SQNR first.

    float_model: the nn.Module the quantized module was prepared from, with the weights to
        compare against (the prepared module shares them: after QAT this is the trained
        float model; deepcopy it before training to compare with the starting weights).
    quantized: a module from `prepare_pt2e` (a converted copy is compared too) or
        `convert_pt2e`, whole-model or region capture; a torch.compile wrapper is unwrapped.
        For a region capture, each region graph runs on the float model's input of that
        region, so "end to end" measures from the region's input (a block, or a single
        linear); a region called several times per batch sums over its calls.
    inputs: one tuple of arguments (like example_inputs), or a list of batches.
    dump_dir: write `compare.html` here (default: $QATFX_DUMP_DIR, if set).

    Holds every linear's float input and output (and each region's inputs) for one batch
    at a time.
    """
    float_model = getattr(float_model, "_orig_mod", float_model)
    quantized = getattr(quantized, "_orig_mod", quantized)
    batches = _batches(inputs)
    regional = is_regional(quantized)
    acc = defaultdict(ErrorAccumulator)  # (model, row key, measure) -> accumulator
    with torch.no_grad():
        graphs = _graphs(quantized, float_model)
        if regional:
            _check_regions_exist(float_model, graphs)
        if not any(g.modules for g in graphs):
            log.warning(
                "qatfx compare: no linear layer of the quantized model was found as a module of float_model "
                "(%s); pass the nn.Module that was prepared", type(float_model).__name__
            )
        with _EvalMode(float_model):
            for args in batches:
                calls = _capture_float(float_model, graphs, args)
                for g in graphs:
                    if regional and not calls[g.region]:
                        log.warning("qatfx compare: region %s was not called by these inputs; its rows stay empty", g.region)
                    for call in calls[g.region]:
                        _compare_call(g, call, acc)
    model_names = graphs[0].models
    rows = [_row(site, acc, model_names) for g in graphs for site in g.rows_sites]
    rows += [_outside_row(r) for r in getattr(quantized, "qatfx_outside_layers", [])] if regional else []
    rows = mark_outliers([r for _, r in sorted(enumerate(rows), key=lambda p: sort_key(p[1], p[0]))])
    report = CompareReport(tuple(rows), len(batches), "fake_quant" in model_names, "converted" in model_names, regional)
    _write_html(report, dump_dir)
    return report


def _compare_call(graph: _Graph, call: _GraphCall, acc: dict) -> None:
    """Run each model of one graph on one call's inputs and add its sites' errors to `acc`."""
    outputs = {}
    for name, gm in graph.models.items():
        interpreter = _SiteInterpreter(gm, graph.sites[name], call.float_io)
        interpreter.run(*_flat_inputs(gm, call.args, call.kwargs))
        outputs[name] = interpreter.outputs
    _accumulate(acc, graph.rows_sites, call.float_io, outputs)


def _accumulate(acc: dict, sites: list[Site], float_io: dict, outputs: dict) -> None:
    for site in sites:
        io = float_io.get(site.module)
        if site.capturable and io is not None and site.call < len(io):
            y_float = io[site.call][1]
            for name, model_outputs in outputs.items():
                for measure, y in model_outputs[site.key].items():
                    if y.numel() == y_float.numel():
                        acc[name, site.key, measure].update(y_float, y.reshape(y_float.shape))
        if "fake_quant" in outputs:
            fq, conv = outputs["fake_quant"][site.key]["end_to_end"], outputs["converted"][site.key]["end_to_end"]
            acc["converted", site.key, "vs_fake_quant"].update(fq, conv)


def _row(site: Site, acc: dict, models: dict) -> CompareRow:
    def result(name: str, measure: str) -> Optional[Error]:
        key = (name, site.key, measure)
        return acc[key].result() if key in acc else None

    def errors(name: str) -> Optional[ModelErrors]:
        local, e2e = result(name, "local"), result(name, "end_to_end")
        if local is None or e2e is None:
            return None
        return ModelErrors(local, e2e, result(name, "weights_only"), result(name, "activations_only"))

    notes = []
    if not site.quantized:
        notes.append(f"skipped: {site.annotation.reason}")
    if not site.capturable:
        notes.append(f"no float activations: module {site.module or '<root>'} is not the linear itself")
    return CompareRow(
        layer=site.key,
        module=site.module,
        op=str(site.node.target).replace("aten.", "").removesuffix(".default"),
        shape=site.shape,
        scheme=_scheme(site.annotation) if site.quantized else "float",
        quantized=site.quantized,
        fake_quant=errors("fake_quant") if "fake_quant" in models else None,
        converted=errors("converted"),
        converted_vs_fake_quant=result("converted", "vs_fake_quant"),
        note="; ".join(notes),
    )


def _outside_row(report: Any) -> CompareRow:
    """A linear the model computes outside every region (summary's outside layer): float in
    both models, so there is nothing to compare; listed so the rows match qatfx.summary."""
    return CompareRow(
        layer=report.layer, module="", op=report.op, shape=report.shape, scheme="float", quantized=False,
        fake_quant=None, converted=None, converted_vs_fake_quant=None, note=f"skipped: {report.skip_reason}",
    )


def _scheme(annotation: Any) -> str:
    """The layer's own scheme (a MixedQuantizer gives each layer its own): "8da8w (int8/... x int8/...)"."""
    act = annotation.input_spec.describe() if annotation.input_spec else "float"
    return f"{scheme_name(annotation.input_spec, annotation.weight_spec)} ({act} x {annotation.weight_spec.describe()})"


def _write_html(report: CompareReport, dump_dir: Union[str, os.PathLike, None]) -> Optional[Path]:
    directory = resolve_dump_dir(dump_dir)
    if directory is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / HTML_NAME
    path.write_text(report.to_html())
    register_report(path, "per-layer SQNR (compare)")
    log.info("qatfx compare: wrote %s", path)
    return path


__all__ = ["CompareReport", "CompareRow", "Error", "ModelErrors", "compare", "sqnr_db"]
