"""One command for a first look at a GPU: environment, the fused kernel's correctness, the
qatfx lowering on a decode model, the GEMM table and decode end to end, in under 7 minutes,
written to one JSON file and one markdown file.

    python benchmarks/gpu_check.py                 # GPU: the full check (single GPU, ~6.5 min cap)
    python benchmarks/gpu_check.py --smoke         # CPU smoke run: every stage, tiny shapes, < 1 min
    python benchmarks/gpu_check.py --device cpu    # the same as --smoke
    python benchmarks/gpu_check.py --smoke --device cuda   # tiny shapes on a GPU (quick sanity run)
    python benchmarks/gpu_check.py --out DIR --budget 400

On the GPU machine, with torch and triton already installed, install qatfx without touching
torch (`pip install --no-deps -e .`) and run it from the repository root. On CPU the Triton
kernel runs in the interpreter (TRITON_INTERPRET=1, set here before any kernel is imported)
and no time is measured: every timing field is null and a `*_reason` field says why.

Stages, in order; each has its own wall-clock budget, checked between sub-steps (a single
sub-step, e.g. one torch.compile, is not interrupted: `seconds` can exceed `budget_s`), and
all of them share the total budget (--budget). A stage that fails or runs out of time is
recorded with its exception text and the next stage still runs.

 1. environment: torch / triton / CUDA / driver versions, GPU name, SM count, L2, clocks
    (torch's device properties and nvidia-smi, where present); measured device-to-device copy
    bandwidth (1 GiB copy) and bf16 dense matmul TFLOP/s (8192^3), each the median of 5
    CUDA-event timed runs.
 2. correctness_sweep: qatfx's fused int8 x int4 kernel (`w4a8_gemm`) on Llama-3-8B shapes
    (N x K: 4096x4096, 6144x4096, 14336x4096, 4096x14336), M in 1/3/16/17/4096, G in
    128/32/256, each case checked two ways, under the kernel's contract as
    tests/lowering/kernels/test_w4a8_gemm.py states it:
      - integer: unit scales, int8 activations over their full range, random integer zero
        points, fp32 output: the result must equal (x_q - z) @ q_w^T computed exactly
        (float64 matmul of integers: exact), error 0. Valid while every partial sum is an
        integer below 2^24 (checked per case: `int_partial_sum_bound` < 2^24).
      - epilogue: convert's real scales (qatfx.reference on random float x and w), bf16
        output, against the kernel's formula in torch (the same computation as
        `w4a8_gemm_reference`, in row chunks; its first rows are compared bit for bit with
        `w4a8_gemm_reference` itself), within the test's derived elementwise bound
        (fp32 summation order, FMA contraction, one bf16 rounding of the output).
 3. compiled_decode: bench_decode's model (decode_model.DecodeLM; 1.1B on GPU, tiny on CPU)
    -> qatfx.prepare_pt2e(Int8DynActInt4WeightQuantizer(G)) -> convert_pt2e ->
    torch.compile(backend="qatfx", mode="reduce-overhead" on GPU), with the rewrite counters
    (torch._dynamo.utils.counters["qatfx"]), one step compared with the eager converted
    model (bench_decode.RTOL), and the time of a step (mean of 10, CUDA only).
 4. gemm_table: y = x @ W^T on the same shapes at M = 1/16/4096, G = 128: bf16 F.linear,
    the qatfx fused kernel (activation quantization excluded), `aten._weight_int4pack_mm`
    (tinygemm, where the op exists) and `torch._int_mm` W8A8 (M = 4096 only). Each is checked
    against a float64 reference first (bench_w4a8_gemm's variants and tolerances), then
    timed as a CUDA graph of calls that rotate over enough weight copies to exceed twice the
    L2 (cold weights); median of 5 replays of 10 graph launches, spread in %.
 5. decode_e2e: when at least 45 s of the total budget remain: bench_decode's comparison,
    the bf16 model under torch.compile (same mode) against stage 3's compiled qatfx model,
    one step checked against eager, then bench_decode's defaults (prompt 256 in the cache,
    8 warm-up steps, 128 timed greedy steps, twice): ms/token, tokens/s, weight GB/s and the
    speedup over bf16. Otherwise status "skipped".

Output (--out DIR, default benchmarks/results/): gpu_check_<hostname>.json and .md on a GPU,
gpu_check_<hostname>_smoke.{json,md} for --smoke runs, rewritten after every stage. JSON:

    {
      "schema": "qatfx.gpu_check/1",
      "host": str, "device": "cuda" | "cpu", "smoke": bool, "command": str, "git": str,
      "started_utc": str, "total_seconds": float, "total_budget_s": float,
      "exit_code": int,          # 0 all ok/skipped, 1 a stage failed, 2 a stage timed out
                                 # (also the process's exit status)
      "stages": {                # in run order
        "<stage>": {
          "status": "ok" | "failed" | "timeout" | "skipped" | "not run" (not reached yet),
          "seconds": float, "budget_s": float,
          "reason": str | null,     # why skipped
          "error": str | null,      # "ExceptionType: message" of a failure or timeout
          "traceback": str | null,  # the last frames of an unexpected exception
          "result": {...}           # the stage's own fields, partial after a failure
        }
      }
    }

Stage results:
  environment:       {"torch", "triton", "python", "qatfx", "cuda_runtime", "cudnn", "platform",
                     "gpu": {torch's device properties, "nvidia_smi": {field: value} or
                     {"error"}} | null on CPU, "copy_bandwidth_GBps", "copy_runs_ms",
                     "bf16_matmul_TFLOPs", "matmul_runs_ms", "timing_reason"}
  correctness_sweep: {"cases": [{"N", "K", "M", "G", "source", "path" (the launch plan),
                     "status": "passed" | "failed" | "error" | "not run", "ok",
                     "int_max_abs_err", "int_partial_sum_bound", "int_ok", "epi_max_abs_err",
                     "epi_max_err_over_bound", "reference_matches_qatfx_reference", "epi_ok",
                     "error"}], "passed", "failed", "not_run"}
  compiled_decode:   {"model", "params_M", "group_size", "mode", "prepare_convert_s",
                     "compile_first_step_s", "counters", "w4a8_linear_rewrites",
                     "linear_layers", "check": {"rms_rel_err", "rtol", "ok"}, "step_ms",
                     "timing_reason"}
  gemm_table:        {"rows": [{"N", "K", "M", "G", "variant", "ok", "err", "rtol", "us",
                     "spread_pct", "TFLOPs", "GBps", "vs_bf16", "copies", "timing", "note"}],
                     "l2_bytes", "timing_reason"}
  decode_e2e:        {"steps", "warmup", "checks": [...], "sqnr_db", "rows": [{"model",
                     "ms_per_token", "spread_pct", "tokens_per_s", "weights_MB",
                     "weight_GBps", "vs_bf16"}], "timing_reason"}
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional


T_START = time.monotonic()  # the total includes the imports below


def _pre_parse(argv: list[str]) -> tuple[str, bool]:
    """(device, smoke) from the command line, before torch's kernels load: on CPU the Triton
    interpreter must be switched on before qatfx's kernels are imported."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", choices=("cuda", "cpu"))
    pre.add_argument("--smoke", action="store_true")
    known = pre.parse_known_args(argv)[0]
    device = known.device or ("cpu" if known.smoke else None)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    return device, known.smoke or device == "cpu"


