"""W4A8 GEMM benchmark: y = x @ Wᵀ on Llama-3 linear shapes, qatfx's fused int8 x int4 Triton
kernel against bf16 cuBLAS, torch._int_mm W8A8, torchao int4 weight-only and qatfx's unfused
path, all in one run (protocol: benchmarks/README.md).

    python benchmarks/bench_w4a8_gemm.py                        # H100: full sweep
    python benchmarks/bench_w4a8_gemm.py --quick                # two shapes, 4 Ms, G=128
    python benchmarks/bench_w4a8_gemm.py --device cpu --quick   # smoke run, tiny shapes

Every variant is first checked against a float64 reference on fresh random inputs (the
RMS error relative to the reference's RMS must be under the variant's `rtol`), then timed:
`triton.testing.do_bench` medians on CUDA, rotating over enough weight copies to exceed the
50 MB L2 twice; `time.perf_counter` medians on CPU, where the Triton kernel runs in the
interpreter and times mean nothing. Each time is taken twice and the spread reported.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def pick_device(argv: Optional[list[str]] = None) -> str:
    """The --device flag (default cuda if available). On CPU this switches the Triton
    interpreter on; it must happen before qatfx's Triton kernels are imported."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", choices=("cuda", "cpu"))
    device = pre.parse_known_args(argv)[0].device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    return device


DEVICE = pick_device()

import triton  # noqa: E402  (after TRITON_INTERPRET is set)
import triton.testing  # noqa: E402

from qatfx import reference  # noqa: E402
from qatfx.spec import ROW  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EPS = torch.finfo(torch.float32).eps
BF16 = torch.bfloat16

# H100 SXM limits: ~3.0 TB/s measured copy bandwidth (3.35 spec), dense tensor-core peaks.
HBM_BYTES_PER_S = 3.0e12
PEAK_OPS_PER_S = {"bf16": 989e12, "int8": 1979e12}
L2_BYTES = 50e6

# One compile per (shape, M, G) of each compiled variant, with static shapes as a decode
# step under CUDA graphs would have; Dynamo's default limit of 8 would fall back to eager.
torch._dynamo.config.recompile_limit = 4096
torch._dynamo.config.accumulated_recompile_limit = 65536


@dataclass(frozen=True)
class Shape:
    n: int
    k: int
    source: str


# Llama-3-8B: hidden 4096, 32 query / 8 kv heads of 128, ffn 14336 (its config.json);
# Llama-3-70B: hidden 8192, ffn 28672.
LLAMA_SHAPES = (
    Shape(4096, 4096, "Llama-3-8B q_proj / o_proj"),
    Shape(1024, 4096, "Llama-3-8B k_proj / v_proj"),
    Shape(14336, 4096, "Llama-3-8B gate_proj / up_proj"),
    Shape(4096, 14336, "Llama-3-8B down_proj"),
    Shape(28672, 8192, "Llama-3-70B gate_proj / up_proj"),
)
M_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
GROUPS = (32, 128, 256)
CPU_SHAPES = (Shape(256, 256, "tiny (CPU smoke)"), Shape(128, 256, "tiny (CPU smoke)"))
CPU_M, CPU_GROUPS = (1, 17), (32,)


# ---- the computations under test ------------------------------------------------------------


def quantize_activation(x):
    """int8 per-token asymmetric dynamic quantization, as the converted model computes it."""
    scale, zero = reference.choose_qparams(x, -128, 127, ROW, False, EPS, torch.float32)
    return reference.quantize(x, scale, zero, -128, 127, ROW), scale, zero


def unfused_linear(x_q, x_scale, x_zero, w_packed, w_scales, group_size: int):
    """qatfx's unfused converted path: dequantize both operands to bf16, then F.linear."""
    x = reference.dequantize(x_q, x_scale, x_zero, ROW, BF16)
    w = reference.dequantize(reference.unpack_int4(w_packed, group_size), w_scales, None, group_size, BF16)
    return F.linear(x, w)


def unfused_linear_from_float(x, w_packed, w_scales, group_size: int):
    return unfused_linear(*quantize_activation(x), w_packed, w_scales, group_size)


def w8a8_linear(x_q, x_scale, w_q_t, w_scale, m: int):
    """int8 x int8 -> int32 with cuBLAS, then the per-token x per-channel scale epilogue."""
    return (torch._int_mm(x_q, w_q_t)[:m].float() * x_scale * w_scale).to(BF16)


