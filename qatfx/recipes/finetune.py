"""`qatfx finetune` / `qatfx eval`: QAT of the user's causal LM on the user's text file.

Models: a local Hugging Face transformers checkpoint directory (`save_pretrained` output;
its tokenizer is used when the directory has one, UTF-8 bytes otherwise) or a built-in
config (`builtin:charlm`, a fresh character-level Llama-style model).

finetune writes to --out: `converted.pt` (the converted model's state: packed int4 weights
and scales), `qatfx_model.json` (how to rebuild it: model source, group size, tokenizer),
`report.md` / `report.json` and `training_curve.png`. `qatfx eval --model OUT` rebuilds the
converted model from those two files and scores a text file.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

import qatfx
from qatfx.recipes.corpus import CharTokenizer, load_text, split_text
from qatfx.recipes.model import CausalLM, LMConfig
from qatfx.recipes.train import TrainConfig, perplexity, train

log = logging.getLogger("qatfx.recipes")

BUILTIN_MODELS = {"builtin:charlm": dict(dim=128, layers=4, heads=4, hidden=384, max_seq=256)}
METADATA = "qatfx_model.json"


class LogitsOnly(nn.Module):
    """A transformers causal LM as tokens -> logits (no ModelOutput, no KV cache), the
    signature torch.export and the training loop need."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module
    encode: Callable[[str], torch.Tensor]
    tokenizer: dict  # how to rebuild `encode` (saved in the metadata)
    linear_in_features: tuple[int, ...]  # every K a group size must divide


def _byte_encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def _hf_tokenizer(directory: Path):
    if not any((directory / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def load_model(source: str, text: str, tokenizer: dict | None = None) -> LoadedModel:
    """The float model named by `source`, with the tokenizer to feed it."""
    if source in BUILTIN_MODELS:
        tok = CharTokenizer.from_json(tokenizer["chars"]) if tokenizer else CharTokenizer.from_text(text)
        config = LMConfig(vocab_size=tok.vocab_size, **BUILTIN_MODELS[source])
        torch.manual_seed(0)
        return LoadedModel(CausalLM(config), tok.encode, {"kind": "chars", "chars": tok.to_json()}, (config.dim, config.hidden))
    from transformers import AutoModelForCausalLM

    directory = Path(source)
    lm = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    hf_tok = _hf_tokenizer(directory)
    if hf_tok is not None:
        encode = lambda s: torch.tensor(hf_tok(s)["input_ids"], dtype=torch.long)  # noqa: E731
        kind = {"kind": "hf"}
    else:
        if lm.config.vocab_size < 256:
            raise ValueError(f"{directory} has no tokenizer and a vocabulary of {lm.config.vocab_size} < 256 bytes")
        encode, kind = _byte_encode, {"kind": "bytes"}
    cfg = lm.config
    return LoadedModel(LogitsOnly(lm), encode, kind, (cfg.hidden_size, cfg.intermediate_size))


def check_group_size(model: LoadedModel, group_size: int) -> None:
    bad = sorted({k for k in model.linear_in_features if k % group_size})
    if bad:
        raise ValueError(f"group size {group_size} does not divide the linear input size(s) {bad}; pick a divisor of {min(model.linear_in_features)} such as 32")


@dataclass(frozen=True)
class FinetuneOptions:
    model: str
    text: Path
    out: Path
    group_size: int = 32
    steps: int = 100
    lr: float = 1e-4
    fake_quant_after: int = 0
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0
    compile: bool = True


def finetune(options: FinetuneOptions) -> dict:
    text = load_text(options.text)
    splits = split_text(text)
    loaded = load_model(options.model, splits.train)
    check_group_size(loaded, options.group_size)
    train_tokens, test_tokens = loaded.encode(splits.train), loaded.encode(splits.test)
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(options.group_size)
    example = train_tokens[: 2 * 16].view(2, 16)
    seq = options.seq_len

    float_ppl = perplexity(loaded.module, test_tokens, seq, desc="eval float")
    ptq = qatfx.convert_pt2e(qatfx.prepare_pt2e(copy.deepcopy(loaded.module), quantizer, (example,)))
    ptq_ppl = perplexity(ptq, test_tokens, seq, desc="eval PTQ")
    prepared = qatfx.prepare_pt2e(loaded.module, quantizer, (example,))
    config = TrainConfig(steps=options.steps, batch_size=options.batch_size, seq_len=seq, lr=options.lr,
                         warmup_steps=min(10, options.steps // 5), seed=options.seed)
    delay = qatfx.FakeQuantAfterNSteps(prepared, options.fake_quant_after) if options.fake_quant_after else None
    curve = train(prepared, train_tokens, config, desc="QAT", step_hook=delay, compile=options.compile)
    qatfx.enable_fake_quant(prepared)
    qat_ppl = perplexity(prepared, test_tokens, seq, desc="eval QAT fake-quant")
    converted = qatfx.convert_pt2e(prepared)
    converted_ppl = perplexity(converted, test_tokens, seq, desc="eval QAT converted")

    options.out.mkdir(parents=True, exist_ok=True)
    torch.save(converted.state_dict(), options.out / "converted.pt")
    metadata = {"model": options.model, "group_size": options.group_size, "tokenizer": loaded.tokenizer,
                "example_shape": list(example.shape), "qatfx_version": "0.1.0"}
    (options.out / METADATA).write_text(json.dumps(metadata, indent=2))
    report = {"options": {k: str(v) for k, v in asdict(options).items()}, "test_perplexity": {
        "float": float_ppl, "ptq": ptq_ppl, "qat_fake_quant": qat_ppl, "qat_converted": converted_ppl},
        "train_loss": curve}
    (options.out / "report.json").write_text(json.dumps(report, indent=2))
    (options.out / "report.md").write_text(_markdown(options, report))
    _plot_curve(curve, options.out / "training_curve.png")
    return report


def load_converted(directory: Path, text: str) -> tuple[nn.Module, Callable[[str], torch.Tensor]]:
    """Rebuild a model `finetune` wrote: prepare + convert the same float model, then load
    the saved packed weights and scales (strict: a mismatch is an error, never ignored)."""
    metadata = json.loads((directory / METADATA).read_text())
    loaded = load_model(metadata["model"], text, metadata["tokenizer"])
    example = torch.zeros(metadata["example_shape"], dtype=torch.long)
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(metadata["group_size"])
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(loaded.module, quantizer, (example,)))
    converted.load_state_dict(torch.load(directory / "converted.pt", weights_only=True))
    return converted, loaded.encode


def evaluate(model: str, text_path: Path, seq_len: int = 128) -> float:
    text = load_text(text_path)
    directory = Path(model)
    if (directory / METADATA).exists():
        module, encode = load_converted(directory, text)
    else:
        loaded = load_model(model, text)
        module, encode = loaded.module, loaded.encode
    return perplexity(module, encode(text), seq_len)


def _markdown(options: FinetuneOptions, report: dict) -> str:
    ppl = report["test_perplexity"]
    rows = [("float (before)", ppl["float"]), ("PTQ (float converted)", ppl["ptq"]),
            ("QAT fake-quant", ppl["qat_fake_quant"]), ("QAT converted", ppl["qat_converted"])]
    lines = [f"# qatfx finetune: {options.model}", "",
             f"- text: {options.text} (test split: the last 5%)", f"- 8da4w, group size {options.group_size}, "
             f"{options.steps} steps, lr {options.lr}, fake-quant after {options.fake_quant_after} steps", "",
             "| model | test perplexity |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def _plot_curve(curve: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(curve, linewidth=1)
    ax.set(xlabel="step", ylabel="training loss", title="QAT fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
