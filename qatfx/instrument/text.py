"""A graph as readable text: its generated code, then one line per node with its shape,
the pass that created it and, where recorded, the line of code that did."""

from __future__ import annotations

from typing import Union

import torch.fx

from qatfx.graph.meta import PASS_META_KEY, SOURCE_META_KEY


def _describe_val(node: torch.fx.Node) -> str:
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is None:
        return "-"
    return f"{str(val.dtype).replace('torch.', '')}{list(shape)}"


def _code(graph: Union[torch.fx.GraphModule, torch.fx.Graph]) -> str:
    if isinstance(graph, torch.fx.GraphModule):
        return graph.print_readable(print_output=False).rstrip()
    try:  # a bare graph (Inductor's post-grad graph is passed to us without its module)
        return graph.python_code(root_module="self").src.rstrip()
    except Exception as exc:  # an invalid graph still gets its node lines
        return f"# no code: {exc}"


def format_graph(gm: Union[torch.fx.GraphModule, torch.fx.Graph], title: str, origin: str = "torch.export") -> str:
    """Readable text of `gm`; `origin` names the maker of nodes no qatfx pass made."""
    graph = gm.graph if isinstance(gm, torch.fx.GraphModule) else gm
    lines = [f"# {title}", "", _code(gm), "", "# nodes"]
    width = max((len(n.name) for n in graph.nodes), default=4)
    for node in graph.nodes:
        made_by = node.meta.get(PASS_META_KEY, origin)
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        line = f"{node.name:<{width}}  {node.op:<13}  {str(target):<40}  {_describe_val(node):<24}  made_by={made_by}"
        source = node.meta.get(SOURCE_META_KEY)
        lines.append(f"{line}  at={source}" if source else line)
    return "\n".join(lines) + "\n"
