"""Static check of the w4a8 GEMM kernel without a GPU: registers, spills, shared memory and the
main loop's instruction mix, read from the real compiler's output for sm_80 and sm_90.

    .venv/bin/python benchmarks/kernel_static.py            # every autotune config, G 32 and 128
    .venv/bin/python benchmarks/kernel_static.py --quick    # first config per (path, arch, G)
    .venv/bin/python benchmarks/kernel_static.py --json out.json

Each autotune config of `_w4a8_gemm_kernel` (the decode and prefill autotuners of
qatfx/lowering/kernels/w4a8_gemm.py) is compiled with `triton.compile` for a GPUTarget, using
the argument specialization Triton's JIT would derive for a 4096x4096 layer (fp32 scales,
int16 group sums, bf16 output; decode splits K over programs as `launch_plan` does). ptxas's `-v` log
gives registers and spills, `cuobjdump` the resource usage and the SASS. Nothing here runs a
kernel: these are compiler facts, not timings.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Optional
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from qatfx.lowering.kernels import w4a8_gemm as w4a8

ARCHS = (80, 90)
GROUP_SIZES = (32, 128)  # 32 takes the JOIN_HALVES path, 128 the two-dot path
LAYER_N = LAYER_K = 4096  # Llama-3-8B q/o projection
PATHS = {"decode": (w4a8._small_m_gemm, 1), "prefill": (w4a8._large_m_gemm, 4096)}  # autotuner, M
H200_SMS = 132  # /work/shared/design/benchmarks.md; only sizes the split-K plan

# SASS opcode (the part before the first dot) -> class. Uniform-datapath ops (U*) execute
# once per warp on a separate scalar pipe, so they go to "other", not to the vector integer
# pipe; conversions get their own class because their pipe differs between architectures.
MMA_OPS = {"IMMA", "HMMA", "DMMA", "BMMA", "IGMMA", "HGMMA", "QGMMA", "BGMMA"}
INT_OPS = {"IMAD", "IADD3", "IADD", "IABS", "IMNMX", "VIMNMX", "VIADD", "VIADDMNMX", "ISETP",
           "LEA", "LOP3", "LOP", "SHF", "SHL", "SHR", "PRMT", "SGXT", "BMSK", "BREV", "FLO",
           "POPC", "SEL", "IDP", "IMUL", "ISCADD", "BFE", "BFI", "I2I", "I2IP", "PLOP3"}
FP_OPS = {"FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FCHK", "FSWZADD", "MUFU",
          "HFMA2", "HADD2", "HMUL2", "HMNMX2", "HSETP2", "FRND"}
CVT_OPS = {"I2F", "I2FP", "F2I", "F2F", "F2FP", "F2IP"}
MEM_OPS = {"LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "LDC", "ULDC", "LDL", "STL",
           "LD", "ST", "ATOM", "ATOMS", "ATOMG", "RED", "UTMALDG", "UTMASTG", "UBLKCP"}
CLASSES = ("int", "fp", "cvt", "mma", "mem", "other")

# Warp-instructions per clock per SM each class can issue: the CUDA C++ Programming Guide's
# arithmetic throughput table (results per clock per SM, divided by 32 lanes): 32-bit integer
# add / multiply-add / shift / logical / compare 64 on cc 8.0 and 9.0; fp32 add / multiply /
# FMA 64 on cc 8.0, 128 on 9.0; conversions 16. Loads and stores: 32 LD/ST units per SM
# (4 partitions x 8, A100 and H100 whitepapers). Issue: 4 schedulers, one warp-instruction
# each per clock. IMAD counts as integer although ptxas may route it to the FMA pipe: the
# conservative reading. MMA is left out: at decode the tensor pipe is far from the limit.
PIPE_RATES = {80: {"int": 2.0, "fp": 2.0, "cvt": 0.5, "mem": 1.0},
              90: {"int": 2.0, "fp": 4.0, "cvt": 0.5, "mem": 1.0}}
ISSUE_RATE = 4.0
# HBM bytes per clock per SM a decode loop must beat to be memory bound (spec bandwidth /
# (SMs x boost clock), /work/shared/design/benchmarks.md): H200 4.8 TB/s / (132 x 1.98 GHz),
# H100 SXM 3.35 TB/s / (132 x 1.98 GHz), A100 80GB SXM 2.04 TB/s / (108 x 1.41 GHz).
HBM_BYTES_PER_CLOCK = {"H200": 4.8e12 / (132 * 1.98e9), "H100": 3.35e12 / (132 * 1.98e9),
                       "A100": 2.04e12 / (108 * 1.41e9)}


def predicted_ceiling(arch: int, per_byte: dict, total_per_byte: float) -> tuple[float, str]:
    """(packed weight bytes per clock per SM the main loop can issue, the limiting class): a
    static prediction from instruction counts and issue rates, not a measurement."""
    limits = {c: rate / per_byte[c] for c, rate in PIPE_RATES[arch].items() if per_byte[c] > 0}
    limits["issue"] = ISSUE_RATE / total_per_byte
    limit = min(limits, key=limits.get)
    return limits[limit], limit


# IMMA.<m><n><k> spellings -> (m, n, k); the digits run together in the mnemonic.
_IMMA_SHAPES = {"16832": (16, 8, 32), "16816": (16, 8, 16), "8832": (8, 8, 32), "8816": (8, 8, 16)}
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


def op_class(mnemonic: str) -> str:
    base = mnemonic.split(".")[0]
    for name, ops in (("mma", MMA_OPS), ("int", INT_OPS), ("fp", FP_OPS), ("cvt", CVT_OPS),
                      ("mem", MEM_OPS)):
        if base in ops:
            return name
    return "other"


def macs_per_warp_instruction(mnemonic: str) -> int:
    """Multiply-adds one warp's MMA instruction performs (a wgmma is shared by 4 warps)."""
    if m := re.match(r"[A-Z]GMMA\.(\d+)x(\d+)x(\d+)", mnemonic):
        a, b, c = map(int, m.groups())
        return a * b * c // 4
    if m := re.match(r"[A-Z]MMA\.(\d+)", mnemonic):
        a, b, c = _IMMA_SHAPES[m.group(1)]
        return a * b * c
    raise ValueError(f"unknown MMA shape in {mnemonic}")


