"""Static checks of the compiled w4a8 GEMM kernel, without a GPU: for sm_80 and sm_90, the
first autotune config of the decode and prefill paths at G = 32 and 128 compiles without
register spills or local memory, its main loop runs on the tensor cores, and the decode loop
is predicted (instruction counts x issue rates) to issue faster than H200's HBM.

`benchmarks/kernel_static.py --quick` does the compiling (real ptxas, cuobjdump from the
Triton wheel) in a subprocess: this session imported qatfx under TRITON_INTERPRET=1
(tests/conftest.py), which swaps the real autotune configs for interpreter ones.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "kernel_static.py"

_spec = importlib.util.spec_from_file_location("kernel_static", SCRIPT)
kernel_static = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = kernel_static  # dataclasses look their module up there
_spec.loader.exec_module(kernel_static)

_MISSING = kernel_static.missing_tools()
needs_tools = pytest.mark.skipif(_MISSING is not None,
                                 reason=f"ptxas/cuobjdump not in the Triton install: {_MISSING}")

PATH_ARCH = [(path, arch) for path in ("decode", "prefill") for arch in ("sm_80", "sm_90")]
# sm_80 has only mma.sync (IMMA); sm_90 may use IMMA or warpgroup wgmma (IGMMA).
MMA_PREFIXES = {"sm_80": ("IMMA",), "sm_90": ("IMMA", "IGMMA")}


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("kernel_static") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def _rows_for(rows: list[dict], path: str, arch: str) -> list[dict]:
    selected = [r for r in rows if r["kernel"] == path and r["arch"] == arch]
    assert {r["group_size"] for r in selected} == set(kernel_static.GROUP_SIZES)
    return selected


def _name(r: dict) -> str:
    return f"{r['kernel']} {r['arch']} G={r['group_size']} {r['config']}"


# The sm_80 prefill spill found earlier (128x128 w8 and 128x64 w4 at G = 128, 255 registers)
# went with those configs (qatfx/lowering/kernels/w4a8_gemm.py). Triton (hence ptxas) is
# pinned in .ci/constraints.txt so the compiler output is the one measured.


@needs_tools
@pytest.mark.parametrize("path, arch", PATH_ARCH)
def test_no_spills_and_no_local_memory(rows, path, arch):
    for r in _rows_for(rows, path, arch):
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
            f"{_name(r)}: {r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads "
            f"at {r['registers']} registers ({r['loop_local_accesses']} LDL/STL in the main loop)")
        assert r["stack"] == 0 and r["cuobjdump_local"] == 0, (
            f"{_name(r)}: stack frame {r['stack']} B, local memory {r['cuobjdump_local']} B")
        assert r["registers"] == r["cuobjdump_reg"] <= 255  # ptxas log and cubin agree


@needs_tools
@pytest.mark.parametrize("path, arch", PATH_ARCH)
def test_main_loop_runs_on_tensor_cores(rows, path, arch):
    for r in _rows_for(rows, path, arch):
        assert r["innermost_loops"] >= 1, f"{_name(r)}: no loop found in the SASS"
        assert r["mma_in_loop"], f"{_name(r)}: no MMA instruction in the main loop"
        assert all(op.startswith(MMA_PREFIXES[arch]) for op in r["mma_in_loop"]), (
            f"{_name(r)}: unexpected MMA {r['mma_in_loop']}")
        # The loop found is the group loop: its MMA work covers exactly one group of K, so
        # the per-byte columns divide by the right byte count.
        assert r["k_per_iter_from_mma"] == r["group_size"], _name(r)


@needs_tools
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_decode_loop_is_predicted_above_h200_hbm(rows, arch):
    """The decode autotuner's first config (1x256, the M = 1 tile) issues its main loop faster
    than H200's HBM delivers bytes, at G = 32 and 128 (a static prediction from instruction
    counts and issue rates, docs/lowering.md; the old loop was at 3-6 B/clk/SM)."""
    hbm = kernel_static.HBM_BYTES_PER_CLOCK["H200"]
    for r in _rows_for(rows, "decode", arch):
        assert r["ceiling_bytes_per_clock"] > hbm, (
            f"{_name(r)}: predicted {r['ceiling_bytes_per_clock']:.1f} B/clk/SM "
            f"({r['ceiling_limit']}-bound) <= H200 HBM {hbm:.1f}; per byte {r['per_byte']}")


# ---- the parsers on hand-written input: the checks above can fail -----------------------


def test_ptxas_log_with_spills_is_read_as_spilling():
    log = ("ptxas info    : Function properties for _w4a8_gemm_kernel\n"
           "    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert kernel_static.parse_ptxas_log(log) == {
        "registers": 255, "stack": 8, "spill_stores": 8, "spill_loads": 4}


def test_main_loop_is_the_innermost_backward_branch():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, [R4.64] ;
        /*0020*/                   IMMA.16832.S8.S8.SAT R8, R12, R16, R8 ;
        /*0030*/                   LOP3.LUT R3, R2, 0xf, RZ, 0xc0, !PT ;
        /*0040*/               @P0 BRA 0x10 ;
        /*0050*/                   I2FP.F32.S32 R6, R8 ;
        /*0060*/              @!P1 BRA 0x0 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
    """
    loop, n_innermost = kernel_static.main_loop(kernel_static.parse_sass(sass))
    assert [addr for addr, _, _ in loop] == [0x10, 0x20, 0x30, 0x40]  # not the outer 0x0..0x60
    assert n_innermost == 1  # the trap `BRA <itself>` after EXIT is not a loop
    assert [kernel_static.op_class(op) for _, op, _ in loop] == ["mem", "mma", "int", "other"]


def test_mma_work_per_instruction():
    assert kernel_static.macs_per_warp_instruction("IMMA.16832.S8.S8.SAT") == 16 * 8 * 32
    # A wgmma is one warpgroup (4 warps) instruction, each warp's copy counts a quarter.
    assert kernel_static.macs_per_warp_instruction("IGMMA.64x128x32.S8.S8") == 64 * 128 * 32 // 4


def test_predicted_ceiling_is_the_slowest_pipe():
    per_byte = {"int": 0.1, "fp": 0.01, "cvt": 0.05, "mem": 0.01}
    # integer 2 / 0.1 = 20, conversions 0.5 / 0.05 = 10, issue 4 / 0.2 = 20: conversions limit
    assert kernel_static.predicted_ceiling(90, per_byte, 0.2) == (10.0, "cvt")
    assert kernel_static.predicted_ceiling(90, {**per_byte, "cvt": 0.0}, 0.4) == (10.0, "issue")
