"""Arguments of a custom-op node by name, so no caller reads a long signature by position."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx


def op_arguments(node: torch.fx.Node) -> dict[str, Any]:
    """`{argument name: value}` of a call to an OpOverload, from its schema; defaults fill
    what the call left out (post-grad graphs pass custom-op arguments positionally)."""
    schema = node.target._schema
    values = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values
