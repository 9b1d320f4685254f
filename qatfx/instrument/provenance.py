"""Which line of code created each node, recorded while a dumped pass runs.

torch.fx calls a GraphModule's create-node hooks (`_register_create_node_hook`, present
since torch 2.3) for every node added to its graph, whatever helper the pass used
(`call_function`, `create_node`, `node_copy`, the pattern matcher's replacement). The
hook walks up the Python stack to the first frame outside torch and qatfx's own
infrastructure: the pass's line. Inside an Inductor-side rewrite the stack only shows the
pattern matcher, so `rewrite_scope` names the rule and its replacement function instead.

Recorded sources are written to `node.meta["qatfx_source"]` when the pass ends, after any
`meta.update(old.meta)` the pass made, which would otherwise copy an older node's source.
Only installed while dumping: with dumps off no hook runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx

from qatfx.graph.meta import PASS_META_KEY, RULE_META_KEY, SOURCE_META_KEY
from qatfx.instrument.snapshot import TORCH_DIR, module_path

_FRAMES_KEPT = 3
# Plumbing, not the pass: modules whose frames are skipped (this package, the rewrite
# driver), and the functions that run passes (the stack above them is the driver's).
_PLUMBING_MODULES: set[str] = {__package__}
_PASS_RUNNERS: set[Any] = set()


def plumbing_module(name: str) -> None:
    """Skip the frames of module `name` when looking for the line that made a node."""
    _PLUMBING_MODULES.add(name)


def pass_runner(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: `fn` runs passes; the search for a node's maker stops at its frame."""
    _PASS_RUNNERS.add(fn.__code__)
    return fn


def _is_plumbing(module: Optional[str]) -> bool:
    return module is not None and any(module == m or module.startswith(m + ".") for m in _PLUMBING_MODULES)


# (rule name, replacement function) of the Inductor-side rewrite being applied, if any.
_current_rule: Optional[tuple[str, Callable[..., Any]]] = None


@contextlib.contextmanager
def rewrite_scope(name: str, replacement: Callable[..., Any]) -> Iterator[None]:
    """Nodes created inside come from rule `name`: its replacement function is their source."""
    global _current_rule
    previous, _current_rule = _current_rule, (name, replacement)
    try:
        yield
    finally:
        _current_rule = previous


def _function_location(fn: Callable[..., Any]) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    code = getattr(fn, "__code__", None)
    if code is None:
        return repr(fn)
    return f"{module_path(code.co_filename, getattr(fn, '__module__', None))}:{code.co_firstlineno} in {code.co_name}"


def _caller_location() -> str:
    frame = sys._getframe(2)
    found = []
    while frame is not None and len(found) < _FRAMES_KEPT:
        path, module = frame.f_code.co_filename, frame.f_globals.get("__name__")
        if frame.f_code in _PASS_RUNNERS:
            break
        if not (path.startswith(TORCH_DIR) or _is_plumbing(module)):
            where = module_path(path, module)
            found.append(f"{where}:{frame.f_lineno} in {frame.f_code.co_name}")
        frame = frame.f_back
    return " <- ".join(found)


class SourceRecorder:
    """Records the creating line of every node added to `gm`'s graph until `stop()`."""

    def __init__(self, gm: Optional[torch.fx.GraphModule]) -> None:
        self.gm = gm if hasattr(gm, "_register_create_node_hook") else None
        self.made: dict[torch.fx.Node, tuple[str, Optional[str]]] = {}
        if self.gm is not None:
            self.gm._register_create_node_hook(self._hook)

    def _hook(self, node: torch.fx.Node) -> None:
        if _current_rule is not None:
            name, replacement = _current_rule
            self.made[node] = (f"{_function_location(replacement)} (rule {name})", name)
        else:
            self.made[node] = (_caller_location(), None)

    def stop(self, graph: torch.fx.Graph, pass_name: Optional[str] = None) -> None:
        """Unhook, and stamp the nodes still in `graph` with their source (and rule, and
        `pass_name` where given: run_pass stamps FX nodes itself)."""
        if self.gm is not None:
            self.gm._unregister_create_node_hook(self._hook)
            self.gm = None
        alive = set(graph.nodes)
        for node, (source, rule) in self.made.items():
            if node in alive:
                node.meta[SOURCE_META_KEY] = source
                if pass_name is not None:
                    node.meta[PASS_META_KEY] = pass_name
                if rule is not None:
                    node.meta[RULE_META_KEY] = rule
        self.made.clear()
