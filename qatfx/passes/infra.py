"""Pass infrastructure: run a pass, check its prerequisites, record provenance, lint, dump.

Every qatfx pass is a function `(GraphModule) -> PassResult` run through `run_pass`, which
- checks the passes it `requires` ran before on this module (`GraphModule.meta` keeps the
  history), and otherwise raises naming the missing pass,
- stamps each node the pass created with `node.meta["qatfx_pass"]` (where it came from),
- lints the graph and, on failure, names the pass and the passes run before it,
- recompiles the module,
- when the caller passes a dump folder (drivers resolve it with
  `qatfx.instrument.settings.resolve_dump_dir`: `dump_dir=`, a `qatfx.debug.dump(dir)`
  block or `QATFX_DUMP_DIR`), writes the graph before and after as text
  (`03_convert.before.txt`, `03_convert.after.txt`) and as an HTML page listed in the
  folder's `index.html`, and stamps the nodes the pass created with
  `node.meta["qatfx_source"]`, the line of the pass that created them,
- when `TORCH_TRACE` is set, logs the graphs as `qatfx_<pass>_before/after` artifacts
  for tlparse.

With none of these on, a pass does no extra work: no graph is formatted, no file opened.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch.fx

from qatfx.graph.meta import HISTORY_META_KEY, PASS_META_KEY
from qatfx.instrument import trace
from qatfx.instrument.dumping import PassRecording
from qatfx.instrument.provenance import pass_runner
from qatfx.instrument.text import format_graph

log = logging.getLogger("qatfx.passes")


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool


GraphPass = Callable[[torch.fx.GraphModule], PassResult]


def requires(*pass_names: str) -> Callable[[GraphPass], GraphPass]:
    """Declare the passes that must have run on a module before this one (checked by
    run_pass against the module's history)."""

    def declare(graph_pass: GraphPass) -> GraphPass:
        graph_pass.requires = pass_names
        return graph_pass

    return declare


def history(gm: torch.fx.GraphModule) -> list[str]:
    """The names of the passes run on `gm` (and the module it was copied from), in order."""
    return gm.meta.setdefault(HISTORY_META_KEY, [])


def _check_requirements(gm: torch.fx.GraphModule, name: str, graph_pass: GraphPass) -> None:
    done = history(gm)
    missing = [p for p in getattr(graph_pass, "requires", ()) if p not in done]
    if missing:
        raise RuntimeError(
            f"qatfx pass '{name}' needs pass {', '.join(repr(p) for p in missing)} to have run on this module first "
            f"(passes run so far: {done or 'none'}); run it through qatfx.prepare_pt2e, which schedules the passes"
        )


@pass_runner
def run_pass(
    gm: torch.fx.GraphModule,
    name: str,
    graph_pass: GraphPass,
    *,
    dump_dir: Union[str, os.PathLike, None] = None,
) -> PassResult:
    """Run `graph_pass` on `gm` as pass `name`; `dump_dir` is the folder to dump into (the
    caller resolves it; None: no dump)."""
    _check_requirements(gm, name, graph_pass)
    recording = None if dump_dir is None else PassRecording(Path(dump_dir), name, gm)
    tracing = trace.enabled()
    if tracing:
        trace.graph_artifact(f"qatfx_{name}_before", lambda: format_graph(gm, f"{name}: before"))

    done = history(gm)
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
            f"qatfx pass '{name}' produced an invalid graph (passes before it: {done or 'none'}): {exc}"
        ) from exc
    out.recompile()
    done.append(name)
    added = sum(1 for n in out.graph.nodes if n not in existing)
    log.debug("pass %s: modified=%s, %d nodes added", name, result.modified, added)

    if recording is not None:
        recording.finish(out)
    if tracing:
        trace.graph_artifact(f"qatfx_{name}_after", lambda: format_graph(out, f"{name}: after"))
    return result
