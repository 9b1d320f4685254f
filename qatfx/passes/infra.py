"""Pass infrastructure: run a pass, record provenance, lint, dump.

Every qatfx pass is a function `(GraphModule) -> PassResult` run through `run_pass`, which
- stamps each node the pass created with `node.meta["qatfx_pass"]` (where it came from),
- lints the graph and, on failure, names the pass and the passes run before it,
- recompiles the module,
- writes the graph before and after as readable text when dumping is on
  (`dump_dir=` argument or the `QATFX_DUMP_DIR` environment variable), files named by pass
  order: `03_convert.before.txt`, `03_convert.after.txt`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch.fx

log = logging.getLogger("qatfx.passes")

PASS_META_KEY = "qatfx_pass"
HISTORY_META_KEY = "qatfx_pass_history"
DUMP_ENV = "QATFX_DUMP_DIR"


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool


GraphPass = Callable[[torch.fx.GraphModule], PassResult]


def resolve_dump_dir(dump_dir: Union[str, os.PathLike, None]) -> Optional[Path]:
    chosen = dump_dir if dump_dir is not None else os.environ.get(DUMP_ENV)
    return Path(chosen) if chosen else None


def _describe_val(node: torch.fx.Node) -> str:
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is None:
        return "-"
    return f"{str(val.dtype).replace('torch.', '')}{list(shape)}"


def format_graph(gm: torch.fx.GraphModule, title: str) -> str:
    """Readable text: the generated code, then one line per node with its shape and the
    pass that created it."""
    lines = [f"# {title}", "", gm.print_readable(print_output=False).rstrip(), "", "# nodes"]
    width = max((len(n.name) for n in gm.graph.nodes), default=4)
    for node in gm.graph.nodes:
        made_by = node.meta.get(PASS_META_KEY, "torch.export")
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        lines.append(f"{node.name:<{width}}  {node.op:<13}  {str(target):<40}  {_describe_val(node):<24}  made_by={made_by}")
    return "\n".join(lines) + "\n"


def _next_dump_index(dump_dir: Path) -> int:
    return len(list(dump_dir.glob("*.before.txt"))) + 1


def run_pass(
    gm: torch.fx.GraphModule,
    name: str,
    graph_pass: GraphPass,
    *,
    dump_dir: Union[str, os.PathLike, None] = None,
) -> PassResult:
    directory = resolve_dump_dir(dump_dir)
    prefix = None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        prefix = directory / f"{_next_dump_index(directory):02d}_{name}"
        Path(f"{prefix}.before.txt").write_text(format_graph(gm, f"{name}: before"))

    history = gm.meta.setdefault(HISTORY_META_KEY, [])
    existing = set(gm.graph.nodes)
    result = graph_pass(gm)
    out = result.graph_module
    for node in out.graph.nodes:
        if node not in existing:
            node.meta.setdefault(PASS_META_KEY, name)
    try:
        out.graph.lint()
    except Exception as exc:  # re-raised with the pass named
        raise RuntimeError(
            f"qatfx pass '{name}' produced an invalid graph (passes before it: {history or 'none'}): {exc}"
        ) from exc
    out.recompile()
    history.append(name)
    added = sum(1 for n in out.graph.nodes if n not in existing)
    log.debug("pass %s: modified=%s, %d nodes added", name, result.modified, added)

    if prefix is not None:
        Path(f"{prefix}.after.txt").write_text(format_graph(out, f"{name}: after"))
        log.info("qatfx: dumped pass %s to %s.{before,after}.txt", name, prefix)
    return result
