"""Choose the demo's QAT+KD / QAT+LSQ hyperparameters on the validation split (never the
test split): one fine-tuning seed, the int3 per-channel row, perplexity on the validation
split's first `eval_chars` characters. Prints one table; the chosen values go into
qatfx/recipes/demo.py's Preset (kd_weight, temperature, scale_lr).

    python benchmarks/tune_demo_recovery.py [--preset default] [--row "int3 per-channel"]
"""

from __future__ import annotations

import argparse
import time

from qatfx.recipes.corpus import default_cache_dir
from qatfx.recipes.demo import PRESETS, SCHEMES, demo_setup, finetune_config, prepare_row, qat_config
from qatfx.recipes.train import perplexity

CANDIDATES = [  # (variant, overrides of the preset's kd_weight / temperature / scale_lr)
    ("", {}),
    (" QAT+KD", {"kd_weight": 0.5, "temperature": 1.0}),
    (" QAT+KD", {"kd_weight": 1.0, "temperature": 1.0}),
    (" QAT+LSQ", {"scale_lr": 1e-5}),
    (" QAT+LSQ", {"scale_lr": 1e-4}),
    (" QAT+LSQ", {"scale_lr": 1e-3}),
]


def _selected(only: str) -> list:
    """--only 0,3: the candidates by index (a run cut short, continued)."""
    return CANDIDATES if not only else [CANDIDATES[int(i)] for i in only.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=tuple(PRESETS))
    parser.add_argument("--row", default="int3 per-channel")
    parser.add_argument("--only", default="", help="comma-separated candidate indices (default: all)")
    args = parser.parse_args()
    setup = demo_setup(PRESETS[args.preset], None, default_cache_dir())
    finetune = finetune_config(setup.preset, seed=0)
    seq = setup.preset.pretrain.seq_len
    print(f"| row | hyperparameters | validation perplexity | seconds |\n|---|---|---|---|")
    for variant, hyper in _selected(args.only):
        scheme = SCHEMES[args.row + variant]
        started = time.perf_counter()
        prepared = prepare_row(setup, scheme, finetune.seed)
        config, distill = qat_config(setup, scheme, finetune, prepared, **hyper)
        setup.train(prepared, config, desc=scheme.name, distill=distill)
        ppl = perplexity(prepared, setup.validation_tokens, seq, desc="validation")
        shown = ", ".join(f"{k}={v:g}" for k, v in hyper.items()) or "-"
        print(f"| {scheme.name} | {shown} | {ppl:.4f} | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
