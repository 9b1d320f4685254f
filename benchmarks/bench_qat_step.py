"""QAT training-step benchmark: the time of one step (forward, backward, AdamW step) of a
Llama-style causal LM, float vs qatfx 8da4w vs torchao 8da4w QAT, eager and compiled, in one
run.

    python benchmarks/bench_qat_step.py                          # CUDA: ~1B model, bf16
    python benchmarks/bench_qat_step.py --device cpu             # small fp32 model, 1-2 minutes
    python benchmarks/bench_qat_step.py --device cpu --quick     # smoke run, tiny model

Variants (each on its own copy of the same float weights, with its own fused AdamW):
  float, compiled       torch.compile(model)                                  the 1.00x baseline
  qatfx 8da4w, compiled torch.compile(qatfx.prepare_pt2e(model, Int8DynActInt4WeightQuantizer(G)))
  torchao QAT, eager    Int8DynActInt4WeightQATQuantizer(groupsize=G).prepare(model)
  torchao QAT, compiled torch.compile(the same)
  float, eager          the model itself (an extra reference row)

Correctness first: before anything is timed, the qatfx prepared model's loss must equal
torchao's QAT model's loss exactly (eager vs eager, same weights and batch: qatfx's numerics
contract, docs/numerics.md), and each compiled variant's first-step loss must be within
LOSS_RTOL of its eager counterpart's. A failed check exits non-zero without timing.

Timing: --warmup untimed steps (the first compiles forward and backward), then two repeats
of --steps steps, each step timed on its own with time.perf_counter (after
torch.cuda.synchronize on GPU); a row gives the median over both repeats, the spread between
the two repeats' medians, the time ratio to the compiled float step, and tokens/s.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings("ignore", module="torchao")

import torchao  # noqa: E402
from torchao.quantization.qat import Int8DynActInt4WeightQATQuantizer  # noqa: E402

import qatfx  # noqa: E402
from qatfx.recipes.model import CausalLM, LMConfig  # noqa: E402
from report import device_name, format_table, git_sha  # noqa: E402  (benchmarks/report.py)

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_RATIO = 1.10  # qatfx compiled QAT step / compiled float step
TORCHAO_CITED_RATIO = 1.34  # torchao's published QAT-vs-float step ratio, as cited for this goal (not measured here)

# A compiled step's loss against the eager loss of the same weights, relative.
# - fp32: without rounding flips the difference is fp32 reordering (~1e-7). Inductor may
#   evaluate x * (1 / s) differently, so an int8 activation code within an ulp of a .5 tie
#   moves by one step (< 0.1% of codes, tests/test_compile.py), each worth ~3e-5 of the loss
#   on a one-layer model and less on larger ones, where flips of both signs average out.
#   Measured on CPU (2026-11-22): float 1e-7, qatfx and torchao <= 1e-6 relative on the
#   default CPU model. 1e-4 allows many flips; a wrong scale, zero point or mask moves the
#   loss by about the fake-quant effect itself (printed next to the check), far above it.
# - bf16: Inductor keeps intermediates (RMSNorm, RoPE, SwiGLU, fake-quant math) in fp32
#   where eager rounds each to bf16 (2^-9 relative), and more codes flip. Not measured on a
#   GPU; 1e-2 is a guess with headroom over what bf16 rounding of the logits can do.
LOSS_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


# ---- configurations --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    vocab: int
    dim: int
    layers: int
    head_dim: int = 64  # Llama-3.2-1B's
    query_per_kv: int = 4  # grouped-query attention: 32 query / 8 kv heads in Llama-3.2-1B
    ffn_mult: int = 4  # Llama-3.2-1B: ffn 8192 = 4 x 2048
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    @property
    def heads(self) -> int:
        return self.dim // self.head_dim

    @property
    def kv_heads(self) -> int:
        # the largest divisor of `heads` not above heads / query_per_kv, so heads group evenly
        return next(k for k in range(max(1, self.heads // self.query_per_kv), 0, -1) if self.heads % k == 0)

    @property
    def ffn(self) -> int:
        return self.ffn_mult * self.dim


@dataclass(frozen=True)
class RunConfig:
    device: str
    dtype: torch.dtype
    model: ModelConfig
    batch: int
    seq: int
    group_size: int
    warmup: int
    steps: int
    mode: Optional[str]
    lr: float
    out: Path

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    batch: int
    seq: int
    warmup: int
    steps: int
    dtype: torch.dtype


PRESETS = {
    # ~1.1B parameters: Llama-3.2-1B widths with a 32k vocabulary and an untied head.
    "cuda": Preset(ModelConfig(vocab=32000, dim=2048, layers=16), batch=4, seq=2048, warmup=3, steps=20, dtype=torch.bfloat16),
    # Small enough that all five variants (three compiles included) run in 1-2 minutes on 2 cores.
    "cpu": Preset(ModelConfig(vocab=4096, dim=256, layers=4), batch=8, seq=128, warmup=2, steps=8, dtype=torch.float32),
    # The test's smoke run: every path end to end, seconds per compile.
    "quick": Preset(ModelConfig(vocab=128, dim=128, layers=1), batch=2, seq=32, warmup=1, steps=3, dtype=torch.float32),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---- the model -------------------------------------------------------------------------------


def TrainLM(cfg: ModelConfig, dtype: torch.dtype, max_seq: int) -> CausalLM:
    """The toy Llama (qatfx/recipes/model.py) for training: RMSNorm, RoPE, GQA, SwiGLU, untied
    lm_head, no dropout (so every variant computes the same function and losses can be
    compared). PyTorch's default initialization: logits of order one, so the loss is
    sensitive to the fake quantization (with Llama's std-0.02 init every variant's loss would
    be ~ln(vocab)). Build under `with torch.device(...)` to allocate on that device directly."""
    lm = LMConfig(
        vocab_size=cfg.vocab, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads, hidden=cfg.ffn,
        max_seq=max_seq, rope_base=cfg.rope_theta, norm_eps=cfg.norm_eps, init_std=None,
    )
    return CausalLM(lm, dtype)


class LossOf(nn.Module):
    """model + next-token cross entropy, so that torch.compile captures the loss (and its
    backward) in the same graph as the model, for every variant alike."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# ---- the variants ----------------------------------------------------------------------------