# emulate_precision_casts: choose_qparams computes a bf16 x's scale in bf16; without it
# Inductor keeps those intermediates in fp32, the scale moves by a bf16 ulp and the int8
# values differ from the eager reference (and from what QAT trained with) by up to 2.
EXACT_QUANT = {"emulate_precision_casts": True}
compiled_quantize_activation = torch.compile(quantize_activation, dynamic=False, options=EXACT_QUANT)
compiled_unfused = torch.compile(unfused_linear, dynamic=False)
compiled_unfused_from_float = torch.compile(unfused_linear_from_float, dynamic=False, options=EXACT_QUANT)
compiled_w8a8 = torch.compile(w8a8_linear, dynamic=False)


# ---- problems: inputs, quantized weights and float64 references -----------------------------


class Problem:
    """Fresh random (never zero) inputs for one (shape, M) and what every variant needs."""

    def __init__(self, shape: Shape, m: int, device: str, seed: int) -> None:
        self.shape, self.m, self.device = shape, m, device
        gen = torch.Generator(device=device).manual_seed(seed)

        def randn(*size, std=1.0):
            t = torch.randn(*size, device=device, generator=gen) * std
            return torch.where(t == 0, std, t).to(BF16)

        self.x = randn(m, shape.k)
        self.w = randn(shape.n, shape.k, std=0.02)
        self.act = quantize_activation(self.x)  # (x_q, x_scale, x_zero) for the "excl." variants
        self._int4: dict[int, tuple] = {}

    def int4(self, g: int) -> tuple[torch.Tensor, ...]:
        """(w_q int8, w_packed, w_scales, w_group_sums) as convert computes them."""
        if g not in self._int4:
            scale, _ = reference.choose_qparams(self.w, -8, 7, g, True, EPS, torch.float32)
            q = reference.quantize(self.w, scale, None, -8, 7, g)
            sums = q.view(self.shape.n, -1, g).sum(-1, dtype=torch.int32)
            self._int4[g] = (q, reference.pack_int4(q, g), scale, sums)
        return self._int4[g]

    def float_ref(self) -> torch.Tensor:
        return self.x.double() @ self.w.double().T

    def w4a8_ref(self, g: int) -> torch.Tensor:
        x_q, x_scale, x_zero = self.act
        q, _, scale, _ = self.int4(g)
        w = (q.double().view(self.shape.n, -1, g) * scale.double()[..., None]).view_as(q)
        return ((x_q.double() - x_zero.double()) * x_scale.double()) @ w.T


@dataclass
class Prepared:
    """A variant ready to run: fn(*args) for args in arg_sets (one per rotated weight copy)."""
    fn: Callable
    arg_sets: list[tuple]
    ref: torch.Tensor
    note: str = ""


def copies_for(weight_bytes: float, device: str) -> int:
    """Weight copies to rotate over so consecutive calls never find their weights in L2."""
    return 1 if device == "cpu" else min(64, max(2, math.ceil(2 * L2_BYTES / weight_bytes)))


def rotate(act: tuple, weights: tuple, n: int) -> list[tuple]:
    return [act + (weights if i == 0 else tuple(w.clone() for w in weights)) for i in range(n)]


# ---- variants ---------------------------------------------------------------------------------
# Each setup(problem, G, copies) returns the callable, `copies` argument sets and the float64
# reference. rtol bounds the RMS error relative to the reference's RMS: bf16 output rounding
# alone is ~1e-3; the unfused path also rounds both dequantized operands to bf16 (~2e-3
# more); torchao's int4 is checked against the float product, since its tile-packed layout
# has no dequantize: its asymmetric int4 weights add ~0.1 of noise on Gaussian weights.
# The fused kernel measures 3.5e-3 on CPU because Triton's interpreter truncates fp32 ->
# bf16 casts (GPUs round to nearest: expect ~1.7e-3, as bf16 F.linear).


def setup_bf16(p: Problem, g, copies):
    return Prepared(F.linear, rotate((p.x,), (p.w,), copies), p.float_ref())


