"""Dump folders: every qatfx pass's graph before and after, as text and as HTML.

    with qatfx.debug.dump("dumps/llama"):                     # or QATFX_DUMP_DIR=dumps
        prepared = qatfx.prepare_pt2e(model, quantizer, (tokens,))
        converted = qatfx.convert_pt2e(prepared.eval())
        with torch.no_grad():
            torch.compile(converted, backend="qatfx")(tokens)
    # dumps/llama/index.html lists annotate, insert_fake_quant, eval, convert and the
    # Inductor-side stages fuse_linear, fuse_epilogue, decompose, ...

Where a pass dumps is decided by `qatfx.instrument.settings.resolve_dump_dir`. A folder holds,
per pass, `NN_<pass>.before.txt` / `.after.txt` (for grep and diff), `NN_<pass>.html`,
plus `index.html` and `dump.json` (the list behind the index). A folder used again, by
this process or a later one, gets the next numbers and keeps its earlier passes in the
index; `QATFX_DUMP_DIR` gives each process a new folder instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
import torch.fx

from qatfx.instrument import html as pages
from qatfx.instrument import svg
from qatfx.instrument.provenance import SourceRecorder
from qatfx.instrument.settings import dump_scope, resolve_dump_dir
from qatfx.instrument.snapshot import diff, snapshot
from qatfx.instrument.text import format_graph

log = logging.getLogger("qatfx.debug")

MANIFEST = "dump.json"
INDEX = "index.html"

# Which user call runs each FX pass (qatfx/passes/README.md), for the index.
RUN_BY = {
    "annotate": "prepare_pt2e",
    "insert_fake_quant": "prepare_pt2e",
    "check_finite": "prepare_pt2e",
    "convert": "convert_pt2e",
    "train": ".train()",
    "eval": ".eval()",
    "enable_fake_quant": "enable_fake_quant",
    "disable_fake_quant": "disable_fake_quant",
}


@contextlib.contextmanager
def dump(directory: Union[str, os.PathLike]) -> Iterator[Path]:
    """Dump every qatfx pass run inside the block into `directory`: prepare_pt2e's and
    convert_pt2e's passes, mode switches, and the Inductor-side stages of
    `torch.compile(..., backend="qatfx")` compiled inside it (which then bypass Inductor's
    FX graph cache, so the pass runs and is recorded). An explicit `dump_dir=` argument
    still wins. Yields the folder as a Path."""
    with dump_scope(directory) as path:
        yield path


def current_dump_dir() -> Optional[Path]:
    """The folder passes without `dump_dir=` dump to now (a `dump()` block or
    QATFX_DUMP_DIR), or None when dumping is off."""
    return resolve_dump_dir(None)


class DumpFolder:
    """One dump folder: its list of passes (dump.json) and index.html."""

    def __init__(self, path: Path) -> None:
        self.path = path
        manifest = path / MANIFEST
        data = json.loads(manifest.read_text()) if manifest.exists() else {}
        self.entries: list[dict] = data.get("entries", [])
        self.reports: dict[str, str] = data.get("reports", {})
        self.runs: list[dict] = data.get("runs", [])
        self.runs.append(
            {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv), "torch": torch.__version__}
        )

    def next_number(self) -> int:
        numbered = [e["number"] for e in self.entries if e.get("number")]
        # Dumps written before the index existed have no manifest entry: count their files.
        for name in os.listdir(self.path) if self.path.is_dir() else ():
            match = re.match(r"(\d+)_.*\.before\.txt$", name)
            if match:
                numbered.append(int(match.group(1)))
        return max(numbered, default=0) + 1

    def previous_page(self) -> Optional[str]:
        return next((e["page"] for e in reversed(self.entries) if e.get("page")), None)

    def add(self, entry: dict) -> None:
        self.entries.append(entry)
        self.save()

    def add_report(self, filename: str, title: str) -> None:
        self.reports[filename] = title
        self.save()

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        data = {"entries": self.entries, "reports": self.reports, "runs": self.runs}
        (self.path / MANIFEST).write_text(json.dumps(data, indent=1))
        self.write_index()

    def write_index(self) -> None:
        header = {"folder": str(self.path.resolve())}
        for run in self.runs[-5:]:
            header[f"run (pid {run['pid']})"] = f"{run['started']}, torch {run['torch']}: {run['command']}"
        text = pages.index_page(str(self.path), header, self.entries, sorted(self.reports.items()))
        (self.path / INDEX).write_text(text)


_FOLDERS: dict[tuple[Path, int], DumpFolder] = {}


def dump_folder(path: Union[str, os.PathLike]) -> DumpFolder:
    """This process's DumpFolder for `path` (one per folder, shared by every pass)."""
    key = (Path(path).resolve(), os.getpid())
    if key not in _FOLDERS:
        _FOLDERS[key] = DumpFolder(Path(path))
    return _FOLDERS[key]


