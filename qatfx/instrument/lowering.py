"""Records the stages of the Inductor-side pass (QATFXGraphPass): fuse_linear,
fuse_epilogue, decompose, eliminate_dead_code.

Per stage, on what is switched on:
- INFO log on `qatfx.lowering` (`TORCH_LOGS=qatfx`): the rules that fired and the matches
  refused, from the change in `counters["qatfx"]`;
- a dump (`qatfx.debug.dump(dir)` block or QATFX_DUMP_DIR): the post-grad graph before and
  after, for stages that changed it or refused a match, with the rule that made each node;
- TORCH_TRACE: the graph after as artifact `qatfx_inductor_<stage>_after`, under the
  compile id.
With none on, a stage costs one attribute check.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch._dynamo.utils import counters

from qatfx.instrument import trace
from qatfx.instrument.dumping import PassRecording
from qatfx.instrument.settings import resolve_dump_dir
from qatfx.instrument.text import format_graph

log = logging.getLogger("qatfx.lowering")

COUNTER = "qatfx"
ORIGIN = "torch.compile"  # nodes no qatfx stage made: Dynamo, AOT autograd, decompositions


def _compile_id() -> Optional[str]:
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
    except Exception:  # private API: the id is a label only
        return None
    return None if cid is None else str(cid)


class LoweringRecorder:
    """One per run of QATFXGraphPass; `with recorder.stage(name): ...` around each stage."""

    def __init__(self, graph: torch.fx.Graph, dump_dir=None) -> None:
        """`dump_dir`: the folder given to the pass explicitly; None resolves the dump()
        block or QATFX_DUMP_DIR now, while the compile runs."""
        self.graph = graph
        self.directory = resolve_dump_dir(dump_dir)
        self.tracing = trace.enabled()
        self.active = self.directory is not None or self.tracing or log.isEnabledFor(logging.INFO)
        self.compile_id = _compile_id() if self.active else None

    def stage(self, name: str) -> "_Stage":
        return _Stage(self, name)


class _Stage:
    def __init__(self, recorder: LoweringRecorder, name: str) -> None:
        self.recorder, self.name = recorder, name

    def __enter__(self) -> None:
        rec = self.recorder
        if not rec.active:
            return
        self.counts = dict(counters[COUNTER])
        self.nodes = len(rec.graph.nodes)
        self.recording = None
        if rec.directory is not None:
            self.recording = PassRecording(
                rec.directory, f"inductor_{self.name}", rec.graph, title=self.name,
                graph_kind="Inductor post-grad", run_by=f"torch.compile [{rec.compile_id}]", origin=ORIGIN,
                stamp=f"inductor:{self.name}",
            )

    def __exit__(self, exc_type, exc, tb) -> None:
        rec = self.recorder
        if not rec.active:
            return
        fired = {k: v - self.counts.get(k, 0) for k, v in counters[COUNTER].items() if v != self.counts.get(k, 0)}
        if exc is not None:
            if self.recording is not None:
                self.recording.finish(rec.graph, counters=fired, error=f"{type(exc).__name__}: {exc}")
            return
        summary = ", ".join(f"{k}={v}" for k, v in sorted(fired.items())) or "no rewrite"
        log.info("qatfx lowering: stage %s: %s (%d -> %d nodes)", self.name, summary, self.nodes, len(rec.graph.nodes))
        if self.recording is not None:
            refused = any(k.startswith("skipped:") for k in fired)
            self.recording.finish(rec.graph, counters=fired, keep_unchanged=refused)
        if rec.tracing:
            title = f"inductor {self.name} [{rec.compile_id}]: after; counters {fired}"
            trace.graph_artifact(f"qatfx_inductor_{self.name}_after", lambda: format_graph(rec.graph, title, ORIGIN))
