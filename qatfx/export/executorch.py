"""`qatfx.export.executorch(converted, path)`: a `.pte` for ExecuTorch's XNNPACK backend.

The converted model is copied, its qatfx ops rewritten into the patterns XNNPACK delegates
(xnnpack_patterns.py: int8 dynamic per-token activations x int4 per-group weights (8da4w) or
int8 per-channel weights (8da8w), with the codes convert produced; quantized embeddings to
ExecuTorch's quantized embedding ops), exported with torch.export, lowered with
`to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])` and written as a
`.pte`. The report says how many quantized linears the delegate took and names the rest.
Then, by default, the `.pte` is run in ExecuTorch's runtime on held-out inputs and checked
against the converted model (verify.py); the report carries the result.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from qatfx.export.verify import (
    DEFAULT_MAX_RELATIVE_ERROR,
    DEFAULT_MIN_NEXT_TOKEN_AGREEMENT,
    ExportError,
    VerificationError,
    VerifyReport,
    check_thresholds,
    held_out_inputs,
    verify_pte,
)
from qatfx.export.xnnpack_patterns import CODES_SUFFIX, rewrite_for_xnnpack
from qatfx.capture import kv_cache_off
from qatfx.formats import format_for
from qatfx.graph.meta import CONVERTED
from qatfx.graph.regions import graph_regions, model_stage
from qatfx.module import copy_model_sharing_tensors, copy_sharing_tensors
from qatfx.serialization import default_example_inputs
from qatfx.spec import TORCHAO, PerChannel, PerGroup, PerToken
from qatfx.summary import summary

log = logging.getLogger("qatfx.export")


@dataclass
class ExecuTorchExport:
    path: Path
    bytes: int
    quantized_layers: int  # quantized linears rewritten into XNNPACK's patterns
    delegated: int  # of those, taken by XNNPACK
    not_delegated: dict = field(default_factory=dict)  # weight -> reason
    float_layers: list = field(default_factory=list)  # linears convert left in float (summary's reasons)
    differences: list = field(default_factory=list)  # how the runtime's arithmetic differs from training
    verification: Optional[VerifyReport] = None  # the .pte vs the converted model (None: verify=False)
    weight_kinds: dict = field(default_factory=dict)  # "int4" (per group) / "int8" (per channel) -> linears rewritten

    def __str__(self) -> str:
        if len(self.weight_kinds) == 1:
            linears = f"{next(iter(self.weight_kinds))} linears"
        else:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.weight_kinds.items()))
            linears = "quantized linears" + (f" ({kinds})" if kinds else "")
        lines = [
            f"{self.path}: {self.bytes} bytes; {self.delegated}/{self.quantized_layers} {linears} delegated to XNNPACK",
            *(f"  not delegated: {name}: {reason}" for name, reason in self.not_delegated.items()),
            *(f"  float (not quantized): {layer}" for layer in self.float_layers),
            *(f"  differs from training: {d}" for d in self.differences),
            *([str(self.verification)] if self.verification is not None else []),
        ]
        return "\n".join(lines)


def _executorch():
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as exc:
        raise ExportError(
            f"exporting to ExecuTorch needs the executorch package ({exc}); install it with "
            "`pip install -e \".[executorch]\"` (executorch 1.5.1 with torch 2.13 / torchao 0.18)"
        ) from exc
    return to_edge_transform_and_lower, XnnpackPartitioner


def rewritten_copy(converted: torch.nn.Module) -> tuple[torch.nn.Module, list, list]:
    """A copy of `converted` (sharing its tensors) with every graph rewritten into XNNPACK's
    patterns; the weights rewritten and the qatfx ops left, over all regions."""
    regional = bool(graph_regions(converted)) and graph_regions(converted)[0][0] != ""
    copy = copy_model_sharing_tensors(converted) if regional else copy_sharing_tensors(converted)
    weights, left = [], []
    for path, gm in graph_regions(copy):
        report = rewrite_for_xnnpack(gm)
        prefix = f"{path}." if path else ""
        weights += [prefix + w for w in report.weights]
        left += [(prefix + name, reason) for name, reason in report.left]
    return copy, weights, left


def weight_kinds(rewritten: torch.nn.Module, weights: list) -> dict:
    """How many of the rewritten `weights` (rewritten_copy's) are int4 per-group and int8
    per-channel, read from the dequantize each was rewritten into."""
    codes = {w + CODES_SUFFIX for w in weights}
    kinds: dict = {}
    for path, gm in graph_regions(rewritten):
        prefix = f"{path}." if path else ""
        for node in gm.graph.nodes:
            source = node.args[0] if node.op == "call_function" and node.args else None
            if isinstance(source, torch.fx.Node) and source.op == "get_attr" and prefix + source.target in codes:
                kind = "int4" if "per_channel_group" in str(node.target) else "int8"
                kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def executorch(
    converted: torch.nn.Module,
    path: Union[str, os.PathLike],
    *,
    example_inputs: Optional[tuple] = None,
    example_kwargs: Optional[dict] = None,
    dynamic_shapes: Any = None,
    verify: bool = True,
    verify_inputs: Optional[list] = None,
    min_next_token_agreement: float = DEFAULT_MIN_NEXT_TOKEN_AGREEMENT,
    max_relative_error: float = DEFAULT_MAX_RELATIVE_ERROR,
) -> ExecuTorchExport:
    """Write `converted` (from convert_pt2e) to `path` as an ExecuTorch program delegated to
    XNNPACK. The program takes the inputs `converted` was captured with (default: their
    shapes, fixed; pass `example_inputs` and `dynamic_shapes` with bounded `Dim`s for other
    sizes) and returns what `converted` returns.

    verify: run the written `.pte` in ExecuTorch's runtime and `converted` on held-out inputs
    (`verify_inputs`, a list of argument tuples, called with `example_kwargs`; default:
    `held_out_inputs`, random token ids / randn shaped like the example inputs) and raise
    VerificationError when next-token agreement < `min_next_token_agreement` or the relative
    logit error > `max_relative_error` (the file stays written, for inspection)."""
    module = getattr(converted, "_orig_mod", converted)
    stage = model_stage(module)
    if stage != CONVERTED:
        raise ExportError(
            "qatfx.export.executorch needs a module returned by qatfx.convert_pt2e "
            f"(got {'a module at stage ' + repr(stage) if stage else type(module).__name__}); convert it first"
        )
    _refuse_weight_only(module)
    _refuse_schemes_xnnpack_does_not_run(module)
    if verify:
        check_thresholds(min_next_token_agreement, max_relative_error)  # before minutes of lowering
    to_edge_transform_and_lower, XnnpackPartitioner = _executorch()
    if example_inputs is None:
        example_inputs, recorded = default_example_inputs(module)
        example_kwargs = recorded if example_kwargs is None else example_kwargs
    rewritten, weights, left = rewritten_copy(module)
    _refuse_unrewritten(left)
    try:
        with kv_cache_off(rewritten):  # a default HF config (use_cache=True) would return a DynamicCache
            ep = torch.export.export(rewritten, tuple(example_inputs), example_kwargs or {}, dynamic_shapes=dynamic_shapes, strict=False)
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        program = edge.to_executorch()
    except Exception as exc:
        raise ExportError(
            f"lowering to ExecuTorch failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}\n"
            "Pass example_inputs= the model accepts; with dynamic_shapes=, give every Dim a max (ExecuTorch plans memory for it)"
        ) from exc
    delegated, not_delegated = delegation(edge.exported_program(), weights, left)
    target = write_program(program, path)
    report = ExecuTorchExport(
        path=target,
        bytes=len(program.buffer),
        quantized_layers=len(weights),
        delegated=delegated,
        not_delegated=not_delegated,
        float_layers=[f"{r.layer} ({r.skip_reason})" for r in summary(module).skipped],
        differences=_differences(module),
        weight_kinds=weight_kinds(rewritten, weights),
    )
    if verify:
        inputs = verify_inputs if verify_inputs is not None else held_out_inputs(module, example_inputs, example_kwargs)
        try:
            with kv_cache_off(module):
                report.verification = verify_pte(
                    target, module, inputs, kwargs=example_kwargs,
                    min_next_token_agreement=min_next_token_agreement, max_relative_error=max_relative_error,
                )
        except VerificationError as exc:
            exc.export = report  # what was written, for the caller that wants to inspect it
            raise
    log.info("qatfx: %s", report)
    return report


def _refuse_weight_only(module: torch.nn.Module) -> None:
    """XNNPACK's partitioner delegates quantized linears whose activations are quantized too
    (dynamic int8 per token x int4 per group / int8 per channel); a weight-only linear (float
    activations) becomes a bare qatfx dequantize, which ExecuTorch has no kernel for and
    `to_executorch` refuses ("Missing out variants") after minutes of lowering. Say so first."""
    weight_only = [r for r in summary(module).quantized if r.op != "embedding" and r.input_spec is None]
    if weight_only:
        schemes = sorted({r.weight_spec.describe() for r in weight_only})
        raise ExportError(
            f"{len(weight_only)} linear(s) are weight-only quantized ({'; '.join(schemes)}; e.g. {weight_only[0].layer}): "
            "ExecuTorch's XNNPACK delegate runs quantized linears with int8 dynamic per-token activations only, and "
            "ExecuTorch has no kernel for a weight-only dequantize. Train with qatfx.Int8DynActInt4WeightQuantizer "
            "(8da4w; scales_precision=torch.bfloat16 keeps XNNPACK's grid exact) or qatfx.Int8DynActInt8WeightQuantizer "
            "(8da8w), or export this model to GGUF "
            "(qatfx.export.gguf) or compressed-tensors (qatfx.export.hf), which hold weight-only grids"
        )


def _xnnpack_problem(report) -> Optional[str]:
    """Why XNNPACK (or ExecuTorch's quantized embedding ops) cannot run a quantized layer's
    scheme, or None. Weight-only linears are `_refuse_weight_only`'s."""
    weight, act = report.weight_spec, report.input_spec
    per_group4 = weight.bits == 4 and isinstance(weight.granularity, PerGroup)
    per_row8 = weight.bits == 8 and isinstance(weight.granularity, PerChannel)
    if not weight.symmetric or not (per_group4 or per_row8):
        return f"weights {weight.describe()}: XNNPACK takes symmetric int4 per group or int8 per channel"
    if report.op == "embedding" or act is None:
        return None
    if (act.bits, act.granularity, act.symmetric, act.scale_rule) != (8, PerToken(), False, TORCHAO):
        return f"activations {act.describe()}: XNNPACK quantizes activations int8 per token, asymmetric"
    return None


def _refuse_schemes_xnnpack_does_not_run(module: torch.nn.Module) -> None:
    """Name every layer whose scheme has no XNNPACK pattern (llama.cpp's Q8_0 activations,
    int3 weights, asymmetric weights, ...) before minutes of lowering."""
    problems = [(r, why) for r in summary(module).quantized if (why := _xnnpack_problem(r)) is not None]
    if problems:
        shown = "".join(f"  {r.layer} ({r.scheme}): {why}\n" for r, why in problems[:8])
        more = f"  ... and {len(problems) - 8} more\n" if len(problems) > 8 else ""
        raise ExportError(
            f"{len(problems)} quantized layer(s) use a scheme ExecuTorch's XNNPACK delegate does not run:\n{shown}{more}"
            "Train for ExecuTorch with qatfx.presets.executorch_llama() (8da4w body, 8da8w output, int8 embeddings) or "
            "Int8DynActInt4WeightQuantizer / Int8DynActInt8WeightQuantizer, or export this model to GGUF "
            "(qatfx.export.gguf: llama.cpp's Q4_0 / Q8_0) or compressed-tensors (qatfx.export.hf)"
        )


def _refuse_unrewritten(left: list) -> None:
    """A qatfx op the rewrite has no XNNPACK pattern for stays a qatfx op, which ExecuTorch has
    no kernel for: `to_executorch` would refuse it ("Missing out variants") after the lowering.
    Name each, with the reason, before any lowering."""
    if left:
        raise ExportError(
            f"{len(left)} quantized op(s) have no XNNPACK pattern, and ExecuTorch has no kernel for qatfx ops:\n"
            + "".join(f"  {name}: {reason}\n" for name, reason in left)
            + "XNNPACK delegates int8 dynamic per-token activations x int4 per-group (8da4w) or int8 per-channel "
            "(8da8w) symmetric weights; train with qatfx.Int8DynActInt4WeightQuantizer / Int8DynActInt8WeightQuantizer "
            "(or qatfx.presets.executorch_llama()), or export to GGUF (qatfx.export.gguf)"
        )


def delegation(ep, weights: list, left: list) -> tuple[int, dict]:
    """How many rewritten quantized linears (int4 per group, int8 per channel) the delegate
    took, and the others with the reason (those the partitioner left, and the qatfx ops and
    weights the rewrite had no pattern for)."""
    not_delegated = _outside_delegates(ep, weights)
    not_delegated.update(dict(left))
    return len(weights) - sum(1 for w in weights if w in not_delegated), not_delegated


def write_program(program, path: Union[str, os.PathLike]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(program.buffer)
    return target


def _outside_delegates(ep, weights: list) -> dict:
    """The rewritten weights whose dequantize (per channel group: int4; per channel: int8)
    the partitioner left in the top-level graph."""
    remaining = {}
    names = {w.replace(".", "_") + CODES_SUFFIX: w for w in weights}
    for node in ep.graph.nodes:
        if node.op == "call_function" and "dequantize_per_channel" in str(node.target):
            source = node.args[0]
            key = next((k for k in names if k in getattr(source, "name", "") or k in str(getattr(source, "target", ""))), None)
            remaining[names.get(key, source.name)] = "XNNPACK's partitioner did not take this linear (shape or operand pattern it does not support)"
    return remaining


def _differences(module: torch.nn.Module) -> list:
    """What the XNNPACK runtime computes differently from training."""
    found = ["activations: the program quantizes them per token like quantized_decomposed.quantize_per_token (x / scale in float64, a nudged float32 zero point; qatfx rounds in float32 with zero = qmin - round(min / scale)), so a value or zero point at a rounding tie can get the neighbouring int8 code"]
    # XNNPACK stores int4 weights' scales (per group, qb4w) in bfloat16; int8 per-channel
    # weights (qc8w) keep float32 scales, which hold any trained scale exactly; embeddings
    # run in ExecuTorch's quantized kernels with float32 scales, not in XNNPACK
    scale_dtypes = {
        r.weight_spec.scale_dtype for r in summary(module).quantized
        if r.op != "embedding" and format_for(r.weight_spec).name == "int4_packed"
    }
    if any(dtype != torch.bfloat16 for dtype in scale_dtypes):
        found.append(
            "weights: XNNPACK stores int4 weights' per-group scales in bfloat16; these were trained in "
            f"{', '.join(sorted(str(d).removeprefix('torch.') for d in scale_dtypes))}, so scales are rounded "
            "(train with Int8DynActInt4WeightQuantizer(..., scales_precision=torch.bfloat16) for an identical weight grid)"
        )
    return found
