"""A converted model's tensors, named as in the user's model: the integer codes and scales
convert produced for each quantized weight, and every other parameter and buffer in float.

File-format exports (GGUF, compressed-tensors) write these, not a re-quantization of
dequantized weights, so the file holds the grid QAT trained (docs/deploy.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from qatfx import reference
from qatfx.formats.base import elements_per_group
from qatfx.formats.int4_packed import tile
from qatfx.graph.linear_sites import get_attr_value
from qatfx.graph.meta import CONVERTED
from qatfx.graph.regions import graph_regions, layer_path, model_stage
from qatfx.ops import dequantize
from qatfx.spec import QuantSpec
from qatfx.summary import summary


@dataclass(frozen=True)
class QuantizedWeight:
    """One weight as convert stored it, codes unpacked (not re-derived).

    codes: (N, K) int8, the trained integer grid. scales: (N, K // group_size) as stored
    (their dtype is the spec's scale dtype). zeros: None for symmetric weights."""

    name: str
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    group_size: int  # elements per scale along K
    spec: Optional[QuantSpec]  # the weight spec the layer trained with (None: not in the summary)

    @property
    def shape(self) -> tuple:
        return tuple(self.codes.shape)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(codes - zeros) * scales: exactly what the converted model multiplies by."""
        return reference.dequantize(self.codes, self.scales, self.zeros, self.group_size, dtype)


@dataclass(frozen=True)
class ConvertedTensors:
    quantized: dict  # weight name -> QuantizedWeight
    float: dict  # parameter / buffer name -> tensor, for everything left in float


def _weight_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Optional[tuple[str, torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]]:
    """(attr path, codes, scales, zeros, group size) of a weight dequantize node, else None
    (activation dequantizes read a call_function's output, not a get_attr)."""
    if node.op != "call_function" or not node.args or getattr(node.args[0], "op", None) != "get_attr":
        return None
    if node.target is torch.ops.qatfx.dequantize_int4.default:
        packed_node, scales_node, _sums, group_size, _ = node.args
        packed = get_attr_value(gm, packed_node.target)
        k = 2 * packed.shape[-1]
        codes = reference.unpack_int4(packed, tile(group_size, k))
        return packed_node.target, codes, get_attr_value(gm, scales_node.target), None, elements_per_group(group_size, k)
    if node.target is torch.ops.qatfx.dequantize_int4_zp.default:
        packed_node, scales_node, zeros_node, group_size, _ = node.args
        packed = get_attr_value(gm, packed_node.target)
        k = 2 * packed.shape[-1]
        codes = reference.unpack_nibbles(packed, elements_per_group(group_size, k)).to(torch.int8)  # unsigned codes
        zeros = get_attr_value(gm, zeros_node.target)
        return packed_node.target, codes, get_attr_value(gm, scales_node.target), zeros, elements_per_group(group_size, k)
    if node.target is dequantize:
        codes_node, scales_node, zeros_node, group_size, _ = node.args
        codes = get_attr_value(gm, codes_node.target)
        zeros = None if zeros_node is None else get_attr_value(gm, zeros_node.target)
        k = codes.shape[-1]
        return codes_node.target, codes, get_attr_value(gm, scales_node.target), zeros, elements_per_group(group_size, k)
    return None


def converted_tensors(converted: torch.nn.Module) -> ConvertedTensors:
    """The quantized weights (by the model's weight name, e.g. `model.layers.0.mlp.up_proj.weight`)
    and the float tensors of a module returned by `qatfx.convert_pt2e` (whole-model or region
    capture). A tied weight appears once."""
    module = getattr(converted, "_orig_mod", converted)
    if model_stage(module) != CONVERTED:
        raise ValueError(
            f"expected a module returned by qatfx.convert_pt2e, got {type(module).__name__}"
            f"{' at stage ' + repr(model_stage(module)) if model_stage(module) else ''}; convert it first"
        )
    specs = {report.layer + ".weight": report.weight_spec for report in summary(module).quantized}
    quantized: dict = {}
    stored_parts: set = set()  # model names of the parts quantized weights are stored in
    for region, gm in graph_regions(module):
        for node in gm.graph.nodes:
            found = _weight_of(gm, node)
            if found is None:
                continue
            target, codes, scales, zeros, group_size = found
            name = layer_path(region, target.removesuffix("_packed"))
            quantized[name] = QuantizedWeight(name, codes, scales, zeros, group_size, specs.get(name))
            stored_parts.add(name + "_")
    floats = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        name = layer_path("", name)
        if not any(name.startswith(prefix) for prefix in stored_parts):
            floats.setdefault(name, tensor.detach())
    return ConvertedTensors(quantized, floats)
