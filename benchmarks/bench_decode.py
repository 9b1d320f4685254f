"""End-to-end decode benchmark: tokens/s of a ~1.1B Llama-style model (benchmarks/decode_model.py)
quantized 8da4w by qatfx and compiled with its lowering, against the bf16 model compiled by
Inductor.

    python benchmarks/bench_decode.py                   # CUDA: 1.1B model, CUDA graphs
    python benchmarks/bench_decode.py --device cpu      # smoke run: tiny model, a few steps

Flow: bf16 DecodeLM -> qatfx.prepare_pt2e(Int8DynActInt4WeightQuantizer(G)) -> convert_pt2e ->
torch.compile(converted, backend="qatfx", mode="reduce-overhead"), against
torch.compile(model, mode="reduce-overhead"). Before timing, one decode step of each compiled
model is compared with its eager counterpart. Then each model decodes --steps tokens
greedily after a --prompt-len prefix already in the KV cache (random keys/values standing
in for prefill), twice; tokens/s is batch x steps / wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import bench_w4a8_gemm as common  # first: on --device cpu it sets TRITON_INTERPRET before qatfx loads
import torch
from torch._dynamo.utils import counters

import qatfx
from decode_model import LLAMA_1B, TINY, DecodeLM, initial_state
from qatfx.recipes.model import LMConfig

BF16 = torch.bfloat16

# One decode step of a compiled model against the same model run eagerly, as the RMS error
# relative to the eager logits' RMS.
# - bf16: Inductor fuses RMSNorm / RoPE / SwiGLU and skips intermediate bf16 roundings
#   (each ~2^-9 relative): 3.7e-3 on the 2-layer CPU model; 2e-2 leaves room for 16 layers.
# - qatfx: the fused kernel computes int8 x int4 dots exactly instead of rounding both
#   dequantized operands to bf16 (~2e-3 per linear), and where an input moves by one bf16
#   ulp its int8 activation value can flip by one step (int8 per-token noise is ~5e-3 of a
#   row's RMS). Accumulated over layers: 8.6e-3 on the 2-layer CPU model, 1.4e-2 on a
#   16-layer dim-128 one (CPU, kernel interpreted), whose int4 error against the float model
#   is 0.135. 5e-2 keeps 3x headroom, fails on any real error (a wrong layout or scale gives
#   ~1) and stays far below the quantization error itself (printed as SQNR).
RTOL = {"bf16": 2e-2, "qatfx 8da4w": 5e-2}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=common.DEVICE, help="default: cuda if available")
    ap.add_argument("--group-size", type=int, help="int4 weight group size (default 128 on cuda, 32 on cpu)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, help="positions already in the KV cache (default 256 / 8)")
    ap.add_argument("--steps", type=int, help="timed decode steps per repeat (default 128 / 4)")
    ap.add_argument("--warmup", type=int, help="untimed steps after compiling (default 8 / 1)")
    ap.add_argument("--mode", help="torch.compile mode for both models (default reduce-overhead on cuda, none on cpu)")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/decode_<device>.md")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available; use --device cpu")
    cuda = args.device == "cuda"
    args.group_size = args.group_size or (128 if cuda else 32)
    args.prompt_len = args.prompt_len if args.prompt_len is not None else (256 if cuda else 8)
    args.steps = args.steps or (128 if cuda else 4)
    args.warmup = args.warmup if args.warmup is not None else (8 if cuda else 1)
    args.mode = args.mode or ("reduce-overhead" if cuda else None)
    args.mode = None if args.mode == "none" else args.mode
    # the cache holds the prompt and the longest run of steps (each repeat restarts from the prompt)
    base = LLAMA_1B if cuda else TINY
    args.config = dataclasses.replace(base, max_seq=64 * -(-(args.prompt_len + max(args.steps, args.warmup) + 1) // 64))
    args.out = args.out or common.RESULTS / f"decode_{args.device}.md"
    return args


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.double() - ref.double()).pow(2).sum()
    return float(10 * torch.log10(ref.double().pow(2).sum() / diff))


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the weights a decode step reads: every parameter and buffer except the
    embedding table (one row of it is read) and the small RoPE tables, each storage once."""
    seen, total = set(), 0
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if name.endswith("embed.weight") or t.dim() < 2 or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def decode(step, state, n: int, cudagraphs: bool):
    """n greedy decode steps from `state`; returns the last tokens."""
    tokens, pos, k, v = state
    for _ in range(n):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits, k, v = step(tokens, pos, k, v)
        if cudagraphs:
            # The next replay overwrites this replay's outputs, so the caches fed back in are
            # taken out of the CUDA-graph pool first (the same copies for both models).
            k, v = k.clone(), v.clone()
        tokens = logits.argmax(-1)
        pos = pos + 1
    return tokens


