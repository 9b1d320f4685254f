"""Find the linear-like ops of an exported graph and describe their operands.

A site is `aten.linear(x, W, b)` (W is (N, K)), or `aten.matmul / aten.mm(x, W)` and
`aten.addmm(b, x, W)` whose second operand is a parameter: either the parameter itself
((K, N) as in GPT-2's Conv1D) or its transpose `t(W)` / `transpose(W, 0, 1)` /
`permute(W, [1, 0])` ((N, K) stored). Matmuls between two activations are not sites.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx

aten = torch.ops.aten

# target -> (index of the activation operand, index of the weight operand)
SITE_OPERANDS = {
    aten.linear.default: (0, 1),
    aten.matmul.default: (0, 1),
    aten.mm.default: (0, 1),
    aten.addmm.default: (1, 2),
}
TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}


@dataclass
class LinearSite:
    node: torch.fx.Node
    input_index: int
    weight_index: int
    # The get_attr node of the weight parameter, and its attribute path.
    param_node: Optional[torch.fx.Node]
    param_name: Optional[str]
    # True when the stored parameter is (K, N): the input dim is its first dim.
    param_is_k_by_n: bool
    # The node that reads the parameter: the site itself or the transpose between them.
    param_user: torch.fx.Node
    module_type: Optional[str]

    @property
    def layer_name(self) -> str:
        if self.param_name is None:
            return self.node.name
        return self.param_name.removesuffix(".weight")

    @property
    def input_node(self) -> torch.fx.Node:
        return self.node.args[self.input_index]

    @property
    def weight_operand(self) -> torch.fx.Node:
        return self.node.args[self.weight_index]


def get_attr_value(gm: torch.fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_plain_2d_transpose(node: torch.fx.Node) -> bool:
    if node.target in (aten.t.default, aten.numpy_T.default):
        return True
    if node.target is aten.transpose.int:
        return sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    return False


def _module_type(node: torch.fx.Node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    _, module_type = list(stack.values())[-1]
    return module_type if isinstance(module_type, str) else module_type.__qualname__


def find_linear_sites(gm: torch.fx.GraphModule) -> list[LinearSite]:
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SITE_OPERANDS:
            continue
        x_index, w_index = SITE_OPERANDS[node.target]
        operand = node.args[w_index]
        if not isinstance(operand, torch.fx.Node):
            continue
        k_by_n = node.target is not aten.linear.default
        param_user = node
        if operand.op == "call_function" and operand.target in TRANSPOSES and _is_plain_2d_transpose(operand):
            param_user, operand, k_by_n = operand, operand.args[0], not k_by_n
        is_param = operand.op == "get_attr" and isinstance(
            get_attr_value(gm, operand.target), torch.nn.Parameter
        )
        if node.target is not aten.linear.default and not is_param:
            continue  # activation @ activation (attention scores): not a linear layer
        sites.append(
            LinearSite(
                node=node,
                input_index=x_index,
                weight_index=w_index,
                param_node=operand if is_param else None,
                param_name=operand.target if is_param else None,
                param_is_k_by_n=k_by_n,
                param_user=param_user,
                module_type=_module_type(node),
            )
        )
    return sites