DEVICE, SMOKE = _pre_parse(sys.argv[1:])

import torch  # noqa: E402

import bench_w4a8_gemm as gemm_bench  # noqa: E402  (a sibling script, as bench_decode imports it)
import triton  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import bench_decode  # noqa: E402
import qatfx  # noqa: E402
from decode_model import LLAMA_1B, TINY, DecodeLM, initial_state  # noqa: E402
from qatfx import reference  # noqa: E402
from qatfx.lowering.kernels.w4a8_gemm import launch_plan, w4a8_gemm, w4a8_gemm_reference  # noqa: E402
from qatfx.spec import ROW  # noqa: E402

SCHEMA = "qatfx.gpu_check/1"
EPS = torch.finfo(torch.float32).eps
BF16 = torch.bfloat16
NOT_TIMED_CPU = ("not measured: CPU run (no GPU; the Triton kernel runs in the interpreter), "
                 "so no time is reported")

# Llama-3-8B (config.json: hidden 4096, 32 query / 8 kv heads of 128, ffn 14336).
Shape = gemm_bench.Shape
GPU_SHAPES = (
    Shape(4096, 4096, "Llama-3-8B q_proj / o_proj"),
    Shape(6144, 4096, "Llama-3-8B qkv fused (4096 + 2 x 1024)"),
    Shape(14336, 4096, "Llama-3-8B gate_proj / up_proj"),
    Shape(4096, 14336, "Llama-3-8B down_proj"),
)
# Tiny shapes: N not a multiple of any tile, K = 1..16 groups, every group-size path.
SMOKE_SHAPES = (Shape(40, 512, "tiny (smoke)"), Shape(72, 256, "tiny (smoke)"))
SWEEP_GROUPS = (128, 32, 256)  # the production group size first: a timeout drops the others
GEMM_GROUP = 128


class Config(SimpleNamespace):
    """What a run measures: the full check on a GPU, tiny shapes for --smoke."""


def make_config(device: str, smoke: bool, budget: Optional[float]) -> Config:
    if smoke:
        scale = 3 if device == "cuda" else 1  # first Triton / Inductor compiles on a GPU host
        return Config(
            shapes=SMOKE_SHAPES, sweep_m=(1, 3, 16, 17), gemm_shapes=SMOKE_SHAPES[:1], gemm_m=(1, 17),
            gemm_group=32, int_mm_min_m=17, lm=TINY, group_size=32, prompt_len=8, steps=4, warmup=1,
            total_budget=budget or 120.0 * scale,
            budgets={"environment": 10 * scale, "correctness_sweep": 40 * scale, "compiled_decode": 40 * scale,
                     "gemm_table": 30 * scale},
            e2e_min_s=10, ref_chunk_elems=1 << 22)
    return Config(
        shapes=GPU_SHAPES, sweep_m=(1, 3, 16, 17, 4096), gemm_shapes=GPU_SHAPES, gemm_m=(1, 16, 4096),
        gemm_group=GEMM_GROUP, int_mm_min_m=1024, lm=LLAMA_1B, group_size=128, prompt_len=256, steps=128,
        warmup=8, total_budget=budget or 390.0,
        budgets={"environment": 20, "correctness_sweep": 150, "compiled_decode": 110, "gemm_table": 70},
        e2e_min_s=45, ref_chunk_elems=1 << 27)


# ---- stage plumbing ---------------------------------------------------------------------------


class StageTimeout(Exception):
    """The stage's budget ran out between two sub-steps."""


class CheckFailed(Exception):
    """A correctness check failed; the stage's result holds the details."""


class Skip(Exception):
    """The stage does not run here; the message says why."""


class Budget:
    """A stage's wall-clock budget, capped by the run's overall deadline."""

    def __init__(self, seconds: float, deadline: float) -> None:
        self.seconds = seconds
        self.deadline = min(time.monotonic() + seconds, deadline)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, next_step: str) -> None:
        if self.left() <= 0:
            raise StageTimeout(f"stage budget ({self.seconds:.0f} s, or the run's total) exhausted before {next_step}")


def error_text(exc: BaseException) -> str:
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg[:2000]}" if msg else type(exc).__name__


