"""Measure the SQNR table of docs/numerics_for_users.md with qatfx.debug.compare.

    python docs/sqnr_table.py        # ~3 minutes on 2 busy CPU cores

Two models, no QAT (post-training quantization of the float weights):
- "trained": the float character LM `qatfx demo` trains (default preset: dim 128, 4
  layers, SwiGLU 384), loaded from its cache (run `qatfx demo` once first; skipped if
  absent), on 4 windows of 128 characters of the held-out test text;
- "random": the same architecture at dim 256 / SwiGLU 768 / 2 layers, random init
  (normal, std 0.02), on 4 x 128 random tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from dataclasses import asdict

import torch

import qatfx
from qatfx.debug.compare import compare
from qatfx.recipes.corpus import CharTokenizer, corpus_text, default_cache_dir, split_text
from qatfx.recipes.demo import PRESETS
from qatfx.recipes.model import CausalLM, LMConfig

SCHEMES = {
    "8da4w g32": lambda: qatfx.Int8DynActInt4WeightQuantizer(32),
    "8da4w g128": lambda: qatfx.Int8DynActInt4WeightQuantizer(128),
    "8da4w g256": lambda: qatfx.Int8DynActInt4WeightQuantizer(256),
    "int4 weight-only g32": lambda: qatfx.Int4WeightOnlyQuantizer(32),
    "int4 weight-only g128": lambda: qatfx.Int4WeightOnlyQuantizer(128),
    "int8 weight-only": lambda: qatfx.Int8WeightOnlyQuantizer(),
}


def trained_model():
    """The demo's cached float model (default preset) and test windows, or None."""
    preset = PRESETS["default"]
    cache = default_cache_dir()
    text, _ = corpus_text(None, cache)
    splits = split_text(text)
    tokenizer = CharTokenizer.from_text(splits.train)
    config = LMConfig(vocab_size=tokenizer.vocab_size, **preset.model)
    corpus_sha = hashlib.sha256(text.encode()).hexdigest()
    key = hashlib.sha256(json.dumps([config.to_dict(), asdict(preset.pretrain), corpus_sha]).encode()).hexdigest()[:16]
    path = cache / "models" / f"charlm-{key}.pt"
    if not path.exists():
        return None
    model = CausalLM(config)
    model.load_state_dict(torch.load(path, weights_only=True))
    test = tokenizer.encode(splits.test[:4 * 128])
    return model.eval(), test.reshape(4, 128)


def random_model():
    torch.manual_seed(0)
    model = CausalLM(LMConfig(vocab_size=96, dim=256, layers=2, heads=4, hidden=768, max_seq=128)).eval()
    return model, torch.randint(0, 96, (4, 128), generator=torch.Generator().manual_seed(1))


def _median(values):
    values = [v for v in values if v is not None]
    return f"{statistics.median(values):.1f}" if values else "-"


def main() -> None:
    logging.getLogger("qatfx").setLevel(logging.ERROR)  # skipped-layer warnings: the table says it
    print("| model | scheme | quantized layers | median local SQNR dB | worst layer dB | median weights-only / activations-only dB | logits SQNR dB |")
    print("|---|---|---|---|---|---|---|")
    for name, made in (("trained", trained_model()), ("random", random_model())):
        if made is None:
            print(f"| {name} | (no cached demo model: run `qatfx demo` first) | | | | | |")
            continue
        model, batch = made
        example = batch[:2, :16].clone()
        for scheme, quantizer in SCHEMES.items():
            try:
                prepared = qatfx.prepare_pt2e(model, quantizer(), (example,))
            except ValueError:  # no layer's K is a multiple of the group size
                print(f"| {name} | {scheme} | 0 (group does not divide K) | | | | |")
                continue
            report = compare(model, prepared, [batch])
            rows = [r for r in report.rows if r.quantized]
            local = [r.fake_quant.local.sqnr_db for r in rows]
            w_only = _median([r.fake_quant.weights_only.sqnr_db for r in rows])
            a_only = _median([r.fake_quant.activations_only.sqnr_db for r in rows])
            logits = report.row("lm_head").fake_quant.end_to_end.sqnr_db
            print(
                f"| {name} | {scheme} | {len(rows)}/{len(report.rows)} | {statistics.median(local):.1f} | {min(local):.1f} | "
                f"{w_only} / {a_only} | {logits:.1f} |"
            )


if __name__ == "__main__":
    main()