def time_decode(step, state, args) -> tuple[float, float]:
    """Mean seconds per step over two repeats, and their spread in % of the mean."""
    cudagraphs = args.mode is not None and torch._inductor.list_mode_options(args.mode).get("triton.cudagraphs", False)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    with torch.no_grad():
        decode(step, state, args.warmup, cudagraphs)
        runs = []
        for _ in range(2):
            sync()
            t0 = time.perf_counter()
            decode(step, state, args.steps, cudagraphs)
            sync()
            runs.append((time.perf_counter() - t0) / args.steps)
    mean = sum(runs) / 2
    return mean, 100 * abs(runs[0] - runs[1]) / mean


def main() -> int:
    args = parse_args()
    cfg: LMConfig = args.config
    torch.manual_seed(0)
    with torch.device(args.device):
        model = DecodeLM(cfg, BF16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    state = initial_state(cfg, args.batch, args.prompt_len, BF16, args.device)
    print(f"model: {n_params / 1e6:.1f}M parameters, {cfg}", file=sys.stderr)

    t0 = time.perf_counter()
    # The decode step's shapes are static (batch, one token, a fixed-size cache): export it
    # with static shapes, which also avoids the size-1 dynamic-dim warning.
    prepared = qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(group_size=args.group_size), state, dynamic_shapes=(None,) * 4)
    with torch.no_grad():
        converted = qatfx.convert_pt2e(prepared)
    del prepared
    print(f"prepare + convert: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    counters["qatfx"].clear()
    paths = {
        "bf16": (model, torch.compile(model, mode=args.mode)),
        "qatfx 8da4w": (converted, torch.compile(converted, backend="qatfx", mode=args.mode)),
    }

    checks, logits = [], {}
    # A warm FX graph / AOTAutograd cache would skip qatfx's pass and report no rewrites:
    # compile cold, so the rewrites run and are counted.
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        for name, (eager, compiled) in paths.items():
            t0 = time.perf_counter()
            ref, out = eager(*state)[0], compiled(*state)[0]
            err = common.rms_rel_error(out, ref)
            logits[name] = out.clone()
            ok = err <= RTOL[name]
            checks.append((name, err, ok))
            print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s; compiled vs eager logits: "
                  f"RMS rel err {err:.2e} (tol {RTOL[name]:.0e}) {'ok' if ok else 'FAILED'}", file=sys.stderr)
    rewrites = dict(counters["qatfx"])
    if not all(ok for _, _, ok in checks):
        print("correctness check FAILED; not timing", file=sys.stderr)
        return 1

    rows = []
    for name, (eager, compiled) in paths.items():
        sec, spread = time_decode(compiled, state, args)
        nbytes = weight_bytes(eager)
        rows.append({
            "model": name, "compile": f"{'qatfx' if name != 'bf16' else 'inductor'}, mode={args.mode or 'default'}",
            "ms/token": f"{1e3 * sec:.3f}", "±%": f"{spread:.1f}", "tokens/s": f"{args.batch / sec:.1f}",
            "weights MB": f"{nbytes / 1e6:.1f}", "weight GB/s": f"{nbytes / sec / 1e9:.1f}", "sec": sec,
        })
        print(f"{name}: {1e3 * sec:.3f} ms/token", file=sys.stderr)
    for row in rows:
        row["vs bf16"] = f"{rows[0]['sec'] / row['sec']:.2f}x"

    headers = ["model", "compile", "ms/token", "±%", "tokens/s", "weights MB", "weight GB/s", "vs bf16"]
    lines = common.report_header("Decode: tokens/s, bf16 vs qatfx 8da4w", args.device) + [
        f"- model: DecodeLM {n_params / 1e6:.1f}M params (dim {cfg.dim}, {cfg.layers} layers, {cfg.heads}/{cfg.n_kv_heads} heads, "
        f"ffn {cfg.hidden}, vocab {cfg.vocab_size}), bf16, random weights; batch {args.batch}, cache {cfg.max_seq}, "
        f"prompt {args.prompt_len}, {args.steps} timed steps x 2 repeats after {args.warmup} warm-up step(s)",
        f"- 8da4w: int8 per-token activations, int4 weights, group size {args.group_size}",
        "- weights MB: what a step reads (all weights but the embedding table); weight GB/s = that / step time",
        *(f"- check, {n}: compiled vs eager logits, RMS rel err {e:.2e} <= {RTOL[n]:.0e}" for n, e, _ in checks),
        f"- int4 quantization itself: quantized vs bf16 logits SQNR {sqnr_db(logits['qatfx 8da4w'], logits['bf16']):.1f} dB (information only)",
        f"- qatfx rewrites fired (torch._dynamo.utils.counters['qatfx']): {rewrites or 'none'}",
        "",
        common.format_table(rows, headers),
    ]
    print("\n".join(lines))
    common.write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
