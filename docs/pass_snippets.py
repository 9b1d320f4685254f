"""Regenerate the before/after graph snippets of docs/passes.md.

    python docs/pass_snippets.py > /tmp/snippets.md

Runs every qatfx pass on a tiny residual MLP with graph dumps on (`dump_dir=`), and the
Inductor-side lowering pass (`QATFXGraphPass`) inside a real `torch.compile`, and prints
the forward code before and after each, trimmed to the statements (source comments and
`; x = None` clean-ups dropped, long lines kept as they are).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import qatfx
from torch._dynamo.utils import counters
from qatfx.lowering import LoweringConfig, QATFXGraphPass
from qatfx.quantizer import ANNOTATION_KEY
from torch._inductor.custom_graph_pass import CustomGraphPass


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64, bias=False)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(self.down(F.silu(self.up(x))))


def _statements(text: str) -> str:
    """The statements of a dumped or printed forward, without comments and clean-ups."""
    code = text.split("# nodes")[0]
    lines = []
    for line in code.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "class ", "def ", "x, = fx_pytree", '"""')) or ": \"" in stripped and stripped.endswith(";"):
            continue
        lines.append(re.sub(r";\s+[\w ,=]+ = None$", "", stripped))
    return "\n".join(lines)


class _Recorder(CustomGraphPass):
    """Runs qatfx's lowering pass one stage at a time (the stages QATFXGraphPass runs in
    order) and keeps the post-grad graph after each."""

    STAGES = {
        "fuse_linear": LoweringConfig(fuse_linear=True, fuse_epilogue=False, decompose=False),
        "fuse_epilogue": LoweringConfig(fuse_linear=False, fuse_epilogue=True, decompose=False),
        "decompose": LoweringConfig(fuse_linear=False, fuse_epilogue=False, decompose=True),
    }

    def __init__(self) -> None:
        self.graphs = {}

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.graphs["post-grad input"] = graph.python_code("self").src
        for stage, config in self.STAGES.items():
            QATFXGraphPass(config)(graph)
            self.graphs[stage] = graph.python_code("self").src

    def uuid(self):
        return None  # never served from the FX graph cache: the pass must run


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = qatfx.prepare_pt2e(TinyMLP().train(), qatfx.Int8DynActInt4WeightQuantizer(32), (torch.randn(2, 8, 64),), dump_dir=tmp)
        annotations = [f"{n.name}: {n.meta[ANNOTATION_KEY]}" for n in prepared.graph.nodes if ANNOTATION_KEY in n.meta]
        print("## annotations\n\n```\n" + "\n".join(annotations) + "\n```\n")
        qatfx.disable_fake_quant(prepared)
        qatfx.enable_fake_quant(prepared)
        prepared.eval()
        converted = qatfx.convert_pt2e(prepared)
        for path in sorted(Path(tmp).glob("*.before.txt")):
            name = path.name.removesuffix(".before.txt")
            for side in ("before", "after"):
                print(f"## {name} {side}\n\n```\n{_statements((Path(tmp) / f'{name}.{side}.txt').read_text())}\n```\n")

    recorder = _Recorder()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(converted, options={"post_grad_custom_pre_pass": recorder})
    with torch.no_grad():
        compiled(torch.randn(2, 8, 64))
    for stage, text in recorder.graphs.items():
        print(f"## inductor: {stage}\n\n```\n{_statements(text)}\n```\n")
    print(f"counters['qatfx'] = {dict(counters['qatfx'])}")

if __name__ == "__main__":
    sys.exit(main())
