"""QAT + LoRA training-step benchmark: float, full QAT and QAT+LoRA (both qatfx.LoRA modes),
all compiled, in one run: step time, memory and trainable parameters as ratios.

    python benchmarks/bench_qat_lora.py                          # CUDA: ~1B model, bf16
    python benchmarks/bench_qat_lora.py --device cpu             # small fp32 model, a few minutes
    python benchmarks/bench_qat_lora.py --device cpu --quick     # smoke run, tiny model

Variants (each on its own copy of the same float weights, fused AdamW over the parameters
that require grad, model + loss compiled in one graph):
  float, compiled                     torch.compile(model), every parameter trains: the 1.00x baseline
  full QAT 8da4w, compiled            qatfx.prepare_pt2e(model, Int8DynActInt4WeightQuantizer(G))
  QAT+LoRA merge_consistent, compiled + lora=qatfx.LoRA(r, 2r, q/v/o/gate/up/down): trains fq(W + sBA)
  QAT+LoRA torchtune, compiled        + lora=qatfx.LoRA(..., mode="torchtune"): fq(W) cached, + sBA x

The anchor: torchtune's QAT-LoRA recipe is 1.89x faster than its full QAT with 36.1% less
peak memory (Llama 3 on GPUs, torchtune's published figure: not reproduced here). The table
gives both ratios, to float and to full QAT.

Correctness first: at initialization B = 0, so every QAT+LoRA model computes exactly the plain
prepared model's function (eager, bit for bit: checked), and each compiled variant's first-step
loss must be within LOSS_RTOL (bench_qat_step.py's reasons) of its eager loss. A failed check
exits non-zero without timing.

Memory, per variant: held = the bytes of every parameter and buffer (frozen base included) plus
the AdamW state (exp_avg, exp_avg_sq of each trained parameter) and the gradients it keeps
between steps (none: zero_grad(set_to_none=True)); step peak = bench_qat_step.step_peak_bytes
(activations saved for backward, gradients, temporaries of one more step); total = the sum.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

import qatfx
from bench_qat_step import (  # noqa: E402  (benchmarks/bench_qat_step.py)
    LOSS_RTOL, Check, LossOf, RunConfig, TrainLM, eager_loss, free_memory, log, make_batch, parse_args as step_args,
    step_peak_bytes, sync, timed_steps, train_step,
)
from report import device_name, format_table, git_sha  # noqa: E402  (benchmarks/report.py)

RESULTS = Path(__file__).resolve().parent / "results"
LORA_TARGETS = ("*.q_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj")
TORCHTUNE_CITED = "1.89x faster than full QAT, 36.1% less peak memory (torchtune, GPU; cited, not measured here)"


@dataclass(frozen=True)
class Variant:
    name: str
    lora_mode: Optional[str]  # None: no adapters
    quantized: bool


BASELINE, FULL_QAT = "float, compiled", "full QAT 8da4w, compiled"
VARIANTS = (
    Variant(BASELINE, None, False),
    Variant(FULL_QAT, None, True),
    Variant("QAT+LoRA merge_consistent, compiled", "merge_consistent", True),
    Variant("QAT+LoRA torchtune, compiled", "torchtune", True),
)


def build(variant: Variant, master: nn.Module, cfg: RunConfig, rank: int, example: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(master)
    if not variant.quantized:
        return model
    lora = None if variant.lora_mode is None else qatfx.LoRA(rank, 2 * rank, targets=LORA_TARGETS, mode=variant.lora_mode)
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(group_size=cfg.group_size)
    # static shapes, as bench_qat_step: every step has the same (batch, seq)
    return qatfx.prepare_pt2e(model, quantizer, (example,), dynamic_shapes=(None,), lora=lora)


def trained(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def held_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters and buffers (shared storage counted once) plus the optimizer's state."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    tensors.update({t.data_ptr(): t for state in opt.state.values() for t in state.values() if torch.is_tensor(t) and t.dim()})
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True)
class Measurement:
    check: Check
    warmup_s: float
    repeats: tuple[list[float], ...]
    held: int
    step_peak: int
    trainable: int

    @property
    def median_s(self) -> float:
        return statistics.median(t for r in self.repeats for t in r)

    @property
    def total(self) -> int:
        return self.held + self.step_peak


def measure(variant: Variant, master, cfg: RunConfig, rank: int, expected: float, check_batch, batch) -> Measurement:
    model = build(variant, master, cfg, rank, batch[0]).train()
    params = trained(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, fused=True)
    step_loss = torch.compile(LossOf(model), mode=cfg.mode)
    sync(cfg.device)
    t0 = time.perf_counter()
    first = train_step(step_loss, opt, check_batch).item()
    check = Check(first, expected, exact=False, rtol=LOSS_RTOL[cfg.dtype])
    if check.ok:
        for _ in range(cfg.warmup - 1):
            train_step(step_loss, opt, batch)
    sync(cfg.device)
    warmup_s = time.perf_counter() - t0
    repeats = tuple(timed_steps(step_loss, opt, batch, cfg.steps, cfg.device) for _ in range(2)) if check.ok else ()
    peak = step_peak_bytes(step_loss, opt, batch, cfg.device) if check.ok else 0
    m = Measurement(check, warmup_s, repeats, held_bytes(model, opt), peak, sum(p.numel() for p in params))
    del step_loss, opt, model, params
    torch._dynamo.reset()
    free_memory()
    return m


def expected_losses(master, cfg: RunConfig, rank: int, check_batch) -> dict[str, float]:
    """Eager first-step losses; every QAT+LoRA model must equal full QAT's bit for bit (B = 0)."""
    losses = {v.name: eager_loss(build(v, master, cfg, rank, check_batch[0]), check_batch).item() for v in VARIANTS}
    for v in VARIANTS:
        if v.lora_mode is not None and losses[v.name] != losses[FULL_QAT]:
            raise SystemExit(f"correctness check FAILED: {v.name} at init {losses[v.name]!r} != full QAT {losses[FULL_QAT]!r}")
    return losses


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def table(results: dict[str, Measurement]) -> str:
    base, qat = results[BASELINE], results[FULL_QAT]
    rows = [{
        "variant": name,
        "check": str(m.check),
        "ms/step": f"{1e3 * m.median_s:.1f}",
        "vs float": f"{m.median_s / base.median_s:.2f}x",
        "speed vs full QAT": f"{qat.median_s / m.median_s:.2f}x",
        "trainable params": f"{m.trainable:,}",
        "held MB": _mb(m.held),
        "step peak MB": _mb(m.step_peak),
        "total MB": _mb(m.total),
        "total vs float": f"{m.total / base.total:.2f}x",
        "memory vs full QAT": f"{100 * (m.total / qat.total - 1):+.1f}%",
        "warm-up s": f"{m.warmup_s:.1f}",
    } for name, m in results.items()]
    return format_table(rows, list(rows[0]))