def run_stage(name: str, fn: Callable, ctx: Config, budget_s: float, deadline: float) -> dict:
    entry = {"status": "not run", "seconds": None, "budget_s": round(budget_s, 1), "reason": None,
             "error": None, "traceback": None, "result": {}}
    print(f"[gpu_check] stage {name} (budget {budget_s:.0f} s) ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        fn(ctx, Budget(budget_s, deadline), entry["result"])
        entry["status"] = "ok"
    except Skip as exc:
        entry["status"], entry["reason"] = "skipped", str(exc)
    except StageTimeout as exc:
        entry["status"], entry["error"] = "timeout", error_text(exc)
    except CheckFailed as exc:
        entry["status"], entry["error"] = "failed", error_text(exc)
    except Exception as exc:  # recorded; the next stage still runs
        entry["status"], entry["error"] = "failed", error_text(exc)
        entry["traceback"] = "".join(traceback.format_exception(exc)[-12:])
    finally:
        if ctx.device == "cuda":
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as exc:  # a poisoned context: later stages will say so too
                entry["error"] = (entry["error"] or "") + f" (then: {error_text(exc)})"
        entry["seconds"] = round(time.monotonic() - t0, 2)
    tail = entry["reason"] or entry["error"] or ""
    print(f"[gpu_check] stage {name}: {entry['status']} in {entry['seconds']:.1f} s {tail[:300]}", file=sys.stderr, flush=True)
    return entry


def cuda_time_ms(fn: Callable[[], object], runs: int = 5, inner: int = 1, warmup: int = 2) -> list[float]:
    """`runs` CUDA-event timings of `inner` back-to-back calls each, in ms per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return times


# ---- stage 1: environment ---------------------------------------------------------------------


def nvidia_smi() -> dict:
    fields = ("driver_version", "name", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.limit", "temperature.gpu", "pstate", "persistence_mode")
    # nvidia-smi numbers GPUs ignoring CUDA_VISIBLE_DEVICES, whose entries (index or UUID) it takes
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    index = torch.cuda.current_device()
    target = visible[index] if index < len(visible) else str(index)
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", target],
                             capture_output=True, text=True, timeout=15, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": error_text(exc)}
    return dict(zip(fields, (v.strip() for v in out.split(","))))


def device_properties() -> dict:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    names = ("name", "major", "minor", "multi_processor_count", "total_memory", "L2_cache_size", "clock_rate",
             "memory_clock_rate", "memory_bus_width", "max_threads_per_multi_processor", "warp_size", "uuid", "pci_bus_id")
    out = {}
    for n in names:
        if hasattr(props, n):
            v = getattr(props, n)
            out[n] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def qatfx_version() -> Optional[str]:
    try:
        return importlib.metadata.version("qatfx")
    except importlib.metadata.PackageNotFoundError:
        return None


def stage_environment(ctx: Config, budget: Budget, result: dict) -> None:
    result |= {
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "qatfx": qatfx_version(), "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "copy_bandwidth_GBps": None, "bf16_matmul_TFLOPs": None,
    }
    if ctx.device != "cuda":
        result |= {"gpu": None, "timing_reason": NOT_TIMED_CPU}
        return
    result["gpu"] = device_properties() | {"device_count": torch.cuda.device_count(), "index": torch.cuda.current_device()}
    budget.check("nvidia-smi")
    result["gpu"]["nvidia_smi"] = nvidia_smi()

    budget.check("the copy bandwidth")
    n_bytes = 1 << 30
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    runs = cuda_time_ms(lambda: dst.copy_(src), runs=5, inner=10)
    result["copy_runs_ms"] = [round(t, 4) for t in runs]
    # a copy reads and writes every byte
    result["copy_bandwidth_GBps"] = round(2 * n_bytes / (statistics.median(runs) * 1e-3) / 1e9, 1)
    del src, dst

    budget.check("the bf16 matmul")
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=BF16)
    b = torch.randn(n, n, device="cuda", dtype=BF16)
    runs = cuda_time_ms(lambda: torch.mm(a, b), runs=5, inner=5, warmup=3)
    result["matmul_runs_ms"] = [round(t, 4) for t in runs]
    result["bf16_matmul_TFLOPs"] = round(2 * n**3 / (statistics.median(runs) * 1e-3) / 1e12, 1)
    result["timing_reason"] = None


# ---- stage 2: exact-integer correctness sweep -------------------------------------------------


def integer_case(m: int, n: int, k: int, g: int, device: str, gen: torch.Generator) -> dict:
    """Unit scales, fp32 output: the kernel's result must be the exact integer product.
    As tests/lowering/kernels/test_w4a8_gemm.py::test_integer_dots_are_exact, with convert's
    int16 group sums."""
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device, generator=gen)
    q_w = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=device, generator=gen)
    z = torch.randint(-128, 128, (m, 1), device=device, generator=gen).float()
    y = w4a8_gemm(x_q, torch.ones(m, 1, device=device), z, reference.pack_int4(q_w, g), torch.ones(n, k // g, device=device),
                  reference.int4_group_sums(q_w, g), group_size=g, out_dtype=torch.float32)
    xz = x_q.double() - z.double()
    exact = xz @ q_w.double().t()  # products and sums of integers below 2^53: exact in float64
    # every partial sum the kernel forms (any order) is at most sum_k |x - z| |w| in magnitude
    partial_bound = float((xz.abs() @ q_w.double().abs().t()).max())
    err = float((y.double() - exact).abs().max())
    del y, exact, xz
    return {"int_max_abs_err": err, "int_partial_sum_bound": partial_bound,
            "int_ok": err == 0.0 and partial_bound < 2.0**24}


def reference_and_magnitude(x_q, x_scale, x_zero, q_w, w_scales, w_group_sums, g: int, chunk_elems: int):
    """The kernel's formula in torch, as `w4a8_gemm_reference` computes it (exact group dots
    times the group scales summed in fp32 in increasing g, minus z_t * c_n with
    c_n = sum_g s_ng * wsum_ng in fp32, times s_t), in row chunks so large M fits in memory;
    and mag = |s_t| * (sum_g |s_ng * dot_g| + |z_t| * sum_g |s_ng * wsum_ng|) (float64), the
    test's error scale (the zero-point term is subtracted once, after the sums)."""
    (m, k), n = x_q.shape, q_w.shape[0]
    groups = k // g
    w_groups = q_w.reshape(n, groups, g).permute(1, 2, 0).double()  # (groups, G, N)
    sums32 = w_group_sums.float().t()  # (groups, N), exact
    scales32 = w_scales.float().t()  # (groups, N)
    scales64 = w_scales.double().abs().t().unsqueeze(1)
    col = torch.zeros(n, dtype=torch.float32, device=x_q.device)
    for i in range(groups):
        col = col + scales32[i] * sums32[i]
    col_mag = (w_group_sums.double().abs().t() * scales64.squeeze(1)).sum(0)  # (N,)
    ref = torch.empty(m, n, dtype=torch.float32, device=x_q.device)
    mag = torch.empty(m, n, dtype=torch.float64, device=x_q.device)
    rows = max(1, chunk_elems // (groups * n))
    for r in range(0, m, rows):
        xs, zs = x_q[r:r + rows], x_zero[r:r + rows]
        dots = torch.bmm(xs.reshape(xs.shape[0], groups, g).permute(1, 0, 2).double(), w_groups)  # exact
        d32 = dots.float()  # exact: |dot| < 2^24
        acc = torch.zeros(xs.shape[0], n, dtype=torch.float32, device=x_q.device)
        for i in range(groups):
            acc = acc + d32[i] * scales32[i]
        ref[r:r + rows] = (acc - zs * col) * x_scale[r:r + rows]
        mag[r:r + rows] = x_scale[r:r + rows].double().abs() * (
            (dots.abs() * scales64).sum(0) + zs.double().abs() * col_mag)
        del dots, d32
    return ref, mag


def epilogue_case(m: int, n: int, k: int, g: int, device: str, gen: torch.Generator, chunk_elems: int) -> dict:
    """Convert's real scales, bf16 output, against the kernel's formula within the bound
    derived in tests/lowering/kernels/test_w4a8_gemm.py::reference_bound (no bias,
    activation or residual): 2 (n_groups + 3) eps mag for the fp32 summation order and FMA
    contraction, plus the test's eps * 1.13 mag, plus one bf16 spacing 2^-7 (|y| + bound)
    for the output rounding (the interpreter truncates, a GPU rounds to nearest)."""
    w = torch.randn(n, k, device=device, generator=gen)
    w_scales, _ = reference.choose_qparams(w, -8, 7, g, True, EPS, torch.float32)
    q_w = reference.quantize(w, w_scales, None, -8, 7, g)
    del w
    x = torch.randn(m, k, device=device, generator=gen)
    x_scale, x_zero = reference.choose_qparams(x, -128, 127, ROW, False, EPS, torch.float32)
    x_q = reference.quantize(x, x_scale, x_zero, -128, 127, ROW)
    w_packed, w_sums = reference.pack_int4(q_w, g), reference.int4_group_sums(q_w, g)
    y = w4a8_gemm(x_q, x_scale, x_zero, w_packed, w_scales, w_sums, group_size=g, out_dtype=BF16)
    ref, mag = reference_and_magnitude(x_q, x_scale, x_zero, q_w, w_scales, w_sums, g, chunk_elems)
    # the chunked reference is qatfx's own reference, bit for bit (checked on the first rows)
    r = min(m, 4)
    same = torch.equal(ref[:r], w4a8_gemm_reference(x_q[:r], x_scale[:r], x_zero[:r], w_packed, w_scales, w_sums,
                                                    group_size=g, out_dtype=torch.float32))
    bound = 2 * (k // g + 3) * EPS * mag + EPS * 1.13 * mag
    bound = bound + 2.0**-7 * (ref.double().abs() + bound)
    err = (y.double() - ref.double()).abs()
    within = bool((err <= bound).all())
    # err / bound, where a zero bound (an exactly zero result) counts 0 if matched, inf if not
    unbounded = torch.where(err > 0, torch.full_like(err, math.inf), torch.zeros_like(err))
    ratio = torch.where(bound > 0, err / bound.clamp_min(torch.finfo(torch.float64).tiny), unbounded)
    out = {"epi_max_abs_err": float(err.max()), "epi_max_err_over_bound": float(ratio.max()),
           "reference_matches_qatfx_reference": same, "epi_ok": same and within}
    del y, ref, mag, bound, err
    return out


def sweep_cases(ctx: Config) -> list[tuple[Shape, int, int]]:
    return [(s, m, g) for g in SWEEP_GROUPS for s in ctx.shapes for m in ctx.sweep_m if s.k % g == 0]


def stage_correctness_sweep(ctx: Config, budget: Budget, result: dict) -> None:
    cases = result["cases"] = []
    todo = sweep_cases(ctx)
    timed_out: Optional[StageTimeout] = None
    for i, (s, m, g) in enumerate(todo):
        plan = launch_plan(m, s.n, s.k, g, torch.device(ctx.device))
        case = {"N": s.n, "K": s.k, "M": m, "G": g, "source": s.source,
                "path": f"{'decode' if plan.small_m else 'large-M'} tiles, split-K x{plan.split_k}"}
        try:
            budget.check(f"case {i + 1}/{len(todo)}")
        except StageTimeout as exc:
            timed_out = exc
            cases.extend({"N": s2.n, "K": s2.k, "M": m2, "G": g2, "source": s2.source, "status": "not run", "ok": None}
                         for s2, m2, g2 in todo[i:])
            break
        gen = torch.Generator(device=ctx.device).manual_seed(1000 * i + 7)
        try:
            case |= integer_case(m, s.n, s.k, g, ctx.device, gen)
            case |= epilogue_case(m, s.n, s.k, g, ctx.device, gen, ctx.ref_chunk_elems)
            case["ok"] = case["int_ok"] and case["epi_ok"]
            case["status"], case["error"] = ("passed" if case["ok"] else "failed"), None
        except Exception as exc:  # the case fails; the sweep goes on
            case |= {"ok": False, "status": "error", "error": error_text(exc)}
        cases.append(case)
        print(f"  N={s.n} K={s.k} M={m} G={g} [{case['path']}]: {case['status']} "
              f"int err {case.get('int_max_abs_err')}, epi err/bound {case.get('epi_max_err_over_bound')}",
              file=sys.stderr, flush=True)
    result["passed"] = sum(c.get("status") == "passed" for c in cases)
    result["failed"] = sum(c.get("ok") is False for c in cases)
    result["not_run"] = sum(c.get("status") == "not run" for c in cases)
    if result["failed"]:
        raise CheckFailed(f"{result['failed']} of {len(cases)} cases failed" + (f"; then {timed_out}" if timed_out else ""))
    if timed_out:
        raise timed_out


# ---- stage 3: a decode model through backend="qatfx" ------------------------------------------


def decode_args(ctx: Config, steps: int, warmup: int) -> SimpleNamespace:
    """The fields bench_decode.time_decode reads."""
    return SimpleNamespace(device=ctx.device, mode=ctx.mode, steps=steps, warmup=warmup)


def stage_compiled_decode(ctx: Config, budget: Budget, result: dict) -> None:
    # the cache holds the prompt and the longest run of steps, as bench_decode sizes it
    cfg = dataclasses.replace(ctx.lm, max_seq=64 * -(-(ctx.prompt_len + max(ctx.steps, ctx.warmup) + 1) // 64))
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = DecodeLM(cfg, BF16).eval()
    state = initial_state(cfg, 1, ctx.prompt_len, BF16, ctx.device)
    result |= {"model": f"DecodeLM dim {cfg.dim}, {cfg.layers} layers, {cfg.heads}/{cfg.n_kv_heads} heads, ffn {cfg.hidden}, "
                        f"vocab {cfg.vocab_size}, cache {cfg.max_seq}, prompt {ctx.prompt_len}, batch 1",
               "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
               "group_size": ctx.group_size, "mode": ctx.mode or "default",
               "linear_layers": sum(isinstance(mod, torch.nn.Linear) for mod in model.modules())}

    budget.check("prepare_pt2e + convert_pt2e")
    t0 = time.perf_counter()
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(group_size=ctx.group_size)
    prepared = qatfx.prepare_pt2e(model, quantizer, state, dynamic_shapes=(None,) * 4)
    with torch.no_grad():
        converted = qatfx.convert_pt2e(prepared)
    del prepared
    result["prepare_convert_s"] = round(time.perf_counter() - t0, 1)

    budget.check('torch.compile(backend="qatfx")')
    counters["qatfx"].clear()
    compiled = torch.compile(converted, backend="qatfx", mode=ctx.mode)
    t0 = time.perf_counter()
    # A warm FX graph / AOTAutograd cache would skip qatfx's pass and leave the counters empty:
    # compile this one cold, so the rewrites run and are counted.
    no_graph_caches = (torch._inductor.config.patch(fx_graph_cache=False),
                       torch._functorch.config.patch(enable_autograd_cache=False))
    with torch.no_grad(), no_graph_caches[0], no_graph_caches[1]:
        out = compiled(*state)[0].clone()  # out of the CUDA-graph pool before the next replay
        if ctx.device == "cuda":
            torch.cuda.synchronize()
    result["compile_first_step_s"] = round(time.perf_counter() - t0, 1)
    result["graph_caches"] = "FX graph and AOTAutograd caches off for this compile (the pass must run to be counted)"
    result["counters"] = dict(counters["qatfx"])
    result["w4a8_linear_rewrites"] = sum(v for name, v in result["counters"].items() if name.startswith("w4a8_linear"))

    budget.check("the eager comparison")
    with torch.no_grad():
        ref = converted(*state)[0]
    err = gemm_bench.rms_rel_error(out, ref)
    rtol = bench_decode.RTOL["qatfx 8da4w"]
    result["check"] = {"rms_rel_err": err, "rtol": rtol, "ok": err <= rtol,
                       "what": "compiled vs eager converted model, one decode step's logits"}
    if not result["check"]["ok"]:
        raise CheckFailed(f"compiled vs eager logits: RMS rel err {err:.2e} > {rtol:.0e}")
    if result["w4a8_linear_rewrites"] == 0:
        raise CheckFailed(f"no w4a8_linear rewrite fired: counters {result['counters']}")
    # checked: stage decode_e2e times this compiled model against bf16
    ctx.decode = SimpleNamespace(model=model, converted=converted, compiled=compiled, state=state, qatfx_logits=out)

    if ctx.device != "cuda":
        result |= {"step_ms": None, "timing_reason": NOT_TIMED_CPU}
        return
    budget.check("the step timing")
    sec, _ = bench_decode.time_decode(compiled, state, decode_args(ctx, steps=10, warmup=3))
    result |= {"step_ms": round(1e3 * sec, 3), "timing_reason": None,
               "timing": "mean of 10 greedy steps (x2 repeats) after 3 warm-up steps, wall clock with synchronize"}


# ---- stage 4: the GEMM table ------------------------------------------------------------------


def l2_bytes() -> Optional[int]:
    if DEVICE != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", None) or None


def copies_for(weight_bytes: float, device: str) -> int:
    """Weight copies to rotate over so that a call never finds its weights in L2: twice the
    L2 this device reports (bench_w4a8_gemm.copies_for assumes the H100's 50 MB)."""
    l2 = l2_bytes()
    if device != "cuda" or not l2:
        return gemm_bench.copies_for(weight_bytes, device)
    return min(64, max(2, math.ceil(2 * l2 / weight_bytes)))


def setup_int4pack(p, g: int, copies: int):
    """aten._weight_int4pack_mm (tinygemm, CUDA), with qatfx's symmetric int4 weights in its
    asymmetric format: uint4 = q + 8, dequantized as (uint4 - 8) * scale + zero, zero = 0.
    Packing as torch's own tests do (torch/testing/_internal/common_quantization.py,
    _group_quantize_tensor); bf16 scales, so the reference uses the bf16-rounded scales."""
    op = getattr(torch.ops.aten, "_weight_int4pack_mm", None)
    if op is None:
        raise RuntimeError("torch.ops.aten._weight_int4pack_mm is not in this torch build")
    if p.device != "cuda":
        raise RuntimeError("CUDA only here (CPU has _weight_int4pack_mm_for_cpu, another packing)")
    q, _, scale, _ = p.int4(g)
    n, k = q.shape
    u = (q.to(torch.int32) + 8)
    packed_u8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
    scale_bf16 = scale.to(BF16)
    scales_and_zeros = torch.stack([scale_bf16, torch.zeros_like(scale_bf16)], dim=-1).transpose(0, 1).contiguous()  # (K/G, N, 2)
    arg_sets = []
    for _ in range(copies):
        w = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)  # inner_k_tiles = 8, as torchao
        arg_sets.append((p.x, w, g, scales_and_zeros.clone()))
    w_ref = (q.double().view(n, -1, g) * scale_bf16.double()[..., None]).view(n, k)
    return gemm_bench.Prepared(op, arg_sets, p.x.double() @ w_ref.T, "tinygemm, bf16 scales")


def time_cuda_graph(fn: Callable, arg_sets: list[tuple], replays: int = 10, runs: int = 5) -> tuple[float, float, str]:
    """µs per call: one CUDA graph holds one call per argument set (each with its own weight
    copy), so launch overhead is gone and every call reads cold weights. Median over `runs`
    timings of `replays` graph launches; spread = (max - min) / median in %. Falls back to
    triton.testing.do_bench over the rotated copies if the capture fails."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for args in arg_sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            for args in arg_sets:
                fn(*args)
        times = cuda_time_ms(graph.replay, runs=runs, inner=replays, warmup=2)
        per_call = [1e3 * t / len(arg_sets) for t in times]
        how = f"CUDA graph of {len(arg_sets)} calls, median of {runs} x {replays} replays"
    except Exception as exc:
        torch.cuda.synchronize()
        us, spread = gemm_bench.time_us(fn, arg_sets, "cuda")
        return us, spread, f"do_bench (CUDA graph capture failed: {error_text(exc)[:160]})"
    med = statistics.median(per_call)
    return med, 100 * (max(per_call) - min(per_call)) / med, how


def gemm_variants(ctx: Config, m: int) -> list[tuple]:
    """(name, setup, rtol, weight bytes of one copy (shape, G), minimal bytes moved (shape, M, G)):
    bench_w4a8_gemm's variants where it has them."""
    by_name = {v.name: v for v in gemm_bench.VARIANTS}
    bf16, fused, w8a8 = by_name["bf16 F.linear"], by_name["qatfx fused (excl. act quant)"], by_name["w8a8 _int_mm (excl. act quant)"]
    out = [(bf16.name, bf16.setup, bf16.rtol, bf16.weight_bytes, bf16.nbytes),
           (fused.name, fused.setup, fused.rtol, fused.weight_bytes, fused.nbytes),
           ("aten._weight_int4pack_mm (bf16 x int4)", setup_int4pack, 5e-3,
            lambda s, g: gemm_bench.int4_bytes(s, g, 4),
            lambda s, mm, g: gemm_bench.int4_bytes(s, g, 4) + 2 * mm * s.k + 2 * mm * s.n)]
    if m >= ctx.int_mm_min_m:
        out.append((w8a8.name, w8a8.setup, w8a8.rtol, w8a8.weight_bytes, w8a8.nbytes))
    return out


def stage_gemm_table(ctx: Config, budget: Budget, result: dict) -> None:
    rows = result["rows"] = []
    result["l2_bytes"] = l2_bytes()
    result["timing_reason"] = None if ctx.device == "cuda" else NOT_TIMED_CPU
    g = ctx.gemm_group
    failures = 0
    for si, s in enumerate(ctx.gemm_shapes):
        for m in ctx.gemm_m:
            budget.check(f"{s.n}x{s.k} M={m}")
            p = gemm_bench.Problem(s, m, ctx.device, seed=1000 * si + m)
            bf16_us = None
            for name, setup, rtol, weight_bytes, nbytes in gemm_variants(ctx, m):
                budget.check(f"{s.n}x{s.k} M={m} {name}")
                grouped = "F.linear" not in name and "_int_mm" not in name
                row = {"N": s.n, "K": s.k, "M": m, "G": g if grouped else None, "variant": name, "ok": None, "err": None,
                       "rtol": rtol, "us": None, "spread_pct": None, "TFLOPs": None, "GBps": None, "vs_bf16": None,
                       "copies": None, "timing": None, "note": ""}
                rows.append(row)
                copies = copies_for(weight_bytes(s, g), ctx.device)
                try:
                    prepared = setup(p, g, copies)
                    with torch.no_grad():
                        out = prepared.fn(*prepared.arg_sets[0])
                except Exception as exc:
                    if "_weight_int4pack_mm" in name:  # a guarded baseline: n/a, not a failure
                        row["note"] = f"n/a: {error_text(exc)[:200]}"
                    else:
                        row |= {"ok": False, "note": f"FAILED to run: {error_text(exc)[:300]}"}
                        failures += 1
                    continue
                err = gemm_bench.rms_rel_error(out, prepared.ref)
                row |= {"ok": err <= rtol, "err": err, "note": prepared.note, "copies": len(prepared.arg_sets)}
                if not row["ok"]:
                    row["note"] = f"FAILED check: err {err:.2e} > rtol {rtol:.0e}; not timed"
                    if "_weight_int4pack_mm" in name:  # our packing for torch's op, not qatfx, is wrong
                        row["note"] += " (baseline: the packing here needs fixing; not counted as a stage failure)"
                    else:
                        failures += 1
                    continue
                if ctx.device != "cuda":
                    row["timing"] = "not timed (CPU)"
                    continue
                us, spread, how = time_cuda_graph(prepared.fn, prepared.arg_sets)
                flops = 2 * m * s.n * s.k
                row |= {"us": round(us, 2), "spread_pct": round(spread, 1), "TFLOPs": round(flops / us / 1e6, 2),
                        "GBps": round(nbytes(s, m, g) / us / 1e3, 0), "timing": how}
                if "F.linear" in name:
                    bf16_us = us
                if bf16_us:
                    row["vs_bf16"] = round(bf16_us / us, 3)
                del prepared
            del p
            print(f"  GEMM {s.n}x{s.k} M={m}: " + "; ".join(
                f"{r['variant']}: {fmt(r['us'])} us, err {fmt(r['err'], '.1e')} {r['note']}" for r in rows
                if (r["N"], r["K"], r["M"]) == (s.n, s.k, m)), file=sys.stderr, flush=True)
    if failures:
        raise CheckFailed(f"{failures} GEMM variant(s) failed their correctness check or did not run")


# ---- stage 5: decode end to end ---------------------------------------------------------------


def stage_decode_e2e(ctx: Config, budget: Budget, result: dict) -> None:
    if getattr(ctx, "decode", None) is None:
        raise Skip("stage compiled_decode did not produce a checked compiled model")
    if budget.left() < ctx.e2e_min_s:
        raise Skip(f"only {max(budget.left(), 0):.0f} s of the total budget left (needs {ctx.e2e_min_s} s)")
    d = ctx.decode
    result |= {"steps": ctx.steps, "warmup": ctx.warmup, "mode": ctx.mode or "default", "checks": [], "rows": []}
    budget.check("torch.compile of the bf16 model")
    bf16 = torch.compile(d.model, mode=ctx.mode)
    with torch.no_grad():
        ref, out = d.model(*d.state)[0], bf16(*d.state)[0]
    err = gemm_bench.rms_rel_error(out, ref)
    rtol = bench_decode.RTOL["bf16"]
    result["checks"].append({"model": "bf16", "rms_rel_err": err, "rtol": rtol, "ok": err <= rtol,
                             "what": "compiled vs eager, one step's logits (qatfx: see compiled_decode)"})
    result["sqnr_db"] = bench_decode.sqnr_db(d.qatfx_logits, out)  # int4 vs bf16 logits, information only
    if err > rtol:
        raise CheckFailed(f"bf16 compiled vs eager logits: RMS rel err {err:.2e} > {rtol:.0e}")
    paths = {"bf16": (d.model, bf16, "inductor"), "qatfx 8da4w": (d.converted, d.compiled, "qatfx")}
    if ctx.device != "cuda":
        for name, (eager, step, backend) in paths.items():  # every path runs, untimed
            budget.check(f"{name} decode steps")
            with torch.no_grad():
                bench_decode.decode(step, d.state, ctx.steps, cudagraphs=False)
            result["rows"].append({"model": name, "compile": f"{backend}, mode=default", "ms_per_token": None,
                                   "spread_pct": None, "tokens_per_s": None,
                                   "weights_MB": round(bench_decode.weight_bytes(eager) / 1e6, 3),
                                   "weight_GBps": None, "vs_bf16": None})
        result["timing_reason"] = NOT_TIMED_CPU
        return
    for name, (eager, step, backend) in paths.items():
        budget.check(f"timing {name}")
        sec, spread = bench_decode.time_decode(step, d.state, decode_args(ctx, ctx.steps, ctx.warmup))
        nbytes = bench_decode.weight_bytes(eager)
        result["rows"].append({"model": name, "compile": f"{backend}, mode={ctx.mode or 'default'}",
                               "ms_per_token": round(1e3 * sec, 3), "spread_pct": round(spread, 1),
                               "tokens_per_s": round(1 / sec, 1), "weights_MB": round(nbytes / 1e6, 1),
                               "weight_GBps": round(nbytes / sec / 1e9, 1), "sec": sec})
    for row in result["rows"]:
        row["vs_bf16"] = round(result["rows"][0]["sec"] / row.pop("sec"), 3)
    result["timing_reason"] = None


STAGES = (
    ("environment", stage_environment),
    ("correctness_sweep", stage_correctness_sweep),
    ("compiled_decode", stage_compiled_decode),
    ("gemm_table", stage_gemm_table),
    ("decode_e2e", stage_decode_e2e),
)


# ---- the report -------------------------------------------------------------------------------


def fmt(v, spec: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and spec:
        return format(v, spec)
    return str(v)


def markdown(report: dict) -> str:
    st = report["stages"]
    lines = gemm_bench.report_header(f"qatfx GPU check ({report['host']})", report["device"])
    if report["device"] != "cuda":
        lines.append("- no GPU number in this file: every timing field is n/a on CPU")
    lines += [f"- total {report['total_seconds']:.1f} s of a {report['total_budget_s']:.0f} s budget; exit code {report['exit_code']}", "",
              "## Stages", ""]
    lines.append(gemm_bench.format_table(
        [{"stage": n, "status": e["status"], "s": fmt(e["seconds"], ".1f"), "budget s": fmt(e["budget_s"]),
          "note": (e["reason"] or e["error"] or "").replace("|", "/").replace("\n", " ")[:200]} for n, e in st.items()],
        ["stage", "status", "s", "budget s", "note"]))

    env = st.get("environment", {}).get("result") or {}
    if env:
        lines += ["", "## Environment", ""]
        gpu = env.get("gpu") or {}
        smi = gpu.get("nvidia_smi") or {}
        items = [("torch", env.get("torch")), ("triton", env.get("triton")), ("CUDA runtime", env.get("cuda_runtime")),
                 ("driver", smi.get("driver_version")), ("GPU", gpu.get("name")), ("SMs", gpu.get("multi_processor_count")),
                 ("L2 bytes", gpu.get("L2_cache_size")), ("SM clock MHz (now / max)", f"{smi.get('clocks.sm')} / {smi.get('clocks.max.sm')}" if smi else None),
                 ("copy bandwidth GB/s (D2D, median of 5)", env.get("copy_bandwidth_GBps")),
                 ("bf16 matmul TFLOP/s (8192^3, median of 5)", env.get("bf16_matmul_TFLOPs")),
                 ("timing", env.get("timing_reason") or "measured")]
        lines.append(gemm_bench.format_table([{"field": k, "value": fmt(v)} for k, v in items], ["field", "value"]))

    sweep = st.get("correctness_sweep", {}).get("result") or {}
    if sweep.get("cases"):
        lines += ["", f"## Correctness sweep: {sweep.get('passed')} passed, {sweep.get('failed')} failed, {sweep.get('not_run')} not run", "",
                  "int err: max |kernel - exact integer product| (unit scales, fp32 out; must be 0); "
                  "epi err / bound: max over elements of |kernel - reference| / the test's bound (bf16 out; must be <= 1)", ""]
        lines.append(gemm_bench.format_table(
            [{"N x K": f"{c['N']}x{c['K']}", "M": c["M"], "G": c["G"], "path": c.get("path", ""), "status": c.get("status"),
              "int err": fmt(c.get("int_max_abs_err")), "epi err": fmt(c.get("epi_max_abs_err"), ".2e"),
              "epi err / bound": fmt(c.get("epi_max_err_over_bound"), ".3f"), "error": (c.get("error") or "")[:120]}
             for c in sweep["cases"]],
            ["N x K", "M", "G", "path", "status", "int err", "epi err", "epi err / bound", "error"]))

    dec = st.get("compiled_decode", {}).get("result") or {}
    if dec:
        check = dec.get("check") or {}
        lines += ["", "## Compiled decode model (backend=\"qatfx\")", "",
                  f"- {dec.get('model')}, {dec.get('params_M')}M params, G {dec.get('group_size')}, mode {dec.get('mode')}",
                  f"- prepare + convert {fmt(dec.get('prepare_convert_s'))} s; compile + first step {fmt(dec.get('compile_first_step_s'))} s",
                  f"- rewrites (counters['qatfx']): {dec.get('counters')}; w4a8_linear rewrites {dec.get('w4a8_linear_rewrites')} "
                  f"for {dec.get('linear_layers')} nn.Linear layers",
                  f"- compiled vs eager logits: RMS rel err {fmt(check.get('rms_rel_err'), '.2e')} (rtol {check.get('rtol')})",
                  f"- step: {fmt(dec.get('step_ms'))} ms" + (f" ({dec['timing_reason']})" if dec.get("timing_reason") else "")]

    gemm = st.get("gemm_table", {}).get("result") or {}
    if gemm.get("rows"):
        lines += ["", "## GEMM: y = x @ W^T, bf16 out", ""]
        if gemm.get("timing_reason"):
            lines += [f"- times: {gemm['timing_reason']}", ""]
        lines.append(gemm_bench.format_table(
            [{"N x K": f"{r['N']}x{r['K']}", "M": r["M"], "G": fmt(r["G"]), "variant": r["variant"], "µs": fmt(r["us"]),
              "±%": fmt(r["spread_pct"]), "TFLOP/s": fmt(r["TFLOPs"]), "GB/s": fmt(r["GBps"]), "vs bf16": fmt(r["vs_bf16"]),
              "err": fmt(r["err"], ".1e"), "copies": fmt(r["copies"]), "note": r["note"]} for r in gemm["rows"]],
            ["N x K", "M", "G", "variant", "µs", "±%", "TFLOP/s", "GB/s", "vs bf16", "err", "copies", "note"]))

    e2e = st.get("decode_e2e", {})
    if e2e.get("result", {}).get("rows"):
        r = e2e["result"]
        steps = (f"{r['steps']} greedy steps per model, untimed" if r.get("timing_reason")
                 else f"{r['steps']} timed steps x 2 after {r['warmup']} warm-up")
        lines += ["", "## Decode end to end", "",
                  f"- {steps}; int4 vs bf16 logits SQNR {fmt(r.get('sqnr_db'), '.1f')} dB (information only)"]
        if r.get("timing_reason"):
            lines.append(f"- times: {r['timing_reason']}")
        lines += ["", gemm_bench.format_table(
            [{k: fmt(v) for k, v in row.items()} for row in r["rows"]],
            ["model", "compile", "ms_per_token", "spread_pct", "tokens_per_s", "weights_MB", "weight_GBps", "vs_bf16"])]
    elif e2e:
        lines += ["", "## Decode end to end", "", f"- {e2e['status']}: {e2e.get('reason') or e2e.get('error')}"]
    return "\n".join(lines) + "\n"


def exit_code(stages: dict) -> int:
    statuses = {e["status"] for e in stages.values()}
    return 1 if "failed" in statuses else 2 if "timeout" in statuses else 0


def write_outputs(report: dict, json_path: Path, md_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md_path.write_text(markdown(report))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=DEVICE, help="default: cuda if available")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (the default on --device cpu)")
    ap.add_argument("--out", type=Path, default=gemm_bench.RESULTS, help="output directory (default benchmarks/results)")
    ap.add_argument("--budget", type=float, help="total seconds for all stages (default 390 on GPU, 120 smoke)")
    args = ap.parse_args(argv)
    if args.device != DEVICE:  # only possible if the pre-parse and this one disagree
        ap.error("internal: --device parsed twice differently")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available; use --smoke (or --device cpu)")
    args.smoke = SMOKE
    return args


def main(argv: Optional[list[str]] = None) -> int:
    start = T_START
    args = parse_args(argv)
    ctx = make_config(args.device, args.smoke, args.budget)
    ctx.device = args.device
    ctx.mode = "reduce-overhead" if args.device == "cuda" else None
    ctx.decode = None
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "unknown"
    stem = f"gpu_check_{host}" + ("_smoke" if args.smoke else "")
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
    deadline = start + ctx.total_budget
    report = {
        "schema": SCHEMA, "host": socket.gethostname(), "device": args.device, "smoke": args.smoke,
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else argv)),
        "git": gemm_bench.git_sha(),
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": 0.0, "total_budget_s": ctx.total_budget, "exit_code": None,
        "stages": {name: {"status": "not run", "seconds": None, "budget_s": None, "reason": None, "error": None,
                          "traceback": None, "result": {}} for name, _ in STAGES},
    }
    torch.manual_seed(0)
    for name, fn in STAGES:
        budget_s = min(ctx.budgets.get(name, math.inf), max(0.0, deadline - time.monotonic()))
        report["stages"][name] = run_stage(name, fn, ctx, budget_s, deadline)
        report["total_seconds"] = round(time.monotonic() - start, 1)
        report["exit_code"] = exit_code(report["stages"])
        write_outputs(report, json_path, md_path)
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
