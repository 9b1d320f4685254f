"""Find the embedding lookups of an exported graph: `aten.embedding(W, indices)` whose
table W (V, D) is a module parameter. Groups run along D, the table's last dim, as for a
linear weight's K, so the weight passes treat a table like an (N, K) weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx

from qatfx.graph.linear_sites import _module_type, get_attr_value
from qatfx.graph.regions import layer_path, region_of

aten = torch.ops.aten


@dataclass
class EmbeddingSite:
    node: torch.fx.Node
    param_node: torch.fx.Node  # the get_attr of the table
    param_name: str
    module_path: Optional[str]  # the embedding module's path (nn_module_stack), if recorded
    module_type: Optional[str]

    @property
    def layer_name(self) -> str:
        """The embedding module's name in the model. A tied table's get_attr may carry the
        lm_head's name (torch.export keeps one name per tensor), so the module path wins."""
        return self.module_path or self.param_name.removesuffix(".weight")


def module_path_of(node: torch.fx.Node) -> Optional[str]:
    """The path of the innermost module that ran `node` (nn_module_stack), if recorded."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    return path or None


def find_embedding_sites(gm: torch.fx.GraphModule) -> list[EmbeddingSite]:
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.embedding.default:
            continue
        table = node.args[0]
        if not isinstance(table, torch.fx.Node) or table.op != "get_attr":
            continue
        if not isinstance(get_attr_value(gm, table.target), torch.nn.Parameter):
            continue
        sites.append(EmbeddingSite(node, table, table.target, module_path_of(node), _module_type(node)))
    return sites


def embedding_layer_name(gm: torch.fx.GraphModule, site: EmbeddingSite) -> str:
    """The layer's name in the user's model (prefixed with a region's path)."""
    region = region_of(gm)
    # a region that is the embedding itself names its table `weight`: the layer is the region
    return layer_path(region, site.layer_name).removesuffix(".weight") if region else site.layer_name
