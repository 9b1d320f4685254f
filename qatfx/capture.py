"""Capture a model as an exported GraphModule, with clear errors for what cannot be."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.fx
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree

from qatfx.ops import fake_quantize

log = logging.getLogger("qatfx.capture")


class CaptureError(RuntimeError):
    """torch.export could not capture the model; the message carries the exporter's reason."""


def automatic_dynamic_shapes(args: tuple, kwargs: dict):
    """Every dim of every tensor input is Dim.AUTO: batch and sequence length stay dynamic
    unless the model pins them (hidden sizes get specialized without error)."""

    def spec(value):
        if not isinstance(value, torch.Tensor):
            return None
        if 1 in value.shape:
            log.warning(
                "qatfx: an example input of shape %s has a dim of size 1; torch.export fixes "
                "size-1 dims, so that dim will not accept other sizes. Use example inputs with "
                "batch and sequence length >= 2 to keep them dynamic.",
                tuple(value.shape),
            )
        return {d: Dim.AUTO for d in range(value.dim())}

    return pytree.tree_map(spec, (args, kwargs)) if kwargs else pytree.tree_map(spec, args)


def _check_exported(gm: torch.fx.GraphModule) -> None:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    if any(n.target is fake_quantize for n in nodes):
        raise ValueError(
            "this module is already prepared (it contains qatfx.fake_quantize nodes); "
            "prepare_pt2e must run once, on the float model"
        )
    if any(n.op == "call_module" and not n.target.startswith("_guards") for n in gm.graph.nodes) or any(
        "val" not in n.meta for n in nodes
    ):
        raise ValueError(
            "this GraphModule does not come from torch.export (it lacks node.meta['val'] or "
            "calls submodules, as torch.fx.symbolic_trace graphs do); pass the nn.Module with "
            "example_inputs, an ExportedProgram, or torch.export.export(...).module()"
        )


def capture(
    model: Any,
    example_inputs: Optional[tuple] = None,
    *,
    example_kwargs: Optional[dict] = None,
    dynamic_shapes: Any = None,
    strict: bool = False,
) -> torch.fx.GraphModule:
    """An exported GraphModule for an nn.Module (exported here), an ExportedProgram, or the
    GraphModule of `ep.module()`."""
    if isinstance(model, ExportedProgram):
        gm = model.module()
    elif isinstance(model, torch.fx.GraphModule):
        gm = model
    elif isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise ValueError(
                "prepare_pt2e(model, quantizer, example_inputs): example_inputs (a tuple of "
                "tensors the model accepts) is required to export an nn.Module"
            )
        if not isinstance(example_inputs, tuple):
            example_inputs = (example_inputs,)
        kwargs = example_kwargs or {}
        if dynamic_shapes is None:
            dynamic_shapes = automatic_dynamic_shapes(example_inputs, kwargs)
        try:
            ep = torch.export.export(model, example_inputs, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
        except Exception as exc:
            raise CaptureError(
                f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}\n"
                "Hints: check example_inputs match the model's forward; pass dynamic_shapes= "
                "explicitly (e.g. static shapes with dynamic_shapes={}) if a dynamic dim is "
                "rejected; try strict=False / strict=True; or export yourself and pass the "
                "ExportedProgram."
            ) from exc
        gm = ep.module()
    else:
        raise TypeError(
            f"prepare_pt2e expects an nn.Module, an ExportedProgram or an exported GraphModule, "
            f"got {type(model).__name__}"
        )
    _check_exported(gm)
    return gm