def setup_w8a8(p: Problem, g, copies):
    """int8 per-token symmetric x, int8 per-channel symmetric W, fp32 scale epilogue."""
    x_scale, _ = reference.choose_qparams(p.x, -128, 127, ROW, True, EPS, torch.float32)
    x_q = reference.quantize(p.x, x_scale, None, -128, 127, ROW)
    w_scale, _ = reference.choose_qparams(p.w, -128, 127, ROW, True, EPS, torch.float32)
    w_q = reference.quantize(p.w, w_scale, None, -128, 127, ROW)
    ref = (x_q.double() * x_scale.double()) @ (w_q.double() * w_scale.double()).T
    note = ""
    if p.device == "cuda" and p.m <= 16:  # CUDA _int_mm needs M > 16: pad with zero rows
        x_q = torch.cat([x_q, x_q.new_zeros(32 - p.m, p.shape.k)])
        note = "x padded to 32 rows (CUDA _int_mm needs M > 16)"
    arg_sets = [a + (p.m,) for a in rotate((x_q, x_scale), (w_q.t(), w_scale.view(1, -1)), copies)]
    return Prepared(compiled_w8a8, arg_sets, ref, note)


def setup_torchao(p: Problem, g, copies):
    """torchao int4 weight-only (tinygemm `_weight_int4pack_mm`) on a bf16 nn.Linear, eager."""
    if importlib.util.find_spec("torchao") is None:
        raise RuntimeError("torchao is not installed")
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    # set_inductor_config=False: torchao would otherwise change Inductor's global config
    config = Int4WeightOnlyConfig(group_size=g, int4_packing_format="tile_packed_to_4d", set_inductor_config=False)
    arg_sets = []
    for _ in range(copies):
        linear = torch.nn.Linear(p.shape.k, p.shape.n, bias=False, device=p.device, dtype=BF16)
        linear.weight.data.copy_(p.w)
        quantize_(linear, config)
        arg_sets.append((p.x, linear.weight))
    return Prepared(F.linear, arg_sets, p.float_ref(), "tinygemm")


def setup_unfused(include_quant: bool):
    def setup(p: Problem, g, copies):
        _, packed, scale, _ = p.int4(g)
        act, fn = ((p.x,), compiled_unfused_from_float) if include_quant else (p.act, compiled_unfused)
        return Prepared(fn, [a + (g,) for a in rotate(act, (packed, scale), copies)], p.w4a8_ref(g), "torch.compile")

    return setup


def setup_fused(include_quant: bool):
    def setup(p: Problem, g, copies):
        from qatfx.lowering.kernels.w4a8_gemm import w4a8_gemm

        def fused(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums):
            return w4a8_gemm(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums, None, None, group_size=g, activation="none", out_dtype=BF16)

        def quantize_then_fused(x, *weights):
            return fused(*compiled_quantize_activation(x), *weights)

        _, packed, scale, sums = p.int4(g)
        act, fn = ((p.x,), quantize_then_fused) if include_quant else (p.act, fused)
        return Prepared(fn, rotate(act, (packed, scale, sums), copies), p.w4a8_ref(g), "compiled quant + Triton" if include_quant else "Triton")

    return setup


def int4_bytes(s: Shape, g: int, per_group: int) -> float:
    """Packed int4 weights plus `per_group` bytes of scales (and group sums) per group."""
    return s.n * s.k / 2 + per_group * s.n * s.k / g


@dataclass(frozen=True)
class Variant:
    name: str
    setup: Callable[[Problem, Optional[int], int], Prepared]
    compute: str  # the tensor-core peak that bounds it: "bf16" or "int8"
    rtol: float
    weight_bytes: Callable[[Shape, Optional[int]], float]  # one copy: weights, scales, group sums
    x_bytes: tuple[int, int]  # activation bytes per element, and per row (fp32 scale / zero)
    grouped: bool = True
    optional: bool = False  # a baseline that may not run here: reported as n/a, not a failure

    def nbytes(self, s: Shape, m: int, g: Optional[int]) -> float:
        """Minimal bytes moved: weights + scales + group sums + activations + bf16 output."""
        return self.weight_bytes(s, g) + m * (s.k * self.x_bytes[0] + self.x_bytes[1]) + 2 * m * s.n