# ---- tools ----------------------------------------------------------------------------------


def tool_paths() -> dict[str, str]:
    """ptxas per arch and cuobjdump from the Triton install; RuntimeError if one is missing."""
    return {"ptxas_sm80": get_ptxas(80).path, "ptxas_sm90": get_ptxas(90).path,
            "cuobjdump": triton.knobs.nvidia.cuobjdump.path}


def missing_tools() -> Optional[str]:
    """None when every tool is there, else why not (tests skip on this)."""
    try:
        tool_paths()
    except RuntimeError as e:
        return str(e)
    return None


def cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool_paths()["cuobjdump"], *flags, f.name], check=True,
                              capture_output=True, text=True).stdout


# ---- compiling one config -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    path: str  # "decode" or "prefill"
    arch: int
    group_size: int
    config: triton.Config

    @property
    def label(self) -> str:
        k = self.config.kwargs
        return f"{k['BLOCK_M']}x{k['BLOCK_N']} w{self.config.num_warps} s{self.config.num_stages}"


def cases(quick: bool) -> list[Case]:
    out = []
    for path, (autotuner, _) in PATHS.items():
        configs = autotuner.configs[:1] if quick else autotuner.configs
        for arch in ARCHS:
            for g in GROUP_SIZES:
                out += [Case(path, arch, g, c) for c in configs]
    return out


def launch_arguments(case: Case) -> tuple[tuple, dict]:
    """The positional and keyword arguments `w4a8_gemm` passes to the kernel for this case.
    Tensors are tiny stand-ins: only their dtype and 16-byte alignment reach the compiler."""
    m, n, k, g = PATHS[case.path][1], LAYER_N, LAYER_K, case.group_size
    # The launcher's own split-K plan, with the H200's SM count in place of a live device.
    with mock.patch.object(w4a8, "_target_programs", lambda device: 2 * H200_SMS):
        plan = w4a8.launch_plan(m, n, k, g, torch.device("cuda"))
    t = lambda dtype: torch.empty(16, dtype=dtype)  # noqa: E731
    split = plan.split_k > 1
    workspace, counters = (t(torch.float32), t(torch.int32)) if split else (None, None)
    # Scales and sums in convert's (N, K // G) layout: strides (K // G, 1).
    args = (t(torch.int8), t(torch.float32), t(torch.float32), t(torch.int32), t(torch.float32),
            t(torch.int16), None, None, t(torch.bfloat16), workspace, counters,
            m, n, k, triton.next_power_of_2(m), plan.groups_per_split,
            k, k // 8, k // g, 1, 0, n)
    half = g // 2
    kwargs = dict(GROUP_SIZE=g, CHUNK_BYTES=min(half, w4a8._MAX_CHUNK_BYTES),
                  JOIN_HALVES=half < w4a8._MIN_INT8_DOT_K, SPLIT_K=plan.split_k,
                  HAS_BIAS=False, ACTIVATION=0, HAS_RESIDUAL=False, **case.config.all_kwargs())
    return args, kwargs


def compile_case(case: Case):
    """(CompiledKernel, ptxas -v log) for one case, specialized as the JIT would specialize a
    real launch (pointer alignment and divisibility-by-16 of integer arguments matter for
    vectorized loads). Uses Triton's binder and _pack_args, internal APIs of triton 3.9."""
    target = GPUTarget("cuda", case.arch, 32)
    backend = make_backend(target)
    kernel = w4a8._w4a8_gemm_kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args, kwargs = launch_arguments(case)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    log = io.StringIO()
    # always_compile: a cache hit would skip ptxas and leave no log. Triton prints the log
    # (dump_ptxas_log) from the same ptxas invocation that built the cubin.
    with mock.patch.object(triton.knobs.nvidia, "dump_ptxas_log", True), \
            mock.patch.object(triton.knobs.compilation, "always_compile", True), \
            contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=target, options=options.__dict__)
    return compiled, log.getvalue()