def report(cfg: RunConfig, rank: int, n_params: int, results: dict[str, Measurement]) -> list[str]:
    m = cfg.model
    return [
        "# QAT + LoRA training step: float vs full QAT vs QAT+LoRA (both modes)",
        "",
        f"- device: {device_name(cfg.device)}",
        f"- torch {torch.__version__}, python {platform.python_version()}, git {git_sha()}, "
        f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: {' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}",
        f"- model: Llama-style LM, {n_params / 1e6:.1f}M params (dim {m.dim}, {m.layers} layers, ffn {m.ffn}, vocab "
        f"{m.vocab}, untied head), {str(cfg.dtype).removeprefix('torch.')}; batch {cfg.batch} x seq {cfg.seq}",
        f"- QAT: 8da4w, group size {cfg.group_size}; LoRA: rank {rank}, alpha {2 * rank}, on {', '.join(LORA_TARGETS)} "
        "(the head and k_proj stay frozen); the base weights frozen",
        f"- step: forward + loss + backward in one compiled graph (mode={cfg.mode or 'default'}), AdamW(fused) over the "
        f"trained parameters; {cfg.warmup} warm-up step(s), then 2 x {cfg.steps} timed steps, median",
        "- memory: held = parameters + buffers + AdamW state; step peak = allocations of one more step above it "
        + ("(torch.cuda.max_memory_allocated)" if cfg.device == "cuda" else "(torch.profiler memory events)"),
        f"- anchor: {TORCHTUNE_CITED}",
        "",
        table(results),
    ]


def parse_args(argv: Optional[list[str]]) -> tuple[RunConfig, int]:
    """bench_qat_step's options, plus --rank; the table goes to qat_lora_<device>.md by default."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", type=Path)
    own, rest = ap.parse_known_args(argv)
    cfg = step_args(rest)
    return dataclasses.replace(cfg, out=own.out or RESULTS / f"qat_lora_{cfg.device}.md"), own.rank


def main(argv: Optional[list[str]] = None) -> int:
    cfg, rank = parse_args(argv)
    torch.manual_seed(0)
    with torch.device(cfg.device):
        master = TrainLM(cfg.model, cfg.dtype, max_seq=cfg.seq).train()
    n_params = sum(p.numel() for p in master.parameters())
    check_batch, batch = make_batch(cfg, seed=1), make_batch(cfg, seed=2)
    expected = expected_losses(master, cfg, rank, check_batch)
    results = {}
    for variant in VARIANTS:
        m = measure(variant, master, cfg, rank, expected[variant.name], check_batch, batch)
        log(f"{variant.name}: first-step loss vs eager {m.check}; warm-up {m.warmup_s:.1f} s")
        if not m.check.ok:
            log(f"correctness check FAILED for {variant.name}; not timing")
            return 1
        results[variant.name] = m
    lines = report(cfg, rank, n_params, results)
    sys.stdout.write("\n".join(lines) + "\n")
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text("\n".join(lines) + "\n")
    log(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
