"""The benchmark scripts run end to end in their `--device cpu` smoke mode (every variant
is checked for correctness before it is timed, and a failed check exits non-zero)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script, args, expected",
    [
        # each a fresh process with its own Inductor compiles, 20-40 s on 2 cores: the long run,
        # like the others (the default test time stays under 15 minutes)
        pytest.param("bench_w4a8_gemm.py", ["--quick"], "qatfx fused (incl. act quant)", marks=pytest.mark.long),
        pytest.param("bench_decode.py", [], "qatfx 8da4w", marks=pytest.mark.long),
        pytest.param("bench_qat_step.py", ["--quick"], "qatfx 8da4w, compiled", marks=pytest.mark.long),
        # four fresh Inductor compiles, ~2 min on 2 cores: the long run only
        pytest.param("bench_regional_compile.py", ["--quick"], "regional + compile_regions", marks=pytest.mark.long),
        # four fresh compiles (float, full QAT, both LoRA modes), ~2 min on 2 cores: the long run only
        pytest.param("bench_qat_lora.py", ["--quick"], "QAT+LoRA torchtune, compiled", marks=pytest.mark.long),
        # the Hugging Face rows: six worker processes (float / QAT / QAT+LoRA, eager and compiled), ~3.5 min
        pytest.param("bench_qat_step.py", ["--model", "hf-quick", "--rounds", "1"], "QAT+LoRA, compiled", marks=pytest.mark.long),
        # four exports and four timed subprocesses, ~85 s on 2 cores: the long run only
        pytest.param("bench_cpu_serving.py", ["--quick"], "8da4w .pte", marks=pytest.mark.long),
    ],
)
def test_cpu_smoke_run_writes_its_table(tmp_path, script, args, expected):
    out = tmp_path / "result.md"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--device", "cpu", "--out", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = out.read_text()
    assert expected in table and "| " in table
    if script == "bench_decode.py":  # the rewrites ran and were counted, warm compile caches or not
        assert "'w4a8_linear':" in table