def build_float(model: nn.Module, cfg: RunConfig, example: torch.Tensor) -> nn.Module:
    return model


def build_torchao(model: nn.Module, cfg: RunConfig, example: torch.Tensor) -> nn.Module:
    # precision only sets the dtype of the replacement linears' fresh weights, which
    # prepare() then replaces with the model's own (copy_weights=True)
    return Int8DynActInt4WeightQATQuantizer(groupsize=cfg.group_size, precision=cfg.dtype).prepare(model)


def build_qatfx(model: nn.Module, cfg: RunConfig, example: torch.Tensor) -> nn.Module:
    # Static shapes: every step has the same (batch, seq), and torch.compile specializes the
    # other variants on their first call the same way. (qatfx's default, dynamic batch and
    # sequence dims, would make Inductor generate shape-generic kernels.)
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(group_size=cfg.group_size)
    return qatfx.prepare_pt2e(model, quantizer, (example,), dynamic_shapes=(None,))


@dataclass(frozen=True)
class Variant:
    name: str
    build: Callable[[nn.Module, RunConfig, torch.Tensor], nn.Module]
    compiled: bool
    reference: str  # whose eager loss this variant's loss is checked against: "float" or "qat"


BASELINE = "float, compiled"
VARIANTS = (  # table order; the baseline first
    Variant(BASELINE, build_float, True, "float"),
    Variant("qatfx 8da4w, compiled", build_qatfx, True, "qat"),
    Variant("torchao QAT 8da4w, eager", build_torchao, False, "qat"),
    Variant("torchao QAT 8da4w, compiled", build_torchao, True, "qat"),
    Variant("float, eager", build_float, False, "float"),
)


# ---- correctness -----------------------------------------------------------------------------


