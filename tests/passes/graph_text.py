"""A compact, torch-version-stable text of the qatfx-owned part of a graph, for goldens:
qatfx ops, their getitems, and the linear ops they feed."""

import operator

import torch

_LINEAR = {torch.ops.aten.linear.default, torch.ops.aten.matmul.default, torch.ops.aten.addmm.default, torch.ops.aten.t.default}


def _arg(a):
    if isinstance(a, torch.fx.Node):
        return a.name
    if isinstance(a, float):
        return f"{a:.6g}"
    return str(a).replace("torch.", "")


def qatfx_graph_text(gm) -> str:
    lines = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        name = getattr(n.target, "name", lambda: str(n.target))()
        getitem_of_qatfx = n.target is operator.getitem and str(getattr(n.args[0].target, "namespace", "")) == "qatfx"
        if not (name.startswith("qatfx::") or n.target in _LINEAR or getitem_of_qatfx):
            continue
        args = [_arg(a) for a in n.args] + [f"{k}={_arg(v)}" for k, v in n.kwargs.items()]
        target = "getitem" if n.target is operator.getitem else name.replace("aten::", "").replace(".default", "")
        lines.append(f"{n.name} = {target}({', '.join(args)})")
    return "\n".join(lines)
