"""A graph as plain data (one `NodeInfo` per node), and the diff of two of them.

A snapshot is taken before a pass and after it, so the two stay comparable even though the
pass edits the graph in place. Nodes are matched by (name, op, target): a node only in the
graph after the pass was added, one only before was removed, and one in both whose
arguments or qatfx metadata differ was changed (a train/eval switch flips an argument in
place; annotate writes `qatfx_annotation`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx

from qatfx.graph.meta import PASS_META_KEY, RULE_META_KEY, SOURCE_META_KEY

_PROVENANCE_KEYS = (PASS_META_KEY, SOURCE_META_KEY, RULE_META_KEY)
_MAX_ARGS_CHARS = 240


@dataclass(frozen=True)
class NodeInfo:
    name: str
    op: str
    target: str
    args: str  # "(%x, 32, torch.float32)": other nodes as %name
    inputs: tuple[str, ...]  # names of the nodes it reads, for the drawing
    value: str  # "float32[s0, 8, 64]" from node.meta["val"], or "-"
    made_by: str  # the qatfx pass (and rule) that created it, or the graph's origin
    source: str  # "qatfx/passes/convert.py:97 in _convert_weight", or the model's line
    source_detail: str  # the full recorded chain or stack line, shown on hover
    notes: str  # qatfx's other node.meta entries: "annotation=..., role=weight"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.name, self.op, self.target)


@dataclass(frozen=True)
class Snapshot:
    nodes: tuple[NodeInfo, ...]

    def by_key(self) -> dict[tuple[str, str, str], NodeInfo]:
        return {n.key: n for n in self.nodes}


@dataclass
class GraphDiff:
    added: list[NodeInfo] = field(default_factory=list)
    removed: list[NodeInfo] = field(default_factory=list)
    changed: list[tuple[NodeInfo, NodeInfo]] = field(default_factory=list)  # (before, after)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def status(self) -> dict[tuple[str, str, str], str]:
        """Node key -> "added" / "removed" / "changed" (the CSS class of its row)."""
        marks = {n.key: "added" for n in self.added}
        marks.update({n.key: "removed" for n in self.removed})
        marks.update({after.key: "changed" for _, after in self.changed})
        return marks


def target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # aten.mm.default, qatfx.dequantize.default
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if name is None:
        return str(target)
    return f"{module.replace('_operator', 'operator')}.{name}" if module else name


def describe_value(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dtype = str(val.dtype).replace("torch.", "")
        return f"{dtype}[{', '.join(str(s) for s in val.shape)}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(describe_value(v) for v in val) + ")"
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
        return f"{type(val).__name__} {val}"
    return "-" if val is None else type(val).__name__


def _format_args(node: torch.fx.Node) -> str:
    def show(a: Any) -> str:
        if isinstance(a, torch.fx.Node):
            return f"%{a.name}"
        if isinstance(a, (list, tuple)):
            inner = ", ".join(show(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{k!r}: {show(v)}" for k, v in a.items()) + "}"
        return repr(a)

    parts = [show(a) for a in node.args] + [f"{k}={show(v)}" for k, v in node.kwargs.items()]
    text = ", ".join(parts)
    return text if len(text) <= _MAX_ARGS_CHARS else text[: _MAX_ARGS_CHARS - 3] + "..."


TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')


def module_path(path: str, module: Optional[str]) -> str:
    """`qatfx/passes/convert.py` for a file of module `qatfx.passes.convert`, wherever the
    package is installed (an editable install is on no sys.path entry)."""
    if module and module != "__main__":
        rel = module.replace(".", os.sep) + (os.sep + "__init__.py" if path.endswith("__init__.py") else ".py")
        if path.endswith(os.sep + rel):
            return rel
    return short_path(path)


@functools.lru_cache(maxsize=4096)
def short_path(path: str) -> str:
    """A path as Python imports it (relative to its sys.path entry: `qatfx/passes/convert.py`,
    `torch/nn/modules/linear.py`), else relative to the working directory."""
    candidates = []
    for entry in sys.path:
        root = os.path.abspath(entry or os.curdir) + os.sep
        if path.startswith(root):
            candidates.append(path[len(root):])
    if candidates:
        return min(candidates, key=len)
    try:
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            return rel
    except ValueError:  # another drive
        pass
    return path


def _model_source(stack_trace: Optional[str]) -> tuple[str, str]:
    """The innermost frame outside torch in torch.export's / Dynamo's `stack_trace`: the
    model's line (`self.embed(tokens)`, not nn.Embedding.forward)."""
    if not stack_trace:
        return "", ""
    frames = list(_FRAME.finditer(stack_trace))
    if not frames:
        return "", stack_trace.strip()
    last = next((f for f in reversed(frames) if not f["file"].startswith(TORCH_DIR)), frames[-1])
    code = stack_trace[last.end():].strip().splitlines()
    where = f"{short_path(last['file'])}:{last['line']} in {last['func']}"
    return where, f"{where}: {code[0].strip()}" if code else where


def _meta_text(value: Any) -> str:
    """QuantSpecs as "int4/group32/sym", annotations field by field."""
    if hasattr(value, "describe"):
        return value.describe()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(f"{f.name}={_meta_text(getattr(value, f.name))}" for f in dataclasses.fields(value))
        return f"{type(value).__name__}({fields})"
    return value if isinstance(value, str) else repr(value)


def _notes(node: torch.fx.Node) -> str:
    return "; ".join(
        f"{key[len('qatfx_'):]}={_meta_text(value)}"
        for key, value in node.meta.items()
        if key.startswith("qatfx_") and key not in _PROVENANCE_KEYS
    )


def node_info(node: torch.fx.Node, origin: str) -> NodeInfo:
    made_by = node.meta.get(PASS_META_KEY, origin)
    rule = node.meta.get(RULE_META_KEY)
    if rule:
        made_by = f"{made_by}/{rule}"
    recorded = node.meta.get(SOURCE_META_KEY)
    if recorded:
        source, detail = recorded.split(" <- ")[0], recorded
    else:
        source, detail = _model_source(node.meta.get("stack_trace"))
    inputs = tuple(n.name for n in node.all_input_nodes)
    return NodeInfo(
        node.name, node.op, target_name(node.target), _format_args(node), inputs,
        describe_value(node.meta.get("val")), made_by, source, detail, _notes(node),
    )


def snapshot(graph: torch.fx.Graph, origin: str) -> Snapshot:
    return Snapshot(tuple(node_info(n, origin) for n in graph.nodes))


def diff(before: Snapshot, after: Snapshot) -> GraphDiff:
    old, new = before.by_key(), after.by_key()
    result = GraphDiff()
    result.added = [n for n in after.nodes if n.key not in old]
    result.removed = [n for n in before.nodes if n.key not in new]
    result.changed = [
        (old[n.key], n) for n in after.nodes if n.key in old and (old[n.key].args, old[n.key].notes) != (n.args, n.notes)
    ]
    return result