# ---- reading the output ---------------------------------------------------------------------


def parse_ptxas_log(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not (regs and frame):
        raise ValueError(f"unexpected ptxas log:\n{log}")
    return {"registers": int(regs.group(1)), "stack": int(frame.group(1)),
            "spill_stores": int(frame.group(2)), "spill_loads": int(frame.group(3))}


def parse_resource_usage(text: str) -> dict:
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"cuobjdump_" + k.lower(): int(v) for k, v in fields.items()}


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """(address, mnemonic, operands) per instruction of `cuobjdump -sass`."""
    return [(int(a, 16), op, rest.strip()) for a, op, rest in _SASS_LINE.findall(text)]


def main_loop(instrs: list[tuple[int, str, str]]) -> tuple[list, int]:
    """The innermost loop body and how many innermost loops there are.

    A loop shows up in SASS as a branch to a lower address (the backward branch of the loop
    latch, `@P BRA <head>`); its body is [head, branch]. The innermost loops are those whose
    range contains no other loop's range. If several exist, the one holding the most MMA
    instructions (then the longest) is the GEMM's main loop. `BRA <own address>` after EXIT
    is the end-of-code trap, not a loop."""
    loops = []
    for addr, op, rest in instrs:
        target = re.match(r"`?\(?(0x[0-9a-f]+)", rest.split()[-1] if rest else "")
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    innermost = [(a, b) for a, b in loops
                 if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]
    if not innermost:
        return [], 0
    bodies = [[i for i in instrs if a <= i[0] <= b] for a, b in innermost]
    best = max(bodies, key=lambda body: (sum(op_class(i[1]) == "mma" for i in body), len(body)))
    return best, len(innermost)


def analyse(case: Case, compiled, log: str) -> dict:
    cubin = compiled.asm["cubin"]
    instrs = parse_sass(cuobjdump(cubin, "-sass"))
    loop, n_loops = main_loop(instrs)
    counts = Counter(op_class(op) for _, op, _ in loop)
    mma_ops = sorted({op for _, op, _ in loop if op_class(op) == "mma"})
    warps = case.config.num_warps
    bm, bn = case.config.kwargs["BLOCK_M"], case.config.kwargs["BLOCK_N"]
    # One trip of the group loop reduces one whole group (the chunk loop inside it has a
    # single trip for G <= 2 * _MAX_CHUNK_BYTES and vanishes), so a program loads
    # BLOCK_N * G / 2 packed bytes per iteration. k_per_iter re-derives the K step from the
    # MMA work in the loop body as a check on that reading.
    if case.group_size // 2 > w4a8._MAX_CHUNK_BYTES:
        raise ValueError(f"G={case.group_size}: the chunk loop has several trips, recount bytes")
    bytes_per_iter = bn * case.group_size // 2
    macs = sum(macs_per_warp_instruction(op) for _, op, _ in loop if op_class(op) == "mma")
    row = {
        "kernel": case.path, "arch": f"sm_{case.arch}", "group_size": case.group_size,
        "config": case.label, "num_warps": warps,
        **parse_ptxas_log(log), **parse_resource_usage(cuobjdump(cubin, "--dump-resource-usage")),
        "shared": compiled.metadata.shared,
        "mma_in_kernel": sorted({op for _, op, _ in instrs if op_class(op) == "mma"}),
        "mma_in_loop": mma_ops, "innermost_loops": n_loops, "loop_instructions": len(loop),
        # Local-memory accesses (spill traffic) inside the main loop, where they would cost.
        "loop_local_accesses": sum(op.split(".")[0] in ("LDL", "STL") for _, op, _ in loop),
        "loop_counts": {c: counts.get(c, 0) for c in CLASSES},
        "loop_other_ops": dict(Counter(op.split(".")[0] for _, op, _ in loop
                                       if op_class(op) == "other").most_common()),
        # tl.dot pads a row tile below 16 to the MMA's 16 rows (min_dot_size allows M = 1).
        "k_per_iter_from_mma": macs * warps / (max(bm, 16) * bn), "bytes_per_iter": bytes_per_iter,
    }
    # Per packed byte: every warp runs the loop body, so a program issues count * num_warps
    # warp-instructions per iteration for bytes_per_iter bytes.
    row["per_byte"] = {c: row["loop_counts"][c] * warps / bytes_per_iter for c in CLASSES}
    row["ceiling_bytes_per_clock"], row["ceiling_limit"] = predicted_ceiling(
        case.arch, row["per_byte"], len(loop) * warps / bytes_per_iter)
    return row