def register_report(path: Union[str, os.PathLike], title: str) -> None:
    """Link a report written into a dump folder (e.g. compare.html) from its index."""
    path = Path(path)
    dump_folder(path.parent).add_report(path.name, title)


def _graph(graph_or_module: Union[torch.fx.GraphModule, torch.fx.Graph]) -> torch.fx.Graph:
    return graph_or_module.graph if isinstance(graph_or_module, torch.fx.GraphModule) else graph_or_module


class PassRecording:
    """The dump of one pass: a snapshot and the text of the graph now, the source line of
    every node created until `finish`, then the files and the index row."""

    def __init__(
        self,
        directory: Union[str, os.PathLike],
        name: str,
        graph_or_module: Union[torch.fx.GraphModule, torch.fx.Graph],
        *,
        title: Optional[str] = None,
        graph_kind: str = "FX (torch.export)",
        run_by: Optional[str] = None,
        origin: str = "torch.export",
        stamp: Optional[str] = None,
    ) -> None:
        graph = _graph(graph_or_module)
        self.folder = dump_folder(directory)
        self.name, self.title, self.origin = name, title or name, origin
        self.graph_kind, self.run_by = graph_kind, run_by or RUN_BY.get(name, "run_pass")
        self.stamp = stamp  # node.meta["qatfx_pass"] for the nodes it creates (run_pass stamps its own)
        self.before = snapshot(graph, origin)
        self.text_before = format_graph(graph_or_module, f"{self.title}: before", origin)
        owner = graph_or_module if isinstance(graph_or_module, torch.fx.GraphModule) else graph.owning_module
        self.sources = SourceRecorder(owner)

    def stop_sources(self, graph_or_module: Union[torch.fx.GraphModule, torch.fx.Graph]) -> None:
        self.sources.stop(_graph(graph_or_module), self.stamp)

    def finish(
        self,
        graph_or_module: Union[torch.fx.GraphModule, torch.fx.Graph],
        *,
        counters: Optional[dict] = None,
        error: str = "",
        keep_unchanged: bool = True,
    ) -> None:
        """Write the pass's files and index row. A stage that changed nothing gets an index
        row only, unless `keep_unchanged`. Never raises: a dump must not break a pass."""
        try:
            self._finish(graph_or_module, counters or {}, error, keep_unchanged)
        except Exception:
            log.warning("qatfx dump: could not write the dump of pass %s", self.name, exc_info=True)

    def _finish(self, graph_or_module, counters: dict, error: str, keep_unchanged: bool) -> None:
        self.stop_sources(graph_or_module)
        graph = _graph(graph_or_module)
        after = snapshot(graph, self.origin)
        changes = diff(self.before, after)
        entry = {
            "number": None,
            "name": self.name,
            "title": self.title,
            "graph": self.graph_kind,
            "run_by": self.run_by,
            "nodes_before": len(self.before.nodes),
            "nodes_after": len(after.nodes),
            "added": len(changes.added),
            "removed": len(changes.removed),
            "changed": len(changes.changed),
            "counters": counters,
            "error": error,
            "page": None,
            "files": [],
            "note": "",
            "pid": os.getpid(),
        }
        if changes.empty and not keep_unchanged and not error:
            entry["note"] = "no change"
            self.folder.add(entry)
            return
        number = self.folder.next_number()
        prefix = f"{number:02d}_{self.name}"
        text_after = format_graph(graph_or_module, f"{self.title}: after" + (f" (failed: {error})" if error else ""), self.origin)
        self.folder.path.mkdir(parents=True, exist_ok=True)
        (self.folder.path / f"{prefix}.before.txt").write_text(self.text_before)
        (self.folder.path / f"{prefix}.after.txt").write_text(text_after)
        entry.update(number=number, page=f"{prefix}.html", files=[f"{prefix}.before.txt", f"{prefix}.after.txt"])
        drawing, note = svg.draw(self.before, after, changes)
        page = pages.pass_page(
            entry, self.before, after, changes, drawing, note,
            _code_part(self.text_before), _code_part(text_after), self.folder.previous_page(),
        )
        (self.folder.path / entry["page"]).write_text(page)
        self.folder.add(entry)
        log.debug("qatfx: dumped pass %s to %s/%s.{before,after}.txt, .html", self.title, self.folder.path, prefix)


def _code_part(text: str) -> str:
    return text.split("\n# nodes\n", 1)[0]
