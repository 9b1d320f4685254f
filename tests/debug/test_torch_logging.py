"""qatfx in PyTorch's own tools: every pass's graph as a TORCH_TRACE artifact (tlparse), and
the "qatfx" logger hierarchy under TORCH_LOGS. Each runs a fresh Python: torch reads both
variables at import."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]

# Two linears on 2-D inputs: the smallest model that exercises prepare, convert and the
# Inductor-side stages (fuse_linear, fuse_epilogue: relu, decompose).
SCRIPT = """
import torch, qatfx
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)).eval()
x = torch.randn(4, 64)
prepared = qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(32), (x,))
converted = qatfx.convert_pt2e(prepared)
if {compile}:
    with torch.no_grad():
        torch.compile(converted, backend="qatfx")(x)
print("registered:", "qatfx" in torch._logging._internal.log_registry.log_alias_to_log_qnames)
"""


def run(env_vars: dict, compile: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCH_LOGS", "TORCH_TRACE", "QATFX_DUMP"))}
    env.update(env_vars)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(compile=compile)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_torch_trace_has_every_qatfx_pass_as_an_artifact(tmp_path):
    trace_dir = tmp_path / "trace"
    # A cached compile would skip the Inductor-side pass (and its artifacts): no caches.
    result = run({"TORCH_TRACE": str(trace_dir), "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "TORCH_LOGS": "qatfx"}, compile=True)
    text = "".join(p.read_text() for p in trace_dir.iterdir())
    names = re.findall(r'"artifact": \{"name": "(qatfx_\w+)", "encoding": "string"\}', text)
    for name in ("annotate", "insert_fake_quant", "convert"):
        assert f"qatfx_{name}_before" in names and f"qatfx_{name}_after" in names
    for stage in ("fuse_linear", "fuse_epilogue", "decompose", "eliminate_dead_code"):
        assert f"qatfx_inductor_{stage}_after" in names
    # The graph itself is the payload: the fused op appears after fuse_linear.
    assert "torch.ops.qatfx.w4a8_linear.default(" in text
    # TORCH_LOGS=qatfx (INFO): each Inductor-side stage says what fired, no DEBUG lines.
    assert re.search(r"\[0/0\] qatfx lowering: stage fuse_linear: w4a8_linear_2d_bias=2", result.stderr), result.stderr[-3000:]
    assert "epilogue_relu=1" in result.stderr
    assert "pass insert_fake_quant" not in result.stderr

    tlparse = shutil.which("tlparse") or shutil.which("tlparse", path=str(Path(sys.executable).parent))
    if tlparse:  # optional: tlparse's report names the artifacts too
        out = tmp_path / "tl_out"
        (log,) = trace_dir.iterdir()
        subprocess.run([tlparse, str(log), "-o", str(out), "--no-browser"], check=True, capture_output=True, timeout=120)
        written = {p.name for p in out.rglob("*")}
        assert any(n.startswith("qatfx_inductor_fuse_linear_after") for n in written), sorted(written)
        assert any(n.startswith("qatfx_insert_fake_quant_after") for n in written), sorted(written)


def test_torch_logs_plus_qatfx_shows_debug_lines():
    result = run({"TORCH_LOGS": "+qatfx"}, compile=False)
    assert re.search(r"pass insert_fake_quant: modified=True, \d+ nodes added", result.stderr), result.stderr[-3000:]
    assert "qatfx: prepared 2 linear layers" in result.stderr
    assert "registered: True" in result.stdout


def test_without_torch_logs_qatfx_is_quiet():
    result = run({}, compile=False)
    assert "pass insert_fake_quant" not in result.stderr and "prepared 2 linear" not in result.stderr