BF16_X, INT8_ASYM_X, INT8_SYM_X = (2, 0), (1, 8), (1, 4)
VARIANTS = (
    Variant("bf16 F.linear", setup_bf16, "bf16", 5e-3, lambda s, g: 2 * s.n * s.k, BF16_X, grouped=False),
    Variant("w8a8 _int_mm (excl. act quant)", setup_w8a8, "int8", 5e-3, lambda s, g: s.n * s.k + 4 * s.n, INT8_SYM_X, grouped=False),
    # torchao: bf16 scale and zero per group, 4 bytes as our fp32 scale
    Variant("torchao int4 weight-only", setup_torchao, "bf16", 0.15, lambda s, g: int4_bytes(s, g, 4), BF16_X, optional=True),
    Variant("qatfx unfused (excl. act quant)", setup_unfused(False), "bf16", 1e-2, lambda s, g: int4_bytes(s, g, 4), INT8_ASYM_X),
    Variant("qatfx unfused (incl. act quant)", setup_unfused(True), "bf16", 1e-2, lambda s, g: int4_bytes(s, g, 4), BF16_X),
    # fused: fp32 scale + int32 group sum per group
    Variant("qatfx fused (excl. act quant)", setup_fused(False), "int8", 5e-3, lambda s, g: int4_bytes(s, g, 8), INT8_ASYM_X),
    Variant("qatfx fused (incl. act quant)", setup_fused(True), "int8", 5e-3, lambda s, g: int4_bytes(s, g, 8), BF16_X),
)


@dataclass(frozen=True)
class Experiment:
    shape: Shape
    m: int
    group_size: Optional[int]
    variant: Variant


def rms_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS of the error relative to the RMS of the reference."""
    ref = ref.double()
    return float((out.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def time_us(fn: Callable, arg_sets: list[tuple], device: str) -> tuple[float, float]:
    """Mean of two median times in µs, and their spread in % of that mean."""
    cycle = itertools.cycle(arg_sets)

    def call():
        return fn(*next(cycle))

    if device == "cuda":
        runs = [1e3 * triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median") for _ in range(2)]
    else:  # the correctness check ran (and compiled) it once already; the interpreter is slow

        def seconds():
            t0 = time.perf_counter()
            call()
            return time.perf_counter() - t0

        runs = [1e6 * statistics.median(seconds() for _ in range(3)) for _ in range(2)]
    mean = sum(runs) / 2
    return mean, 100 * abs(runs[0] - runs[1]) / mean


def run_experiment(e: Experiment, p: Problem, bf16_us: Optional[float], device: str) -> dict:
    s, m, g, v = e.shape, e.m, e.group_size, e.variant
    row = {"N x K": f"{s.n}x{s.k}", "M": m, "G": g or "-", "variant": v.name}
    try:
        prepared = v.setup(p, g, copies_for(v.weight_bytes(s, g), device))
        with torch.no_grad():
            out = prepared.fn(*prepared.arg_sets[0])
    except Exception as exc:  # reported in the table; the sweep goes on
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}"
        return row | ({"note": f"n/a: {reason}"} if v.optional else {"ok": False, "note": f"FAILED to run: {reason}"})
    err = rms_rel_error(out, prepared.ref)
    row |= {"err": f"{err:.1e}", "ok": err <= v.rtol, "note": prepared.note}
    if not row["ok"]:
        row["note"] = f"FAILED check: err {err:.2e} > rtol {v.rtol:.0e}; not timed"
        return row
    with torch.no_grad():
        us, spread = time_us(prepared.fn, prepared.arg_sets, device)
    flops, nbytes = 2 * m * s.n * s.k, v.nbytes(s, m, g)
    row |= {"µs": f"{us:.1f}", "±%": f"{spread:.1f}", "TFLOP/s": f"{flops / us / 1e6:.2f}", "GB/s": f"{nbytes / us / 1e3:.0f}", "us_raw": us}
    if device == "cuda":
        t_mem, t_compute = nbytes / HBM_BYTES_PER_S, flops / PEAK_OPS_PER_S[v.compute]
        row |= {"% roof": f"{100 * max(t_mem, t_compute) / (us * 1e-6):.0f}", "bound": "mem" if t_mem >= t_compute else "compute"}
    if bf16_us is not None:
        row["vs bf16"] = f"{bf16_us / us:.2f}x"
    return row


# ---- reporting (bench_decode.py uses these too) ----------------------------------------------


def git_sha() -> str:
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=Path(__file__).parent, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report_header(title: str, device: str) -> list[str]:
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    lines = [
        f"# {title}",
        "",
        f"- device: {name}",
        f"- torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}",
        f"- git {git_sha()}, {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: {' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}",
    ]
    if device == "cpu":
        lines.append("- CPU smoke run: times are NOT meaningful (Triton kernels run in the interpreter, "
                     "TRITON_INTERPRET=1); it checks that every path runs and is correct.")
    return lines


def format_table(rows: list[dict], headers: list[str]) -> str:
    """A GitHub markdown table: tabulate's when it is installed, else a plain one."""
    cells = [[str(r.get(h, "")) for h in headers] for r in rows]
    if importlib.util.find_spec("tabulate") is not None:
        from tabulate import tabulate

        return tabulate(cells, headers, tablefmt="github", disable_numparse=True)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(c) for c in cells])


