"""Where a qatfx model keeps its graphs.

A whole-model capture is one graph: the module prepare_pt2e returned. A region capture
(`prepare_pt2e(..., regions="auto")`) keeps the user's model object and puts one prepared
graph in place of each region (a decoder block, `lm_head`); a graph knows its path in the
model (`qatfx_region`), which prefixes its layer names so they read as in the model.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx

STAGE_ATTR = "qatfx_stage"
REGION_ATTR = "qatfx_region"
# Wrappers that hide a module under an attribute and drop that attribute from state_dict
# keys (activation checkpointing); layer names drop it too.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def is_qatfx_graph(module: object) -> bool:
    return isinstance(module, torch.fx.GraphModule) and hasattr(module, STAGE_ATTR)


def graph_regions(model: torch.nn.Module) -> list[tuple[str, torch.fx.GraphModule]]:
    """(path in `model`, graph) of every qatfx graph, outermost only, in module order;
    `[("", model)]` when `model` is itself one (a whole-model capture)."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    if is_qatfx_graph(model):
        return [("", model)]
    if not isinstance(model, torch.nn.Module):
        return []
    found: list[tuple[str, torch.fx.GraphModule]] = []
    for name, module in model.named_modules():
        if is_qatfx_graph(module) and not any(name.startswith(path + ".") for path, _ in found):
            found.append((name, module))
    return found


def model_stage(model: object) -> Optional[str]:
    """The stage of a qatfx model ("prepared", "converted"), None for any other object."""
    stages = {getattr(gm, STAGE_ATTR) for _, gm in graph_regions(model)} if isinstance(model, torch.nn.Module) else set()
    if len(stages) > 1:
        raise ValueError(f"the regions of this model are at different stages ({sorted(stages)}); prepare or convert it as a whole")
    return stages.pop() if stages else None


def is_regional(model: object) -> bool:
    """True for a user's model holding prepared regions (not one whole-model graph)."""
    model = getattr(model, "_orig_mod", model)
    return isinstance(model, torch.nn.Module) and not is_qatfx_graph(model) and bool(graph_regions(model))


def layer_path(region: str, layer: str) -> str:
    """A layer's name in the model: the region's path (wrappers left out) + its name in the region."""
    prefix = region + "." if region else ""
    for part in _WRAPPER_PARTS:
        prefix = prefix.replace(part, "")
    return prefix + layer


def region_of(gm: torch.fx.GraphModule) -> str:
    return getattr(gm, REGION_ATTR, "") or ""