def measure(case: Case) -> dict:
    compiled, log = compile_case(case)
    return analyse(case, compiled, log)


# ---- output ---------------------------------------------------------------------------------


def markdown(rows: list[dict]) -> str:
    head = ["kernel", "arch", "G", "config", "regs", "spill st/ld B", "stack/local B", "smem B",
            "MMA in main loop", "K/iter", "B/iter", *CLASSES, "total", "predicted B/clk/SM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        total = r["loop_instructions"]
        cells = [f"{r['loop_counts'][c]} / {r['per_byte'][c]:.3g}" for c in CLASSES]
        cells.append(f"{total} / {total * r['num_warps'] / r['bytes_per_iter']:.3g}")
        lines.append("| " + " | ".join(map(str, [
            r["kernel"], r["arch"], r["group_size"], r["config"], r["registers"],
            f"{r['spill_stores']}/{r['spill_loads']}"
            + (f" ({r['loop_local_accesses']} LDL/STL in loop)" if r["stack"] else ""),
            f"{r['stack']}/{r['cuobjdump_local']}", r["shared"],
            ", ".join(r["mma_in_loop"]) or "**none**", f"{r['k_per_iter_from_mma']:g}",
            r["bytes_per_iter"], *cells,
            f"{r['ceiling_bytes_per_clock']:.1f} ({r['ceiling_limit']})"])) + " |")
    return "\n".join(lines)


def _version(tool: str) -> str:
    """The last line of `tool --version` ("Build cuda_12.9...")."""
    return subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]


def environment() -> dict:
    paths = tool_paths()
    # Triton 3.9 runs a different ptxas per arch (get_ptxas): the versions differ.
    return {"triton": triton.__version__, "torch": torch.__version__,
            "ptxas_sm80": _version(paths["ptxas_sm80"]), "ptxas_sm90": _version(paths["ptxas_sm90"])}


def run(quick: bool) -> list[dict]:
    return [measure(case) for case in cases(quick)]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="only the first autotune config per (path, arch, G) (for tests)")
    parser.add_argument("--json", type=Path, help="also write the rows (with more fields) here")
    args = parser.parse_args(argv)
    if w4a8._INTERPRETING:
        # w4a8_gemm.py swaps in one tiny interpreter config per path when this is set.
        parser.error("unset TRITON_INTERPRET: this script compiles the real GPU kernels")
    start = time.time()
    env = environment()
    rows = run(args.quick)
    print(f"Compiler output on CPU, not GPU timings. triton {env['triton']}, torch {env['torch']}; "
          f"sm_80 {env['ptxas_sm80']}; sm_90 {env['ptxas_sm90']}; layer {LAYER_N}x{LAYER_K}, "
          f"fp32 scales, int16 group sums, bf16 out. {len(rows)} compiles in {time.time() - start:.0f} s.")
    print("Loop columns: count in the main loop per warp / warp-instructions per packed weight byte.")
    print("predicted B/clk/SM: packed bytes per clock per SM the loop can issue (limiting class); "
          "HBM delivers " + ", ".join(f"{g} {v:.1f}" for g, v in HBM_BYTES_PER_CLOCK.items())
          + ". A prediction from instruction counts, not a measurement.\n")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
