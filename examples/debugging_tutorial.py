"""Debugging a quantized model: find the layer that hurts, look at it, fix it.

    python examples/debugging_tutorial.py [DUMP_DIR]      # ~20-25 s on 2 CPU cores

The walk-through in docs/tutorial_debugging.md runs this file. The model is a small
Llama-style LM with random weights in which two things trained LLMs are known to have are
planted, so that the tutorial has something to find:

- outlier weights: in `lm_head` one weight per row is 10x the layer's largest weight;
- a massive activation: channel 7 of `blocks.0.down_proj`'s input is 1000x larger than the
  others (`up_proj` row 7 scaled up, `down_proj` column 7 scaled down: the float model
  computes the same function, only the quantized one notices).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import qatfx
from qatfx.debug.compare import CompareReport, compare, sqnr_db
from qatfx.recipes.model import CausalLM, LMConfig

VOCAB = 96
WEIGHT_OUTLIER_LAYER = "lm_head"
ACTIVATION_OUTLIER_LAYER = "blocks.0.down_proj"


def planted_model() -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(LMConfig(vocab_size=VOCAB, dim=128, layers=2, heads=4, hidden=384, max_seq=64)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = model.get_submodule(WEIGHT_OUTLIER_LAYER).weight
        rows = torch.arange(w.shape[0])
        cols = torch.randint(0, w.shape[1], (w.shape[0],), generator=g)
        signs = torch.where(torch.rand(w.shape[0], generator=g) < 0.5, -1.0, 1.0)
        w[rows, cols] = w.abs().max() * 10 * signs
        block = model.blocks[0]
        block.up_proj.weight[7] *= 1000.0
        block.down_proj.weight[:, 7] /= 1000.0
    return model


def tokens(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@dataclass
class Quality:
    logits_sqnr_db: float  # converted model's logits vs the float model's
    top1_agreement: float  # share of positions where both pick the same next token


def quality(model: torch.nn.Module, quantized: torch.nn.Module, batch: torch.Tensor) -> Quality:
    with torch.no_grad():
        ref, out = model(batch), quantized(batch)
    return Quality(sqnr_db(ref, out), (ref.argmax(-1) == out.argmax(-1)).float().mean().item())


def quantize(model: torch.nn.Module, quantizer: qatfx.Quantizer, dump_dir: Path):
    example = tokens(2, 16, seed=0)
    prepared = qatfx.prepare_pt2e(model, quantizer, (example,), dump_dir=dump_dir)
    # ... QAT training of `prepared` would go here (see examples/quickstart.py) ...
    return prepared, qatfx.convert_pt2e(prepared)


@dataclass
class TutorialResult:
    before: Quality
    after: Quality
    report_before: CompareReport
    report_after: CompareReport


def main(dump_dir: str | Path = "qatfx_dumps/debugging_tutorial") -> TutorialResult:
    dump_dir = Path(dump_dir)
    model = planted_model()
    batch = tokens(4, 64, seed=1)

    # 1. The bad result: 8da4w with group size 128.
    prepared, quantized = quantize(model, qatfx.Int8DynActInt4WeightQuantizer(group_size=128), dump_dir / "before")
    before = quality(model, quantized, batch)
    print(f"1. logits SQNR vs float {before.logits_sqnr_db:.1f} dB, same top-1 token {before.top1_agreement:.0%}")

    # 2. Find the layer: per-linear error, worst local SQNR first (also writes compare.html).
    report = compare(model, prepared, [batch], dump_dir=dump_dir / "before")
    print("\n2. qatfx.debug.compare:\n")
    print(report)

    # 3. Look closer at the two outliers compare flagged.
    print("\n3. outliers:")
    for row in report.rows[:2]:
        print(f"   {row.layer}: {row.note}")
    w = model.get_submodule(WEIGHT_OUTLIER_LAYER).weight.detach()
    group_absmax = w.reshape(w.shape[0], -1, 32).abs().amax(-1)
    print(f"   {WEIGHT_OUTLIER_LAYER} weight: largest |w| {w.abs().max():.3f}, median group max {group_absmax.median():.3f}")
    seen = []
    handle = model.get_submodule(ACTIVATION_OUTLIER_LAYER).register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(batch)
    handle.remove()
    channel_max = seen[0].abs().flatten(0, -2).amax(0)
    print(
        f"   {ACTIVATION_OUTLIER_LAYER} input: channel {int(channel_max.argmax())} reaches {channel_max.max():.3g}, "
        f"the median channel {channel_max.median():.3g}"
    )
    print(f"   dumps and compare.html in {dump_dir / 'before'}")

    # 4. Fix: a smaller group for the weight-limited layer (the group size is global), and
    #    keep the activation-limited layer in float.
    fixed = qatfx.Int8DynActInt4WeightQuantizer(group_size=32, skip=[ACTIVATION_OUTLIER_LAYER])
    prepared_fixed, quantized_fixed = quantize(model, fixed, dump_dir / "after")
    after = quality(model, quantized_fixed, batch)
    report_after = compare(model, prepared_fixed, [batch], dump_dir=dump_dir / "after")
    print(
        f"\n4. after the fix: logits SQNR {after.logits_sqnr_db:.1f} dB (was {before.logits_sqnr_db:.1f}), "
        f"same top-1 token {after.top1_agreement:.0%} (was {before.top1_agreement:.0%})"
    )
    print(f"   worst layer now {report_after.worst().layer}: local SQNR {report_after.worst().fake_quant.local.sqnr_db:.1f} dB")
    print(f"   {WEIGHT_OUTLIER_LAYER} local SQNR {report.row(WEIGHT_OUTLIER_LAYER).fake_quant.local.sqnr_db:.1f} -> "
          f"{report_after.row(WEIGHT_OUTLIER_LAYER).fake_quant.local.sqnr_db:.1f} dB")
    print("  ", str(qatfx.summary(prepared_fixed)).splitlines()[-1])
    return TutorialResult(before, after, report, report_after)


if __name__ == "__main__":
    main(*sys.argv[1:])
