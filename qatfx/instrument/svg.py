"""One SVG drawing per pass: the graph before and after in one picture.

Every node of either graph is drawn once, in graph order; added nodes are green, removed
ones red and dashed, changed ones yellow, so a rewrite is seen in its context. Graphs over
FULL_MAX_NODES are drawn around the changes only (their nodes, inputs and users). Needs the
optional `pydot` package and graphviz's `dot` program; without them (or above MAX_NODES,
which dot lays out slowly) the page shows the tables and code only.
"""

from __future__ import annotations

import html
import logging
import re
import shutil
from typing import Optional

from qatfx.instrument.snapshot import GraphDiff, NodeInfo, Snapshot

log = logging.getLogger("qatfx.debug")

MAX_NODES = 800
FULL_MAX_NODES = 200  # larger graphs: only the changes and their neighbours are drawn
_FILL = {"added": "#ccf5d3", "removed": "#ffd7d5", "changed": "#fff1b8"}
_BORDER = {"added": "#1a7f37", "removed": "#cf222e", "changed": "#9a6700"}


def available() -> bool:
    if shutil.which("dot") is None:
        return False
    try:
        import pydot  # noqa: F401
    except ImportError:
        return False
    return True


def _label(info: NodeInfo) -> str:
    lines = [info.name, info.target if info.op != "placeholder" else "input", info.value]
    text = "\\n".join(line.replace("\\", "/").replace('"', "'") for line in lines if line and line != "-")
    return f'"{text}"'


def _union(before: Snapshot, after: Snapshot, changes: GraphDiff) -> list[NodeInfo]:
    """After's nodes in order, each removed node placed after the node that preceded it."""
    removed = {n.key for n in changes.removed}
    following: dict = {}  # key of a kept node (None: the start) -> removed nodes after it
    anchor = None
    for node in before.nodes:
        if node.key in removed:
            following.setdefault(anchor, []).append(node)
        else:
            anchor = node.key  # kept, so it is in `after` too
    out = list(following.get(None, []))
    for node in after.nodes:
        out.append(node)
        out.extend(following.get(node.key, []))
    return out


def _near_changes(nodes: list[NodeInfo], status: dict) -> list[NodeInfo]:
    """The changed nodes, their inputs and their users, in graph order."""
    changed = {n.name for n in nodes if n.key in status}
    keep = set(changed)
    for n in nodes:
        if n.name in changed:
            keep.update(n.inputs)
        elif changed.intersection(n.inputs):
            keep.add(n.name)
    return [n for n in nodes if n.name in keep]


def draw(before: Snapshot, after: Snapshot, changes: GraphDiff) -> tuple[Optional[str], str]:
    """(inline SVG markup or None, a note saying why there is none)."""
    if not available():
        return None, "no drawing: install pydot and graphviz (`dot`) for one"
    status = changes.status()
    nodes = _union(before, after, changes)
    note = ""
    if len(nodes) > FULL_MAX_NODES and status:
        total, nodes = len(nodes), _near_changes(nodes, status)
        note = f"drawn: the {len(nodes)} nodes within one edge of a change, of {total}"
    if len(nodes) > MAX_NODES:
        return None, f"no drawing: {len(nodes)} nodes, more than the {MAX_NODES} drawn"
    import pydot

    ids = {}
    dot = pydot.Dot(graph_type="digraph", rankdir="TB", bgcolor="white", nodesep="0.15", ranksep="0.3")
    dot.set_node_defaults(shape="box", style='"rounded,filled"', fillcolor="#f6f8fa", color="#8c959f", fontname="monospace", fontsize="9")
    dot.set_edge_defaults(color="#8c959f", arrowsize="0.5")
    for i, info in enumerate(nodes):
        ids.setdefault(info.name, []).append(f"n{i}")
        mark = status.get(info.key)
        attrs = {"label": _label(info), "id": f'"node-{i}"'}
        if mark:
            attrs.update(fillcolor=_FILL[mark], color=_BORDER[mark], penwidth="1.6")
            if mark == "removed":
                attrs["style"] = '"rounded,filled,dashed"'
        dot.add_node(pydot.Node(f"n{i}", **attrs))
    for i, info in enumerate(nodes):
        for name in info.inputs:
            # A name both removed and re-added (its target changed): read the live one.
            source = ids.get(name, [None])[-1]
            if source is not None:
                edge = {"color": _BORDER["removed"], "style": "dashed"} if status.get(info.key) == "removed" else {}
                dot.add_edge(pydot.Edge(source, f"n{i}", **edge))
    try:
        svg = dot.create_svg().decode("utf-8")
    except Exception as exc:  # a broken graphviz install must not break the dump
        log.warning("qatfx dump: graphviz failed: %s", exc)
        return None, f"no drawing: graphviz failed ({exc})"
    return _hover_text(svg[svg.index("<svg"):], nodes), note


def _hover_text(svg: str, nodes: list[NodeInfo]) -> str:
    """dot titles each node with its id (shown on hover): show its arguments and origin
    instead, and drop the edges' titles."""

    def node_title(m: re.Match) -> str:
        info = nodes[int(m.group(1))]
        text = f"{info.name} = {info.target}({info.args})\nmade by {info.made_by}"
        if info.source:
            text += f" at {info.source}"
        return f"<title>{html.escape(text)}</title>"

    svg = re.sub(r"<title>n(\d+)</title>", node_title, svg)
    return re.sub(r"<title>n\d+&#45;&gt;n\d+</title>\n?", "", svg)
