"""Regional compilation benchmark: prepare time, first-step (compile) time and steady step
time of QAT training on the toy Llama, whole-graph capture vs region capture, compiled whole
or region by region.

    python benchmarks/bench_regional_compile.py --device cpu            # 8 layers, dim 256
    python benchmarks/bench_regional_compile.py --device cpu --quick    # smoke run, 2 tiny layers

Configurations (each on its own copy of the same float weights, with its own fused AdamW):
  whole graph + torch.compile     prepare_pt2e(model, q, ex) -> torch.compile(prepared)   the 1.00x baseline
  regional + torch.compile        prepare_pt2e(..., regions="auto") -> torch.compile(prepared): one graph, blocks inlined
  regional + region.compile()     each region compiled on its own, as PyTorch's recipe does it (no code sharing)
  regional + compile_regions      qatfx.compile_regions(prepared): identical regions share one compiled code

Each configuration compiles in a fresh, empty Inductor cache directory
(torch._inductor.utils.fresh_cache: FX graph, AOTAutograd and kernel caches) and on code
objects of its own, after one untimed warm-up compile of a tiny function (the process's
one-time costs), so its first step pays the real compile. Correctness first: the eager region capture's loss
must equal the whole-graph capture's exactly (the same ops), and each compiled first-step
loss must be within LOSS_RTOL of it; a failed check exits non-zero before timing.

Timing: prepare = prepare_pt2e (export + passes); first step = the first forward +
cross-entropy + backward + AdamW step + zero_grad, compilation included. Then, once every
configuration is compiled, one more untimed step each and --steps timed steps each, the
configurations taking turns step by step (so load from other processes falls on all of
them alike), each timed alone with time.perf_counter (after torch.cuda.synchronize on a
GPU), reported as the median. `graphs` is torch._dynamo's unique_graphs counter: how many graphs
Dynamo compiled.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before qatfx loads its Triton kernel

import qatfx  # noqa: E402
from qatfx.graph.regions import graph_regions  # noqa: E402
from qatfx.recipes.model import CausalLM, LMConfig  # noqa: E402
from report import device_name, format_table, git_sha  # noqa: E402  (benchmarks/report.py)

try:
    from torch._inductor.utils import fresh_cache  # torch >= 2.8
except ImportError:  # pragma: no cover
    from torch._inductor.utils import fresh_inductor_cache as fresh_cache

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "whole graph + torch.compile"

# A compiled first-step loss against the eager loss of the same weights, relative (the
# reasoning of bench_qat_step.py's LOSS_RTOL): fp32 reordering alone is ~1e-7; Inductor may
# round an int8 activation code that sits within an ulp of a .5 tie the other way, one step
# of one token's input, ~3e-5 of the loss on a one-layer model and less on deeper ones.
# 1e-4 allows several such flips; a wrong scale, mask or a region run twice is O(1e-2) or more.
LOSS_RTOL = 1e-4


@dataclass(frozen=True)
class Variant:
    name: str
    regions: Optional[str]  # prepare_pt2e's regions=
    compile: Callable[[torch.nn.Module], Callable]  # prepared -> the callable a step runs


def _each_region(prepared: torch.nn.Module) -> Callable:
    for _, gm in graph_regions(prepared):
        gm.compile()
    return prepared


VARIANTS = (
    Variant(BASELINE, None, torch.compile),
    Variant("regional + torch.compile", "auto", torch.compile),
    Variant("regional + region.compile()", "auto", _each_region),
    Variant("regional + compile_regions", "auto", qatfx.compile_regions),
)


@dataclass
class Result:
    prepare_s: float
    first_step_s: float
    first_loss: float
    step_s: list[float]
    graphs: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(run: Callable, opt: torch.optim.Optimizer, batch) -> torch.Tensor:
    tokens, targets = batch
    loss = F.cross_entropy(run(tokens).flatten(0, 1).float(), targets.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def make_batch(args, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g).to(args.device)
    return data[:, :-1], data[:, 1:]


def quantizer(args) -> qatfx.Quantizer:
    return qatfx.Int8DynActInt4WeightQuantizer(args.group_size)


def eager_loss(master: torch.nn.Module, args, regions: Optional[str], batch) -> float:
    prepared = qatfx.prepare_pt2e(copy.deepcopy(master), quantizer(args), (batch[0],), regions=regions)
    with torch.no_grad():
        return F.cross_entropy(prepared(batch[0]).flatten(0, 1).float(), batch[1].flatten()).item()


def warm_up(device: str) -> None:
    """Pay the process's one-time costs (Inductor's imports and first C++ build) before the
    first configuration, which would otherwise be charged for them."""
    with fresh_cache():
        x = torch.randn(8, 8, device=device, requires_grad=True)
        torch.compile(lambda t: (t.sin() * 2).sum())(x).backward()
    torch._dynamo.reset()


def compile_and_first_step(variant: Variant, master: torch.nn.Module, args, batch) -> tuple[Result, Callable]:
    """Prepare and run the first step in a fresh, empty Inductor cache; returns the result so
    far and a function running one more step. Dynamo's caches are not reset between
    configurations (that would drop the earlier ones' compiled code, timed later): each
    configuration compiles code objects of its own (its own module copies, its own classes)."""
    counters.clear()
    with fresh_cache():
        model = copy.deepcopy(master)
        t0 = time.perf_counter()
        prepared = qatfx.prepare_pt2e(model, quantizer(args), (batch[0],), regions=variant.regions)
        prepare_s = time.perf_counter() - t0
        run = variant.compile(prepared)
        opt = torch.optim.AdamW(prepared.parameters(), lr=1e-5, fused=True)
        sync(args.device)
        t0 = time.perf_counter()
        first_loss = train_step(run, opt, batch).item()
        sync(args.device)
        first_step_s = time.perf_counter() - t0
    result = Result(prepare_s, first_step_s, first_loss, [], counters["stats"]["unique_graphs"])
    return result, lambda: train_step(run, opt, batch)


def time_steps(steppers: dict[str, Callable], results: dict[str, Result], args) -> None:
    """--steps timed steps per configuration, taken in turns (one step of each, then the next
    round), so a change in the machine's load during the run hits every configuration alike."""
    for name, step in steppers.items():
        step()  # one more untimed step: the optimizer state exists now in every configuration
    for _ in range(args.steps):
        for name, step in steppers.items():
            sync(args.device)
            t0 = time.perf_counter()
            step()
            sync(args.device)
            results[name].step_s.append(time.perf_counter() - t0)


# ---- reporting -------------------------------------------------------------------------------


HEADERS = ["configuration", "graphs", "prepare s", "first step s", "first step vs whole", "step ms (median)", "step vs whole", "loss check"]


def table_rows(results: dict[str, Result], expected_loss: float) -> list[dict]:
    base = results[BASELINE]
    rows = []
    for name, r in results.items():
        rel = abs(r.first_loss - expected_loss) / abs(expected_loss)
        rows.append(dict(zip(HEADERS, [
            name, r.graphs, f"{r.prepare_s:.2f}", f"{r.first_step_s:.1f}", f"{r.first_step_s / base.first_step_s:.2f}x",
            f"{1e3 * r.median_s:.1f}", f"{r.median_s / base.median_s:.2f}x", f"ok ({rel:.1e})",
        ])))
    return rows


def report(args, config: LMConfig, n_params: int, expected_loss: float, results: dict[str, Result]) -> list[str]:
    return [
        "# Regional compilation: compile time and step time",
        "",
        f"- device: {device_name(args.device)}",
        f"- torch {torch.__version__}, python {platform.python_version()}, git {git_sha()}, "
        f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: {' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}",
        f"- model: toy Llama (qatfx.recipes.model.CausalLM), {n_params / 1e6:.1f}M params: {config.layers} layers, "
        f"dim {config.dim}, {config.heads} heads, SwiGLU {config.hidden}, vocab {config.vocab_size}, fp32",
        f"- QAT: Int8DynActInt4WeightQuantizer(group_size={args.group_size}); step = batch {args.batch} x seq {args.seq}: "
        "forward, cross-entropy, backward, AdamW(fused=True) step (eager), zero_grad",
        "- an empty Inductor cache directory and code objects of its own per configuration (after one untimed warm-up compile "
        "of a tiny function, so the first configuration is not charged the process's one-time costs); "
        "first step includes compilation; "
        f"step ms = median of {args.steps} steps after one more untimed step, the configurations taking turns step by step; vs whole = ratio to the whole-graph row (< 1 is faster)",
        f"- loss check: first-step loss vs the eager loss {expected_loss:.6f} (region capture == whole graph exactly, eager), "
        f"relative error <= {LOSS_RTOL:.0e}",
        "",
        format_table(table_rows(results, expected_loss), HEADERS),
    ]


# ---- driver ----------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="2 layers of dim 64, 3 steps (the test's smoke run)")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--dim", type=int)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--threads", type=int, help="CPU: torch.set_num_threads (default: torch's, one per core). On a "
                    "shared machine 1 avoids OpenMP stalls while another process holds a core")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/regional_compile_<device>.md")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available; use --device cpu")
    preset = dict(layers=2, dim=64, batch=2, seq=32, steps=3) if a.quick else dict(layers=8, dim=256, batch=4, seq=128, steps=10)
    for key, value in preset.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.out = a.out or RESULTS / f"regional_compile_{a.device}.md"
    return a


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    config = LMConfig(vocab_size=args.vocab, dim=args.dim, layers=args.layers, heads=max(1, args.dim // 64),
                      hidden=3 * args.dim, max_seq=args.seq)
    torch.manual_seed(0)
    with torch.device(args.device):
        master = CausalLM(config).train()
    n_params = sum(p.numel() for p in master.parameters())
    batch = make_batch(args, config.vocab_size, seed=1)

    whole, regional = (eager_loss(master, args, regions, batch) for regions in (None, "auto"))
    log(f"eager loss: whole graph {whole:.6f}, region capture {regional:.6f}")
    if whole != regional:
        log("correctness check FAILED: the region capture's eager loss differs from the whole graph's; not timing")
        return 1

    warm_up(args.device)
    results, steppers = {}, {}
    torch._dynamo.reset()
    for variant in VARIANTS:
        m, steppers[variant.name] = compile_and_first_step(variant, master, args, batch)
        rel = abs(m.first_loss - whole) / abs(whole)
        log(f"{variant.name}: prepare {m.prepare_s:.2f} s, first step {m.first_step_s:.1f} s, {m.graphs} graphs; "
            f"first-step loss {m.first_loss:.6f} ({rel:.1e} from eager)")
        if not rel <= LOSS_RTOL:
            log(f"correctness check FAILED for {variant.name}: first-step loss off by {rel:.1e} relative")
            return 1
        results[variant.name] = m
    time_steps(steppers, results, args)
    for name, m in results.items():
        log(f"{name}: {1e3 * m.median_s:.1f} ms/step (median of {len(m.step_s)})")

    lines = report(args, config, n_params, whole, results)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