def write_report(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"\nwrote {path}")


# ---- driver ---------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=DEVICE, help="default: cuda if available")
    ap.add_argument("--shapes", help="comma-separated NxK, e.g. 4096x4096,14336x4096 (default: Llama-3 shapes)")
    ap.add_argument("--m", help="comma-separated M values")
    ap.add_argument("--groups", help="comma-separated group sizes")
    ap.add_argument("--quick", action="store_true", help="a small subset of shapes, M and G")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/w4a8_gemm_<device>.md")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available; use --device cpu")
    cpu = args.device == "cpu"
    shapes = CPU_SHAPES if cpu else LLAMA_SHAPES
    ms, groups = (CPU_M, CPU_GROUPS) if cpu else (M_SWEEP, GROUPS)
    if args.quick:
        shapes, ms, groups = (shapes[:1], ms, groups) if cpu else ((shapes[0], shapes[2]), (1, 16, 256, 4096), (128,))
    if args.shapes:
        shapes = tuple(Shape(*map(int, s.lower().split("x")), "--shapes") for s in args.shapes.split(","))
    args.shapes = shapes
    args.m = tuple(int(v) for v in args.m.split(",")) if args.m else ms
    args.groups = tuple(int(v) for v in args.groups.split(",")) if args.groups else groups
    args.out = args.out or RESULTS / f"w4a8_gemm_{args.device}.md"
    return args


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    headers = ["N x K", "M", "G", "variant", "µs", "±%", "TFLOP/s", "GB/s", "% roof", "bound", "vs bf16", "err", "note"]
    rows: list[dict] = []
    for si, shape in enumerate(args.shapes):
        for m in args.m:
            p = Problem(shape, m, args.device, seed=1000 * si + m)
            bf16_us = None
            experiments = [Experiment(shape, m, None, v) for v in VARIANTS if not v.grouped] + [
                Experiment(shape, m, g, v) for g in args.groups if shape.k % g == 0 for v in VARIANTS if v.grouped]
            for e in experiments:
                row = run_experiment(e, p, bf16_us, args.device)
                if e.variant is VARIANTS[0]:
                    bf16_us = row.get("us_raw")
                    row["vs bf16"] = "1.00x" if bf16_us else ""
                rows.append(row)
                print(f"  {row['N x K']} M={m} G={row['G']} {e.variant.name}: {row.get('µs', '-')} µs {row.get('note', '')}", file=sys.stderr, flush=True)
            del p
    table = format_table(rows, headers)
    lines = report_header("W4A8 GEMM: y = x @ Wᵀ, bf16 output", args.device) + [
        f"- shapes: {', '.join(f'{s.n}x{s.k} ({s.source})' for s in args.shapes)}",
        "- µs: mean of two medians, ±%: their spread; GB/s: minimal bytes (weights + scales + group sums + "
        "activations + output) / time; % roof: H100 roofline (3.0 TB/s, 989 bf16 / 1979 int8 TOP/s) / time; "
        "err: RMS error / RMS of the float64 reference (rtol: 5e-3 kernels, 1e-2 unfused bf16, 0.15 torchao "
        "int4 vs the float product)",
        "",
        table,
    ]
    print("\n".join(lines))
    write_report(args.out, lines)
    failed = [r for r in rows if r.get("ok") is False]
    if failed:
        print(f"{len(failed)} correctness check(s) FAILED", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