def make_batch(cfg: RunConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab, (cfg.batch, cfg.seq + 1), generator=gen).to(cfg.device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


@dataclass(frozen=True)
class Reference:
    float_loss: float
    qat_loss: float  # torchao's, equal to qatfx's (checked)
    qatfx_equals_torchao: bool

    def loss(self, kind: str) -> float:
        return self.float_loss if kind == "float" else self.qat_loss

    @property
    def fake_quant_effect(self) -> float:
        """How much 8da4w fake quantization moves the loss, relative (information: the
        compiled-vs-eager tolerance must be far below it to mean anything)."""
        return abs(self.qat_loss - self.float_loss) / abs(self.float_loss)


def eager_loss(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():  # same forward values as with grad: no dropout, no batch statistics
        return LossOf(model)(*batch)


def reference_losses(master: nn.Module, cfg: RunConfig, batch) -> Reference:
    """Eager losses on the check batch; qatfx and torchao must agree bit for bit. One QAT
    copy of the weights at a time, so a 1B model needs little memory here."""
    float_loss = eager_loss(master, batch)
    torchao_loss = eager_loss(build_torchao(copy.deepcopy(master), cfg, batch[0]), batch)
    free_memory()
    qatfx_loss = eager_loss(build_qatfx(copy.deepcopy(master), cfg, batch[0]), batch)
    free_memory()
    return Reference(float_loss.item(), torchao_loss.item(), torch.equal(qatfx_loss, torchao_loss))


# ---- timing ----------------------------------------------------------------------------------


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(step_loss: Callable, opt: torch.optim.Optimizer, batch) -> torch.Tensor:
    loss = step_loss(*batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def timed_steps(step_loss: Callable, opt, batch, n: int, device: str) -> list[float]:
    """Seconds of each of n steps, each timed on its own (one sync per step on GPU)."""
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        train_step(step_loss, opt, batch)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


@dataclass(frozen=True)
class Check:
    loss: float  # the variant's first-step loss, on the check batch, before any update
    expected: float  # the eager loss of the same weights
    exact: bool  # eager variants must reproduce it bit for bit, compiled ones within rtol
    rtol: float

    @property
    def error(self) -> float:
        return abs(self.loss - self.expected) / abs(self.expected)

    @property
    def ok(self) -> bool:
        return self.loss == self.expected if self.exact else self.error <= self.rtol

    def __str__(self) -> str:
        if self.exact:
            return "ok (exact)" if self.ok else f"FAILED ({self.error:.1e})"
        return f"{'ok' if self.ok else 'FAILED'} ({self.error:.0e})"


@dataclass(frozen=True)
class Measurement:
    check: Check
    warmup_s: float  # all warm-up steps, compilation included
    repeats: tuple[list[float], ...]  # empty when the check failed: nothing was timed
    peak_bytes: int  # see step_peak_bytes

    @property
    def median_s(self) -> float:
        return statistics.median(t for r in self.repeats for t in r)

    @property
    def spread_pct(self) -> float:
        """Difference between the two repeats' medians, in % of the overall median."""
        medians = [statistics.median(r) for r in self.repeats]
        return 100 * (max(medians) - min(medians)) / self.median_s


def step_peak_bytes(step_loss: Callable, opt, batch, device: str) -> int:
    """Peak memory of one more (untimed) step above what is held between steps (weights,
    AdamW state): activations saved for backward, gradients, temporaries. CUDA: the caching
    allocator's peak counter. CPU: the CPU allocator keeps no peak, so the profiler records
    every allocation and free of the step and the peak is the running sum's maximum."""
    if device == "cuda":
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(step_loss, opt, batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - held
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(step_loss, opt, batch)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:  # nbytes is negative for a free
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    # fused AdamW for every variant (CPU and CUDA both have a fused kernel); not compiled,
    # so the optimizer costs the same in every row and the rows differ by the model only
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)


def measure(variant: Variant, master: nn.Module, cfg: RunConfig, ref: Reference, check_batch, batch) -> Measurement:
    """Build, warm up (the first step, on the check batch, compiles and gives the loss to
    check), check, and only then time."""
    model = variant.build(copy.deepcopy(master), cfg, batch[0]).train()
    opt = make_optimizer(model, cfg)
    step_loss = LossOf(model)
    if variant.compiled:
        step_loss = torch.compile(step_loss, mode=cfg.mode)

    sync(cfg.device)
    t0 = time.perf_counter()
    first_loss = train_step(step_loss, opt, check_batch).item()
    check = Check(first_loss, ref.loss(variant.reference), exact=not variant.compiled, rtol=LOSS_RTOL[cfg.dtype])
    if check.ok:
        for _ in range(cfg.warmup - 1):
            train_step(step_loss, opt, batch)
    sync(cfg.device)
    warmup_s = time.perf_counter() - t0

    repeats = tuple(timed_steps(step_loss, opt, batch, cfg.steps, cfg.device) for _ in range(2)) if check.ok else ()
    peak = step_peak_bytes(step_loss, opt, batch, cfg.device) if check.ok else None
    del step_loss, opt, model
    torch._dynamo.reset()  # drop the compiled graphs (and the tensors they hold) before the next variant
    free_memory()
    return Measurement(check, warmup_s, repeats, peak)


# ---- reporting -------------------------------------------------------------------------------


def table_rows(results: dict[str, Measurement], cfg: RunConfig) -> list[dict]:
    base = results[BASELINE].median_s
    rows = []
    for v in VARIANTS:
        m = results[v.name]
        rows.append({
            "variant": v.name,
            "check": str(m.check),
            "ms/step (median)": f"{1e3 * m.median_s:.1f}",
            "±% (2 repeats)": f"{m.spread_pct:.1f}",
            "vs compiled float": f"{m.median_s / base:.2f}x",
            "tokens/s": f"{cfg.tokens_per_step / m.median_s:,.0f}",
            "step peak MB": f"{m.peak_bytes / 2**20:,.1f}",
            "vs float peak": f"{m.peak_bytes / results[BASELINE].peak_bytes:.2f}x",
            "warm-up s": f"{m.warmup_s:.1f}",
        })
    return rows


HEADERS = ["variant", "check", "ms/step (median)", "±% (2 repeats)", "vs compiled float", "tokens/s", "step peak MB", "vs float peak", "warm-up s"]


def goal_line(results: dict[str, Measurement]) -> str:
    ratio = results["qatfx 8da4w, compiled"].median_s / results[BASELINE].median_s
    verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
    return (f"- goal: qatfx compiled QAT step <= {GOAL_RATIO:.2f}x the compiled float step "
            f"(torchao's published figure, as cited for this goal and not reproduced here: ~{TORCHAO_CITED_RATIO:.2f}x); "
            f"measured {ratio:.2f}x: {verdict}")


def report(cfg: RunConfig, n_params: int, ref: Reference, results: dict[str, Measurement]) -> list[str]:
    m = cfg.model
    memory_note = ("peak allocation of one extra step above the memory held between steps (weights, AdamW state): "
                   "activations saved for backward, gradients, temporaries; "
                   + ("torch.cuda.max_memory_allocated()" if cfg.device == "cuda" else
                      "the running sum of the CPU allocations and frees torch.profiler(profile_memory=True) recorded"))
    return [
        "# QAT training step: float vs qatfx 8da4w vs torchao QAT",
        "",
        f"- device: {device_name(cfg.device)}",
        f"- torch {torch.__version__}, torchao {torchao.__version__}, python {platform.python_version()}",
        f"- git {git_sha()}, {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: {' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}",
        f"- model: Llama-style LM, {n_params / 1e6:.1f}M params (dim {m.dim}, {m.layers} layers, {m.heads}/{m.kv_heads} heads "
        f"of {m.head_dim}, ffn {m.ffn}, vocab {m.vocab}, untied head), {str(cfg.dtype).removeprefix('torch.')}, random weights",
        f"- step: batch {cfg.batch} x seq {cfg.seq} = {cfg.tokens_per_step} tokens; forward + cross-entropy, backward, "
        f"AdamW(fused=True, lr {cfg.lr:g}) step, zero_grad; torch.compile mode={cfg.mode or 'default'} "
        "(model and loss in one graph; the optimizer step is eager in every row)",
        f"- 8da4w: int8 per-token asymmetric activations, int4 symmetric weights, group size {cfg.group_size}; "
        "qatfx exported with static shapes",
        f"- timing: {cfg.warmup} warm-up step(s) (compilation included), then 2 repeats x {cfg.steps} steps, each timed alone "
        "(time.perf_counter" + (", torch.cuda.synchronize" if cfg.device == "cuda" else "") + "); ms/step = median of all "
        "timed steps, ±% = difference of the two repeats' medians; vs compiled float = time ratio (> 1 is slower)",
        f"- peak mem: {memory_note}",
        f"- check, eager: qatfx prepared loss == torchao QAT loss bit for bit: {ref.qatfx_equals_torchao} "
        f"(loss {ref.qat_loss:.6f}; float model {ref.float_loss:.6f}, fake quantization moves it by {ref.fake_quant_effect:.1e} relative)",
        f"- check, compiled: first-step loss vs the eager loss of the same weights, relative error <= "
        f"{LOSS_RTOL[cfg.dtype]:.0e} (reason in the script's LOSS_RTOL)",
        goal_line(results),
        "",
        format_table(table_rows(results, cfg), HEADERS),
    ]


# ---- driver ----------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> RunConfig:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny model and few steps (the test's smoke run)")
    ap.add_argument("--dim", type=int, help="model width, a multiple of 64 (head dim 64)")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--group-size", type=int, default=32, help="int4 weight group size")
    ap.add_argument("--warmup", type=int, help="untimed steps first (>= 1; the first compiles)")
    ap.add_argument("--steps", type=int, help="timed steps per repeat")
    ap.add_argument("--mode", help="torch.compile mode for every compiled variant (default: none)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, help="CPU: torch.set_num_threads (default: torch's, one per core). On a "
                    "shared machine 1 avoids OpenMP stalls while another process holds a core")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/qat_step_<device>.md")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available; use --device cpu")
    preset = PRESETS["quick" if a.quick else a.device]
    model = dataclasses.replace(preset.model, **{k: getattr(a, k) for k in ("dim", "layers", "vocab") if getattr(a, k)})
    if model.dim % model.head_dim or model.dim % a.group_size or model.ffn % a.group_size:
        ap.error(f"--dim must be a multiple of {model.head_dim} and of --group-size {a.group_size}")
    cfg = RunConfig(
        device=a.device, dtype=DTYPES[a.dtype] if a.dtype else preset.dtype, model=model,
        batch=a.batch or preset.batch, seq=a.seq or preset.seq, group_size=a.group_size,
        warmup=max(1, a.warmup or preset.warmup), steps=a.steps or preset.steps,
        mode=None if a.mode in (None, "none", "default") else a.mode, lr=a.lr,
        out=a.out or RESULTS / f"qat_step_{a.device}.md",
    )
    return cfg


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_args(argv)
    torch.manual_seed(0)
    with torch.device(cfg.device):
        master = TrainLM(cfg.model, cfg.dtype, max_seq=cfg.seq).train()
    n_params = sum(p.numel() for p in master.parameters())
    log(f"model: {n_params / 1e6:.1f}M parameters, {cfg.model}, {cfg.dtype}, batch {cfg.batch} x seq {cfg.seq}")
    check_batch, batch = make_batch(cfg, seed=1), make_batch(cfg, seed=2)

    ref = reference_losses(master, cfg, check_batch)
    log(f"eager: float loss {ref.float_loss:.6f}, QAT loss {ref.qat_loss:.6f}; qatfx == torchao bit for bit: {ref.qatfx_equals_torchao}")
    if not ref.qatfx_equals_torchao:
        log("correctness check FAILED: qatfx's prepared loss differs from torchao's QAT loss; not timing")
        return 1

    results = {}
    for variant in VARIANTS:
        m = measure(variant, master, cfg, ref, check_batch, batch)
        log(f"{variant.name}: first-step loss {m.check.loss:.6f} vs eager {m.check.expected:.6f}: {m.check}; "
            f"warm-up {m.warmup_s:.1f} s" + (f", {1e3 * m.median_s:.1f} ms/step ±{m.spread_pct:.1f}%" if m.repeats else ""))
        if not m.check.ok:
            log(f"correctness check FAILED for {variant.name}; not timing")
            return 1
        results[variant.name] = m

    lines = report(cfg, n_params, ref, results)
    print("\n".join(lines))
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text("\n".join(lines) + "\n")
    log(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    if "--model" in sys.argv:  # Hugging Face models from config, one process per configuration
        import qat_step_hf  # benchmarks/qat_step_hf.py

        sys.exit(qat_step_hf.main(sys.argv[1:]))
    sys.exit(main())
