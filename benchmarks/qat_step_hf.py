"""QAT step cost on Hugging Face Llama models with SmolLM2's shapes: `bench_qat_step.py --model
hf-135m | hf-360m | hf-quick`.

Rows: float, QAT (8da4w g32) and QAT+LoRA, each eager and compiled, the way each is trained:

    float, eager            the transformers model itself
    QAT, eager              qatfx.integrations.transformers.prepare_for_trainer (what HF Trainer runs)
    QAT+LoRA, eager         qatfx.prepare_pt2e(whole model, lora=LoRA(16, 32, all projections))
    float, compiled         torch.compile(model)
    QAT, compiled           qatfx.compile_regions(the QAT eager model)
    QAT+LoRA, compiled      torch.compile(the QAT+LoRA eager model)

Every configuration runs in its own process (`--worker`), so one's allocator state, caches
and compiled code never touch another's; the configurations take turns, round after round
(`--rounds`), so a machine that slows down slows every row alike. A worker builds the
model from its config with seed 0 (random weights, no hub), runs untimed warm-up steps,
times `--steps` steps (forward with labels, backward, SGD step), then measures one more step
twice for memory:

- RSS: the process's resident high-water mark over that step, above its RSS just before
  it (Linux: /proc/self/clear_refs resets VmHWM; glibc's free heap memory is handed back
  first with malloc_trim, so the RSS before counts live memory only), so it counts what the
  step adds on top of the model, whatever allocated it.
- torch: the peak of the running sum of the allocations torch.profiler records in that
  step (CPU: torch keeps no peak counter), or torch.cuda.max_memory_allocated above what
  was allocated before the step.

Correctness: each compiled row's first loss must match its eager row's within LOSS_RTOL,
and QAT's first loss must differ from float's (fake quantization is on).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# Compiled vs eager first-step loss, relative. Inductor reorders fp32 math (RMSNorm, RoPE)
# and an int8 activation code within an ulp of a .5 tie rounds the other way
# (bench_qat_step.py's LOSS_RTOL says why). Measured on CPU (2026-12-07): per-region
# compiles (float, QAT) <= 1e-6; the whole-graph compile the LoRA rows use, which fuses
# across every layer, 4.9e-5 at 135M and 1.03e-4 at 360M. Fake quantization itself moves
# the loss by ~2.5e-3 there (a wrong scale, mask or zero point by that order): 5e-4 keeps
# 5x headroom over the flips and 5x below a real error.
LOSS_RTOL = 5e-4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GOALS = {"eager": (1.25, 1.15), "compiled": (1.10, 1.10)}  # (time, memory) vs float in the same mode


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    batch: int
    seq: int
    warmup: int
    steps: int


MODELS = {
    # SmolLM2-135M / -360M (HuggingFaceTB/SmolLM2-*: LlamaForCausalLM, tied embeddings)
    "hf-135m": Shape(49152, 576, 1536, 30, 9, 3, batch=2, seq=128, warmup=2, steps=4),
    "hf-360m": Shape(49152, 960, 2560, 32, 15, 5, batch=2, seq=128, warmup=2, steps=3),
    "hf-quick": Shape(512, 64, 128, 2, 4, 2, batch=2, seq=16, warmup=1, steps=2),
}
CONFIGS = ("float, eager", "QAT, eager", "QAT+LoRA, eager", "float, compiled", "QAT, compiled", "QAT+LoRA, compiled")


def build_model(shape: Shape) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()


class LogitsOf(torch.nn.Module):
    """input_ids -> logits, for whole-model capture (LoRA needs it)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def build_config(name: str, shape: Shape, ids: torch.Tensor):
    """(module to train, step loss function)"""
    import qatfx
    import qatfx.integrations.transformers as hf

    kind, mode = name.split(", ")
    model = build_model(shape)
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(group_size=32)
    if kind == "float":
        trained = torch.compile(model) if mode == "compiled" else model
        return model, lambda: trained(input_ids=ids, labels=ids).loss
    if kind == "QAT":
        prepared = hf.prepare_for_trainer(model, quantizer, {"input_ids": ids, "labels": ids})
        trained = qatfx.compile_regions(prepared) if mode == "compiled" else prepared
        return prepared, lambda: trained(input_ids=ids, labels=ids).loss
    lora = qatfx.LoRA(rank=16, alpha=32.0, targets=("*_proj",))
    prepared = qatfx.prepare_pt2e(LogitsOf(model), quantizer, (ids,), lora=lora)
    trained = torch.compile(prepared) if mode == "compiled" else prepared
    loss_fn = torch.nn.CrossEntropyLoss()

    def loss():
        logits = trained(ids)
        return loss_fn(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    return prepared, loss


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _return_free_memory() -> None:
    """glibc keeps freed heap memory resident; hand it back so that RSS counts live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_step_peak(step) -> Optional[int]:
    """VmHWM over one step above the RSS before it (free heap memory handed back first);
    None where VmHWM cannot be reset."""
    _return_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _rss_bytes("VmRSS")
    step()
    return _rss_bytes("VmHWM") - before


def torch_step_peak(step) -> int:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - held
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    running = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        running += e.nbytes()  # negative for a free
        peak = max(peak, running)
    return peak


def worker(model_name: str, config: str) -> dict:
    import gc

    shape = MODELS[model_name]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen).to(DEVICE)
    t0 = time.perf_counter()
    with torch.device(DEVICE):
        module, loss_fn = build_config(config, shape, ids)
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first_loss = step()
    for _ in range(shape.warmup - 1):
        step()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(shape.steps):
        t = time.perf_counter()
        step()  # loss.item() waits for the device
        times.append(time.perf_counter() - t)
    gc.collect()
    rss = rss_step_peak(step)
    gc.collect()
    tracked = torch_step_peak(step)
    return {"config": config, "first_loss": first_loss, "warmup_s": warmup_s, "times": times, "rss_peak": rss, "torch_peak": tracked}


def run_worker(model_name: str, config: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "bench_qat_step.py"), "--model", model_name, "--worker", config]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclass
class Row:
    config: str
    first_loss: float
    step_s: float
    spread_pct: float
    rss_peak: Optional[int]
    torch_peak: int


def summarize(config: str, runs: list[dict]) -> Row:
    medians = [statistics.median(r["times"]) for r in runs]
    median = statistics.median(medians)
    peaks = [r["rss_peak"] for r in runs if r["rss_peak"] is not None]
    return Row(
        config, runs[0]["first_loss"], median, 100 * (max(medians) - min(medians)) / median,
        statistics.median(peaks) if peaks else None, statistics.median(r["torch_peak"] for r in runs),
    )


def checks(rows: dict[str, Row]) -> list[str]:
    """Failures: compiled vs eager loss, and fake quantization actually on."""
    failures = []
    for kind in ("float", "QAT", "QAT+LoRA"):
        eager, compiled = rows[f"{kind}, eager"].first_loss, rows[f"{kind}, compiled"].first_loss
        if abs(compiled - eager) > LOSS_RTOL * abs(eager):
            failures.append(f"{kind}: compiled first loss {compiled:.6f} vs eager {eager:.6f} (rtol {LOSS_RTOL})")
    if rows["QAT, eager"].first_loss == rows["float, eager"].first_loss:
        failures.append("QAT's first loss equals float's: fake quantization did not run")
    return failures


def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def _mib(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}x"


def table(rows: dict[str, Row]) -> list[str]:
    lines = [
        "| config | ms/step | ±% (rounds) | vs float | step peak RSS | vs float | step peak (torch) | vs float |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in CONFIGS:
        r, base = rows[name], rows["float, " + name.split(", ")[1]]
        lines.append(
            f"| {name} | {1e3 * r.step_s:.0f} | {r.spread_pct:.1f} | {_ratio(r.step_s, base.step_s)} | {_mib(r.rss_peak)} | "
            f"{_ratio(r.rss_peak, base.rss_peak)} | {_mib(r.torch_peak)} | {_ratio(r.torch_peak, base.torch_peak)} |"
        )
    return lines


def goal_lines(rows: dict[str, Row]) -> list[str]:
    lines = []
    for mode, (time_goal, mem_goal) in GOALS.items():
        qat, base = rows[f"QAT, {mode}"], rows[f"float, {mode}"]
        t = qat.step_s / base.step_s
        m = qat.rss_peak / base.rss_peak if qat.rss_peak and base.rss_peak else None
        mem = "n/a" if m is None else f"{m:.2f}x ({'met' if m <= mem_goal else 'NOT met'}, goal <= {mem_goal}x)"
        lines.append(f"- QAT {mode}: time {t:.2f}x ({'met' if t <= time_goal else 'NOT met'}, goal <= {time_goal}x), peak RSS {mem}")
    return lines


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="QAT step cost on HF Llama models (see benchmarks/qat_step_hf.py)")
    ap.add_argument("--model", choices=tuple(MODELS), required=True)
    ap.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=2, help="every configuration runs once per round, in turn")
    ap.add_argument("--out", type=Path)
    a, _ = ap.parse_known_args(argv)
    if a.worker:
        print(json.dumps(worker(a.model, a.worker)), flush=True)
        return 0
    shape = MODELS[a.model]
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for round_ in range(a.rounds):
        for config in CONFIGS:
            result = run_worker(a.model, config)
            runs[config].append(result)
            print(f"round {round_ + 1}, {config}: loss {result['first_loss']:.6f}, "
                  f"{1e3 * statistics.median(result['times']):.0f} ms/step, warm-up {result['warmup_s']:.0f} s", file=sys.stderr, flush=True)
    rows = {c: summarize(c, r) for c, r in runs.items()}
    failures = checks(rows)
    n_params = sum(p.numel() for p in build_model(shape).parameters())
    lines = [
        f"# QAT step, {a.model} ({n_params / 1e6:.0f}M parameters, SmolLM2 shapes, random weights), fp32, batch {shape.batch} x {shape.seq}, SGD",
        "",
        f"{datetime.date.today()}, {device_name()}, torch {torch.__version__}, {a.rounds} rounds x {shape.steps} timed steps per configuration, each in its own process",
        f"command: python benchmarks/bench_qat_step.py --model {a.model} --rounds {a.rounds}",
        "",
        *table(rows),
        "",
        *goal_lines(rows),
        *(f"- CHECK FAILED: {f}" for f in failures),
    ]
    print("\n".join(lines))
    out = a.out or RESULTS / f"qat_step_{a.model}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return 1 if failures else 0
