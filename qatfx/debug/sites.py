"""The linear sites of a prepared or converted graph, as `compare` needs them.

A site is a node carrying the quantizer's annotation (`node.meta["qatfx_annotation"]`,
kept through convert). For each one: the row name (the annotation's layer name, which
`qatfx.summary` and `skip=[...]` use), the float module whose forward hook sees the same
linear (the innermost `nn_module_stack` entry), the raw activation before qatfx quantized
it, and the quantization nodes on the way:

    prepared:   x -> fake_quantize -> linear(., fq_w)            fq_w = fake_quantize(w)
    converted:  x -> quantize_dynamic -> getitem x3 -> dequantize -> linear(., dequantize_int4(...))

A region graph (region capture) names its modules from the region down; its sites' module
paths are prefixed with the region's path, so they name modules of the whole float model.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx

from qatfx.graph.linear_sites import SITE_OPERANDS, TRANSPOSES
from qatfx.graph.meta import ANNOTATION_KEY
from qatfx.graph.regions import layer_path
from qatfx.ops import fake_quantize
from qatfx.quantizer import LinearAnnotation

aten = torch.ops.aten

# What may sit between a weight parameter and its site in a prepared graph (insert_fake_quant).
_WEIGHT_PATH = {fake_quantize, aten.clone.default, *TRANSPOSES}


@dataclass
class Site:
    node: torch.fx.Node
    key: str  # row name: the layer, "@i" appended for its i-th call
    module: str  # path in the float model of the module whose hook sees this linear
    call: int  # which call of `module`, in execution order
    annotation: Any
    raw_input: torch.fx.Node  # the activation before qatfx quantized it
    activation_chain: list  # qatfx nodes between raw_input and the site, graph order
    weight_chain: Optional[list]  # get_attr -> [t] -> fake_quantize -> [t], graph order; None if not fake-quant
    capturable: bool  # the module's hook sees this linear's own input and output

    @property
    def quantized(self) -> bool:
        return isinstance(self.annotation, LinearAnnotation)

    @property
    def activation_operand(self) -> torch.fx.Node:
        return self.node.args[SITE_OPERANDS[self.node.target][0]]

    @property
    def shape(self) -> tuple:
        """(N, K) from the export's fake values; -1 where unknown."""
        out, x = self.node.meta.get("val"), self.activation_operand.meta.get("val")
        return (int(out.shape[-1]) if out is not None else -1, int(x.shape[-1]) if x is not None else -1)


def is_qatfx_op(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "qatfx"


def _is_activation_quant(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return isinstance(node.args[0], torch.fx.Node) and is_qatfx_op(node.args[0].target)
    return is_qatfx_op(node.target)


def _activation_chain(site: torch.fx.Node, order: dict) -> tuple[torch.fx.Node, list]:
    operand = site.args[SITE_OPERANDS[site.target][0]]
    chain, raw, stack = [], set(), [operand]
    while stack:
        node = stack.pop()
        if node in chain or node in raw:
            continue
        if _is_activation_quant(node):
            chain.append(node)
            stack.extend(node.all_input_nodes)
        elif node.op != "get_attr":
            raw.add(node)
    if len(raw) != 1:
        raise RuntimeError(f"qatfx compare: the activation of {site.name} comes from {len(raw)} nodes; expected one")
    return raw.pop(), sorted(chain, key=order.__getitem__)


def _weight_chain(site: torch.fx.Node, order: dict) -> Optional[list]:
    """The prepared weight path, to replay with fake-quant off; None when there is none."""
    chain, stack = [], [site.args[SITE_OPERANDS[site.target][1]]]
    while stack:
        node = stack.pop()
        if node.op == "get_attr":
            chain.append(node)
        elif node.op == "call_function" and node.target in _WEIGHT_PATH:
            chain.append(node)
            stack.extend(node.all_input_nodes)
        else:
            return None
    if not any(n.target is fake_quantize for n in chain):
        return None
    return sorted(chain, key=order.__getitem__)


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _capturable(model: torch.nn.Module, module: str, module_layer: str, layer: str) -> bool:
    """The hook on `module` sees the linear's own input and output: an nn.Linear, or a leaf
    module owning the weight (GPT-2's Conv1D; `module_layer`, the module's path as a layer
    name, is the layer). Not a bigger module calling F.linear."""
    try:
        sub = model.get_submodule(module)
    except AttributeError:
        return False
    if isinstance(sub, torch.nn.Linear):
        return True
    return module_layer == layer and next(sub.children(), None) is None


def _join(region: str, path: str) -> str:
    return f"{region}.{path}" if region and path else region or path


def find_sites(gm: torch.fx.GraphModule, float_model: torch.nn.Module, region: str = "") -> list[Site]:
    """The sites of `gm`, a whole-model graph of `float_model` or (region capture) the graph
    standing at path `region` in it."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites, module_calls, layer_calls = [], defaultdict(int), defaultdict(int)
    for node in gm.graph.nodes:
        annotation = node.meta.get(ANNOTATION_KEY)
        if annotation is None or node.op != "call_function" or node.target not in SITE_OPERANDS:
            continue
        # layer names of a region graph are full already (the quantizer prefixes them)
        inner, layer = _module_path(node), annotation.layer
        module = _join(region, inner)
        raw, chain = _activation_chain(node, order)
        sites.append(
            Site(
                node=node,
                key=layer if layer_calls[layer] == 0 else f"{layer}@{layer_calls[layer]}",
                module=module,
                call=module_calls[module],
                annotation=annotation,
                raw_input=raw,
                activation_chain=chain,
                weight_chain=_weight_chain(node, order),
                capturable=_capturable(float_model, module, layer_path(region, inner), layer),
            )
        )
        module_calls[module] += 1
        layer_calls[layer] += 1
    return sites
