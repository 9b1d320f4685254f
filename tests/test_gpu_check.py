"""benchmarks/gpu_check.py in its CPU smoke mode (`--smoke`): every stage runs (or is skipped
with a reason), the kernel sweep's cases all pass, no time is reported without a GPU, and
the JSON and the markdown table are written. Like tests/test_benchmarks.py, in a subprocess:
the script sets TRITON_INTERPRET and imports its sibling benchmark scripts itself."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["environment", "correctness_sweep", "compiled_decode", "gemm_table", "decode_e2e"]


@pytest.mark.long  # every stage's compiles in a fresh process, ~1.5 min on 2 cores
def test_smoke_run_writes_every_stage(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (json_path,) = tmp_path.glob("gpu_check_*_smoke.json")
    report = json.loads(json_path.read_text())
    assert report["schema"] == "qatfx.gpu_check/1" and report["device"] == "cpu" and report["smoke"]
    assert list(report["stages"]) == STAGES
    for name, stage in report["stages"].items():
        assert stage["status"] in ("ok", "skipped"), (name, stage["status"], stage["error"], stage["traceback"])
        assert stage["status"] == "ok" or stage["reason"], name

    sweep = report["stages"]["correctness_sweep"]["result"]
    assert sweep["cases"] and sweep["failed"] == 0 and sweep["not_run"] == 0
    assert sweep["passed"] == len(sweep["cases"])
    assert {c["G"] for c in sweep["cases"]} == {32, 128, 256} and {c["M"] for c in sweep["cases"]} == {1, 3, 16, 17}
    assert all(c["int_max_abs_err"] == 0.0 and c["epi_max_err_over_bound"] <= 1.0 for c in sweep["cases"])

    decode = report["stages"]["compiled_decode"]["result"]
    assert decode["w4a8_linear_rewrites"] == decode["linear_layers"] > 0 and decode["check"]["ok"]

    # No GPU here: every timing field is null, with the reason recorded.
    env = report["stages"]["environment"]["result"]
    assert env["copy_bandwidth_GBps"] is None and env["bf16_matmul_TFLOPs"] is None and env["timing_reason"]
    assert decode["step_ms"] is None and decode["timing_reason"]
    gemm = report["stages"]["gemm_table"]["result"]
    assert gemm["timing_reason"] and all(r["us"] is None and r["vs_bf16"] is None for r in gemm["rows"])
    assert {r["ok"] for r in gemm["rows"] if "int4pack" not in r["variant"]} == {True}
    e2e = report["stages"]["decode_e2e"]
    if e2e["status"] == "ok":
        assert all(r["ms_per_token"] is None for r in e2e["result"]["rows"]) and e2e["result"]["timing_reason"]

    table = json_path.with_suffix(".md").read_text()
    assert "## Stages" in table and "| correctness_sweep" in table and "## GEMM" in table
