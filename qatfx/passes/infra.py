"""Pass infrastructure: run a pass, record provenance, lint, dump.

Every qatfx pass is a function `(GraphModule) -> PassResult` run through `run_pass`, which
- stamps each node the pass created with `node.meta["qatfx_pass"]` (where it came from),
- lints the graph and, on failure, names the pass and the passes run before it,
- recompiles the module,
- when dumping is on (`dump_dir=` argument, a `qatfx.debug.dump(dir)` block, or the
  `QATFX_DUMP_DIR` environment variable), writes the graph before and after as text
  (`03_convert.before.txt`, `03_convert.after.txt`) and as an HTML page listed in the
  folder's `index.html` (qatfx/debug/), and stamps the nodes the pass created with
  `node.meta["qatfx_source"]`, the line of the pass that created them,
- when `TORCH_TRACE` is set, logs the graphs as `qatfx_<pass>_before/after` artifacts
  for tlparse.

With none of these on, a pass does no extra work: no graph is formatted, no file opened.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch.fx

log = logging.getLogger("qatfx.passes")

PASS_META_KEY = "qatfx_pass"
SOURCE_META_KEY = "qatfx_source"
HISTORY_META_KEY = "qatfx_pass_history"
DUMP_ENV = "QATFX_DUMP_DIR"

# Folders of the `qatfx.debug.dump(dir)` blocks entered, innermost last. Kept here, not in
# qatfx.debug, so that checking whether dumping is on imports nothing.
DUMP_SCOPES: list[Path] = []


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool


GraphPass = Callable[[torch.fx.GraphModule], PassResult]


def resolve_dump_dir(dump_dir: Union[str, os.PathLike, None] = None) -> Optional[Path]:
    """The folder a dump goes to, or None when dumping is off.

    An explicit `dump_dir` is used as given, then the innermost `qatfx.debug.dump(dir)`
    block; `QATFX_DUMP_DIR=root` gives each process its own `root/run-<time>-<pid>/`, so
    runs of a script never mix (see docs/debugging.md).
    """
    if dump_dir is not None:
        return Path(dump_dir)
    if DUMP_SCOPES:
        return DUMP_SCOPES[-1]
    root = os.environ.get(DUMP_ENV)
    return _process_run_dir(root, os.getpid()) if root else None


@functools.cache
def _process_run_dir(root: str, pid: int) -> Path:
    # Keyed by pid too: a forked worker gets a folder of its own, not its parent's.
    return Path(root) / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{pid}"


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
    """Readable text: the generated code, then one line per node with its shape, the pass
    that created it (`origin` for nodes no qatfx pass made) and, where recorded, the line
    of code that did."""
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


def _trace():
    # Imported on use: qatfx.debug imports the api, which imports this module.
    from qatfx.debug import trace

    return trace


def run_pass(
    gm: torch.fx.GraphModule,
    name: str,
    graph_pass: GraphPass,
    *,
    dump_dir: Union[str, os.PathLike, None] = None,
) -> PassResult:
    directory = resolve_dump_dir(dump_dir)
    recording = None
    if directory is not None:
        from qatfx.debug.dumping import PassRecording

        recording = PassRecording(directory, name, gm)
    tracing = _trace().enabled()
    if tracing:
        _trace().graph_artifact(f"qatfx_{name}_before", lambda: format_graph(gm, f"{name}: before"))

    history = gm.meta.setdefault(HISTORY_META_KEY, [])
    existing = set(gm.graph.nodes)
    try:
        result = graph_pass(gm)
    except Exception as exc:
        if recording is not None:
            recording.finish(gm, error=f"{type(exc).__name__}: {exc}")
        raise
    out = result.graph_module
    if recording is not None:
        recording.stop_sources(out)
    for node in out.graph.nodes:
        if node not in existing:
            node.meta.setdefault(PASS_META_KEY, name)
    try:
        out.graph.lint()
    except Exception as exc:  # re-raised with the pass named
        if recording is not None:
            recording.finish(out, error=f"invalid graph: {exc}")
        raise RuntimeError(
            f"qatfx pass '{name}' produced an invalid graph (passes before it: {history or 'none'}): {exc}"
        ) from exc
    out.recompile()
    history.append(name)
    added = sum(1 for n in out.graph.nodes if n not in existing)
    log.debug("pass %s: modified=%s, %d nodes added", name, result.modified, added)

    if recording is not None:
        recording.finish(out)
    if tracing:
        _trace().graph_artifact(f"qatfx_{name}_after", lambda: format_graph(out, f"{name}: after"))
    return result


def _register_torch_log() -> None:
    """Name the "qatfx" logger hierarchy in torch._logging's registry, so `TORCH_LOGS=+qatfx`
    and `torch._logging.set_logs(modules={"qatfx": logging.DEBUG})` switch it like torch's
    own components (and TORCH_LOGS=help lists it). torch's private API: skipped quietly
    where it differs; TORCH_LOGS still finds qatfx as a module name then."""
    try:
        from torch._logging._internal import register_log

        register_log("qatfx", ["qatfx"])
    except Exception as exc:  # only the TORCH_LOGS alias is lost
        log.debug("qatfx: not registered with torch._logging: %s", exc)


_register_torch_log()
