"""`qatfx finetune` / `qatfx eval`: QAT of the user's causal LM on the user's text file.

Models: a local Hugging Face transformers checkpoint directory (`save_pretrained` output;
its tokenizer is used when the directory has one, UTF-8 bytes otherwise) or a built-in
config (`builtin:charlm`, a fresh character-level Llama-style model).

finetune runs the demo's comparison (qatfx/recipes/demo.py) on the user's model: a float
control fine-tuned for the same steps, data and seed as QAT, PTQ of that control, and QAT.
With --distill, QAT trains on (1 - kd_weight) x cross-entropy + kd_weight x distillation
from the float model before fine-tuning (a frozen teacher, qatfx.frozen_teacher); the float
control keeps plain cross-entropy (the reference).
It writes to --out:

    program.pt2, weights.safetensors, qatfx_manifest.json   the QAT-converted model, written
                          by `qatfx.save` (so `qatfx.load(OUT)` reads it)
    qatfx_finetune.json   what `qatfx eval` needs besides the model: the tokenizer, the
                          sequence length and context size (the qatfx version is in the manifest)
    tokenizer/            the checkpoint's transformers tokenizer, when it has one
    peft_adapter/         --lora-rank: the trained adapters in peft's layout (before merging)
    report.md, report.json, training_curve.png

`qatfx eval --model OUT` loads that directory with `qatfx.load` and scores a text file.
"""

from __future__ import annotations

import copy
import inspect
import json
import time
from collections import Counter
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

import qatfx
from qatfx.distillation import teacher_memory
from qatfx.recipes.corpus import CharTokenizer, load_text, split_text
from qatfx.recipes.demo import LORA_TARGETS, deployable, recovered
from qatfx.recipes.model import CausalLM, LMConfig
from qatfx.recipes.train import Distillation, TrainConfig, perplexity, train

log = logging.getLogger("qatfx.recipes")

BUILTIN_MODELS = {"builtin:charlm": dict(dim=128, layers=4, heads=4, hidden=384, max_seq=256)}
SIDECAR = "qatfx_finetune.json"
HF_TOKENIZER_DIR = "tokenizer"
PEFT_ADAPTER_DIR = "peft_adapter"  # --lora-rank: the adapters alone (qatfx.export.save_peft_adapters)
OLD_METADATA = "qatfx_model.json"  # the layout before qatfx.save (converted.pt + this file)
MANIFEST = "qatfx_manifest.json"  # qatfx.save's; its presence marks a finetune output
# --distill without --kd-weight: half cross-entropy on the text, half the float model's
# distribution (1.0, LLM-QAT's, would ignore the text the float control fine-tunes on)
DEFAULT_KD_WEIGHT = 0.5


class LogitsOnly(nn.Module):
    """A transformers causal LM as tokens -> logits, the signature the training loop needs.
    `use_cache=False`: with the cache on, forward returns a DynamicCache, which torch.export
    cannot return (docs/models.md, workarounds)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


@dataclass(frozen=True)
class Tokenizer:
    """Text -> token ids: UTF-8 bytes, characters (builtin:charlm) or a transformers tokenizer."""

    kind: str  # "bytes", "chars" or "hf"
    chars: Optional[CharTokenizer] = None
    hf: Any = None

    def encode(self, text: str) -> torch.Tensor:
        if self.kind == "bytes":
            return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        if self.kind == "chars":
            return self.chars.encode(text)
        return torch.tensor(self.hf(text)["input_ids"], dtype=torch.long)

    def to_json(self, out: Path) -> dict:
        """The sidecar's description; a transformers tokenizer is saved into out/tokenizer/
        so that the output directory does not depend on the checkpoint it came from."""
        if self.kind == "chars":
            return json.loads(self.chars.to_json())
        if self.kind == "hf":
            self.hf.save_pretrained(out / HF_TOKENIZER_DIR)
            return {"kind": "hf", "directory": HF_TOKENIZER_DIR}
        return {"kind": "bytes"}

    @classmethod
    def from_json(cls, data: dict, out: Path) -> "Tokenizer":
        if data["kind"] == "chars":
            return cls("chars", chars=CharTokenizer.from_json(json.dumps(data)))
        if data["kind"] == "hf":
            from transformers import AutoTokenizer

            return cls("hf", hf=AutoTokenizer.from_pretrained(out / data["directory"]))
        return cls("bytes")


@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module
    tokenizer: Tokenizer
    linear_in_features: tuple[int, ...]  # every K a group size must divide
    max_positions: Optional[int]  # the longest sequence the model takes (None: no limit known)


def linear_in_features(module: nn.Module) -> tuple[int, ...]:
    """K (input size) of every linear layer, read from the weights, not from config names
    (intermediate_size, n_inner, ... differ per family): nn.Linear stores its weight (N, K),
    transformers' Conv1D (GPT-2) stores it (K, N)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # builtin models only
        Conv1D = ()  # noqa: N806
    sizes = set()
    for m in module.modules():
        if isinstance(m, nn.Linear):
            sizes.add(m.in_features)
        elif isinstance(m, Conv1D):
            sizes.add(m.weight.shape[0])
    return tuple(sorted(sizes))


def _hf_tokenizer(directory: Path):
    if not any((directory / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def load_model(source: str, text: str) -> LoadedModel:
    """The float model named by `source` (in eval mode), with the tokenizer to feed it.
    `text` gives builtin:charlm its character vocabulary."""
    if source in BUILTIN_MODELS:
        chars = CharTokenizer.from_text(text)
        config = LMConfig(vocab_size=chars.vocab_size, **BUILTIN_MODELS[source])
        torch.manual_seed(0)
        module = CausalLM(config).eval()
        return LoadedModel(module, Tokenizer("chars", chars=chars), linear_in_features(module), config.max_seq)
    from transformers import AutoModelForCausalLM

    directory = Path(source)
    # float32 whatever the checkpoint's dtype (transformers 5 would load bf16 weights as bf16)
    lm = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    hf_tok = _hf_tokenizer(directory)
    if hf_tok is not None:
        tokenizer = Tokenizer("hf", hf=hf_tok)
    elif lm.config.vocab_size < 256:
        raise ValueError(
            f"{directory} has no tokenizer and a vocabulary of {lm.config.vocab_size}, fewer than the 256 byte values "
            "qatfx would feed it; save the model's tokenizer into it (tokenizer.save_pretrained(directory))"
        )
    else:
        tokenizer = Tokenizer("bytes")
    # GPT2Config maps max_position_embeddings to n_positions; RoPE models name their context size the same way
    max_positions = getattr(lm.config, "max_position_embeddings", None)
    return LoadedModel(LogitsOnly(lm).eval(), tokenizer, linear_in_features(lm), max_positions)


def check_group_size(model: LoadedModel, group_size: int) -> None:
    bad = sorted({k for k in model.linear_in_features if k % group_size})
    if bad:
        raise ValueError(f"group size {group_size} does not divide the linear input size(s) {bad}; pick a divisor of {min(model.linear_in_features)} such as 32")


def check_seq_len(seq_len: int, max_positions: Optional[int]) -> None:
    """A window longer than the model's context fails deep inside it (GPT-2: an index error)."""
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's context of {max_positions} positions; pass --seq-len {max_positions} or less")


@dataclass(frozen=True)
class FinetuneOptions:
    model: str
    text: Path
    out: Path
    group_size: Optional[int] = None  # None: 32, or the preset's own
    preset: Optional[str] = None  # a qatfx.presets name: per-layer schemes instead of 8da4w everywhere
    # the weight scales' dtype: bfloat16 is the grid ExecuTorch stores and GGUF (fp16) and a
    # bf16 checkpoint hold exactly; float32 (torchao's default) is rounded by all three
    scales_precision: str = "float32"
    steps: int = 100
    lr: float = 1e-4
    fake_quant_after: int = 0
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0
    compile: bool = True
    # QAT+LoRA when set: only rank-r adapters train (control and QAT alike), merged before convert
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None  # default 2 x rank, as torchtune's recipes
    lora_mode: str = "merge_consistent"
    lora_targets: tuple[str, ...] = LORA_TARGETS
    # knowledge distillation for QAT (the control trains on cross-entropy alone)
    distill: bool = False
    kd_weight: Optional[float] = None  # default DEFAULT_KD_WEIGHT
    temperature: Optional[float] = None  # default 1.0
    # QAT trains its weight scales (docs/learnable_scales.md); the control's PTQ keeps the rule's
    learnable_scales: bool = False
    scale_lr: Optional[float] = None  # default: --lr

    def quantizer(self) -> qatfx.Quantizer:
        if self.preset is None:
            return qatfx.Int8DynActInt4WeightQuantizer(self.weight_group_size(), scales_precision=getattr(torch, self.scales_precision))
        make = qatfx.presets.PRESETS[self.preset]
        return make() if self.group_size is None else make(group_size=self.group_size)

    def weight_group_size(self) -> int:
        """The body's group size: --group-size, else the preset's default, else 32."""
        if self.group_size is not None:
            return self.group_size
        if self.preset is None:
            return 32
        default = inspect.signature(qatfx.presets.PRESETS[self.preset]).parameters.get("group_size")
        return default.default if default is not None else 32

    def check(self) -> None:
        if self.preset is not None:
            if self.preset not in qatfx.presets.PRESETS:
                raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(qatfx.presets.PRESETS)}")
            takes_group = "group_size" in inspect.signature(qatfx.presets.PRESETS[self.preset]).parameters
            if self.group_size is not None and not takes_group:
                raise ValueError(f"--preset {self.preset} fixes its group size (32, llama.cpp's blocks); drop --group-size")
            if self.scales_precision != "float32":
                raise ValueError(f"--preset {self.preset} fixes its scales' dtypes (qatfx.presets.{self.preset}); drop --scales-precision")
        if not 0 <= self.fake_quant_after < self.steps:
            raise ValueError(
                f"--fake-quant-after {self.fake_quant_after} must be in [0, --steps {self.steps}): "
                "QAT would never train with fake-quant; lower it or raise --steps"
            )
        self.lora()  # qatfx.LoRA checks rank, alpha and mode before any model is loaded
        self.check_distillation()
        if self.scale_lr is not None and not self.learnable_scales:
            raise ValueError("--scale-lr sets the learned scales' learning rate; add --learnable-scales to train them")
        if self.scale_lr is not None and not (math.isfinite(self.scale_lr) and self.scale_lr > 0):
            raise ValueError(f"--scale-lr {self.scale_lr} must be > 0")
        if self.learnable_scales and self.lora_rank is not None and self.lora_mode == "torchtune":
            raise ValueError("--learnable-scales with LoRA needs --lora-mode merge_consistent (torchtune mode caches fq(W))")

    def check_distillation(self) -> None:
        given = [flag for flag, value in (("--kd-weight", self.kd_weight), ("--temperature", self.temperature)) if value is not None]
        if given and not self.distill:
            raise ValueError(f"{' / '.join(given)} configure distillation; add --distill to train QAT with it")
        if self.kd_weight is not None and not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"--kd-weight {self.kd_weight} must be in [0, 1]: loss = (1 - W) x cross-entropy + W x distillation "
                             "(1: distillation only)")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"--temperature {self.temperature} must be > 0 (1: the models' own distributions; higher: softer)")

    def distillation(self, teacher: nn.Module) -> Distillation:
        return Distillation(teacher, kd_weight=DEFAULT_KD_WEIGHT if self.kd_weight is None else self.kd_weight,
                            temperature=1.0 if self.temperature is None else self.temperature)

    def lora(self) -> Optional[qatfx.LoRA]:
        if self.lora_rank is None:
            return None
        alpha = 2 * self.lora_rank if self.lora_alpha is None else self.lora_alpha
        return qatfx.LoRA(self.lora_rank, alpha, targets=self.lora_targets, mode=self.lora_mode)


def _fine_tune(prepared: nn.Module, tokens: torch.Tensor, config: TrainConfig, desc: str, compile: bool, fake_quant_after: int = 0,
               distill: Optional[Distillation] = None) -> list[float]:
    # One global seed per run: dropout (GPT-2) draws the same masks in the control and QAT.
    torch.manual_seed(config.seed)
    hook = None
    if fake_quant_after:
        schedule = qatfx.FakeQuantAfterNSteps(prepared, fake_quant_after)
        # train() calls the hook before each step; the schedule counts finished steps
        hook = lambda step: schedule.step() if step > 0 else None  # noqa: E731
    return train(prepared, tokens, config, desc=desc, step_hook=hook, compile=compile, distill=distill)


def finetune(options: FinetuneOptions) -> dict:
    options.check()
    text = load_text(options.text)
    splits = split_text(text)
    loaded = load_model(options.model, splits.train)
    check_group_size(loaded, options.weight_group_size())
    check_seq_len(options.seq_len, loaded.max_positions)
    encode = loaded.tokenizer.encode
    train_tokens, test_tokens = encode(splits.train), encode(splits.test)
    quantizer = options.quantizer()
    example = train_tokens[: 2 * 16].view(2, 16)
    seq = options.seq_len
    config = TrainConfig(steps=options.steps, batch_size=options.batch_size, seq_len=seq, lr=options.lr,
                         warmup_steps=min(10, options.steps // 5), seed=options.seed, scale_lr=options.scale_lr)

    model = loaded.module
    lora = options.lora()
    ppl = {"float_start": perplexity(model, test_tokens, seq, desc="eval float (start)")}
    # Exported in eval mode (docs/models.md: no attention dropout in GPT-2's graph; residual
    # dropout still follows .train()). Control and QAT train this one graph, so they differ
    # only in fake-quant (with LoRA: both train adapters on the same frozen base).
    adapters_rng = torch.get_rng_state()  # LoRA's adapters start alike in control and QAT
    control = qatfx.prepare_pt2e(model.eval(), quantizer, (example,), lora=lora)  # trains `model`'s parameters in place
    if options.learnable_scales:  # the same graph plus trained scales, on a copy of the starting weights
        torch.set_rng_state(adapters_rng)
        qat = qatfx.prepare_pt2e(copy.deepcopy(model), quantizer.with_learnable_scales(), (example,), lora=lora)
    else:
        qat = copy.deepcopy(control)  # its own parameters, from the same starting weights
    # The float model before fine-tuning, frozen; built before either run trains: it copies
    # what the control trains in place (every weight in full QAT, nothing with LoRA)
    distill = options.distillation(_teacher(model, (control, qat), options.model)) if options.distill else None
    qatfx.disable_fake_quant(control)  # disabled fake-quant is an exact identity: the float model
    seconds = {}
    start = time.perf_counter()
    curves = {"float control": _fine_tune(control, train_tokens, config, "float control", options.compile)}
    seconds["float control"] = time.perf_counter() - start
    # LoRA leaves `model` as it was: its adapters live in the control graph
    ppl["float_control"] = perplexity(model if lora is None else control, test_tokens, seq, desc="eval float control")
    # convert quantizes every fake-quant, enabled or not: PTQ of the fine-tuned control
    ppl["ptq"] = perplexity(qatfx.convert_pt2e(deployable(control)), test_tokens, seq, desc="eval PTQ")
    start = time.perf_counter()
    curves["QAT"] = _fine_tune(qat, train_tokens, config, "QAT", options.compile, options.fake_quant_after, distill)
    seconds["QAT"] = time.perf_counter() - start
    kd_report = None
    if distill is not None:
        curves["QAT cross-entropy"] = distill.parts["cross_entropy"]
        curves["QAT distillation"] = distill.parts["distillation"]
        kd_report = _distillation_report(distill)
        distill = None  # frees the teacher's copies before convert and evaluation
    qatfx.enable_fake_quant(qat)
    ppl["qat_fake_quant"] = perplexity(qat, test_tokens, seq, desc="eval QAT fake-quant")

    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in (SIDECAR, OLD_METADATA, "converted.pt"):  # a previous run's must not describe this model
        (out / stale).unlink(missing_ok=True)
    qatfx.save(qatfx.convert_pt2e(deployable(qat)), out)
    # The saved model, loaded back: exactly what `qatfx eval --model OUT` scores.
    ppl["qat_converted"] = perplexity(qatfx.load(out), test_tokens, seq, desc="eval QAT converted")
    # torchtune-mode LoRA deploys fq(W + sBA), not the trained fq(W) + sBA: the report shows the gap
    if ppl["qat_converted"] != ppl["qat_fake_quant"] and options.lora_mode != "torchtune":
        raise RuntimeError(
            f"the saved converted model's perplexity {ppl['qat_converted']!r} != the fake-quant model's "
            f"{ppl['qat_fake_quant']!r}; the prepare/convert/save numerics contract is broken, please report it"
        )
    adapter = None if lora is None else _save_adapters(qat, out, options.model)
    sidecar = {"model": options.model, "tokenizer": loaded.tokenizer.to_json(out), "seq_len": seq,
               "max_positions": loaded.max_positions}
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    report = {"options": {k: str(v) for k, v in asdict(options).items()}, "test_tokens": test_tokens.numel(),
              "trainable_parameters": sum(p.numel() for p in qat.parameters() if p.requires_grad),
              "peft_adapter": adapter,
              "layer_schemes": dict(Counter(r.scheme for r in qatfx.summary(qat).layers)),
              "test_perplexity": ppl, "recovered": recovered(ppl["float_control"], ppl["ptq"], ppl["qat_converted"]),
              "distillation": kd_report,
              "train_seconds": seconds, "train_loss": curves}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(options, report))
    _plot_curves(curves, out / "training_curve.png")
    log.info("qatfx finetune: wrote %s", out)
    return report


def _teacher(model: nn.Module, students: tuple, source: str) -> nn.Module:
    if source in BUILTIN_MODELS:
        log.warning("qatfx finetune --distill: %s starts from random weights, so its teacher predicts almost uniformly; "
                    "distillation from it measures the cost, not a benefit", source)
    return qatfx.frozen_teacher(model, students)


def _distillation_report(distill: Distillation) -> dict:
    memory = teacher_memory(distill.teacher)
    return {"kd_weight": distill.kd_weight, "temperature": distill.temperature,
            "teacher": "the float model before fine-tuning, frozen (qatfx.frozen_teacher)",
            "teacher_copied_bytes": memory.copied_bytes, "teacher_shared_bytes": memory.shared_bytes,
            "teacher_copied_tensors": len(memory.copied)}


def _save_adapters(qat: nn.Module, out: Path, model: str) -> Optional[str]:
    """The trained adapters alone in peft's layout, under out/peft_adapter; a model whose
    layers have no Hugging Face names gets none (logged): the merged, converted model is the
    deployable result either way."""
    from qatfx.export.peft import save_peft_adapters

    base = None if model in BUILTIN_MODELS else str(Path(model).resolve())
    try:
        return str(save_peft_adapters(qat, out / PEFT_ADAPTER_DIR, base_model_name_or_path=base))
    except ValueError as error:
        log.warning("qatfx finetune: the LoRA adapters were not written in peft's layout: %s", error)
        return None


def load_finetuned(directory: Path) -> tuple[nn.Module, Tokenizer, dict]:
    """A `finetune` output: the converted model (qatfx.load), its tokenizer and the sidecar."""
    directory = Path(directory)
    if (directory / OLD_METADATA).exists() and not (directory / MANIFEST).exists():
        raise ValueError(
            f"{directory} was written by an older `qatfx finetune` (converted.pt + {OLD_METADATA}), which this qatfx "
            "no longer reads; re-run `qatfx finetune` to write it in the qatfx.save format"
        )
    if not (directory / SIDECAR).exists():
        raise ValueError(
            f"{directory} has no {SIDECAR} (the tokenizer description `qatfx finetune` writes after the model); "
            "it is not a finished finetune output: re-run `qatfx finetune`, or load a bare qatfx.save directory with qatfx.load"
        )
    sidecar = json.loads((directory / SIDECAR).read_text())
    return qatfx.load(directory), Tokenizer.from_json(sidecar["tokenizer"], directory), sidecar


@dataclass(frozen=True)
class ExportContext:
    """What file-format exports need besides the converted model: its architecture config,
    its character vocabulary (builtin:charlm) or its transformers tokenizer directory."""

    config: Any
    vocabulary: Optional[tuple] = None
    tokenizer_dir: Optional[Path] = None


def export_context(directory: Path) -> ExportContext:
    """The ExportContext of a `finetune` output, from its sidecar: builtin models rebuild their
    config; a transformers model's config is read from the checkpoint it was fine-tuned from."""
    directory = Path(directory)
    if not (directory / SIDECAR).exists():
        raise ValueError(
            f"{directory} has no {SIDECAR}: GGUF and HF exports need the model's config and tokenizer, which a "
            "`qatfx finetune` output records; from Python, call qatfx.export.gguf / qatfx.export.hf with config="
        )
    sidecar = json.loads((directory / SIDECAR).read_text())
    tokenizer = sidecar["tokenizer"]
    if sidecar["model"] in BUILTIN_MODELS:
        chars = CharTokenizer.from_json(json.dumps(tokenizer))
        config = LMConfig(vocab_size=chars.vocab_size, **BUILTIN_MODELS[sidecar["model"]])
        return ExportContext(config, vocabulary=tuple(chars.chars))
    from transformers import AutoConfig

    source = Path(sidecar["model"])
    if not (source / "config.json").exists():
        raise ValueError(
            f"{directory} was fine-tuned from {source}, whose config.json is not here; GGUF and HF exports read the "
            "architecture from it: make that checkpoint available at this path"
        )
    tokenizer_dir = directory / tokenizer["directory"] if tokenizer["kind"] == "hf" else None
    return ExportContext(AutoConfig.from_pretrained(source), tokenizer_dir=tokenizer_dir)


def is_finetune_output(directory: Path) -> bool:
    return any((Path(directory) / name).exists() for name in (MANIFEST, OLD_METADATA, SIDECAR))


def evaluate(model: str, text_path: Path, seq_len: Optional[int] = None) -> float:
    """Perplexity of the whole text file under `model`: a finetune output (its sequence
    length unless `seq_len` is given, so that the test split reproduces the report), a
    transformers directory or a built-in (128 unless given)."""
    text = load_text(text_path)
    if model not in BUILTIN_MODELS and is_finetune_output(Path(model)):
        module, tokenizer, sidecar = load_finetuned(Path(model))
        seq_len = seq_len or sidecar["seq_len"]
        check_seq_len(seq_len, sidecar["max_positions"])
    else:
        loaded = load_model(model, text)
        module, tokenizer, seq_len = loaded.module, loaded.tokenizer, seq_len or 128
        check_seq_len(seq_len, loaded.max_positions)
    return perplexity(module, tokenizer.encode(text), seq_len)


def _markdown(options: FinetuneOptions, report: dict) -> str:
    ppl = report["test_perplexity"]
    control = ppl["float_control"]

    def vs_control(value: float) -> str:
        return f"{100 * (value / control - 1):+.2f}%"

    rows = [("float, before fine-tuning (start)", ppl["float_start"], ""),
            ("float control (fine-tuned, no fake-quant)", control, ""),
            ("PTQ of the float control", ppl["ptq"], vs_control(ppl["ptq"])),
            ("QAT fake-quant", ppl["qat_fake_quant"], vs_control(ppl["qat_fake_quant"])),
            ("QAT converted (saved in this directory)", ppl["qat_converted"], vs_control(ppl["qat_converted"]))]
    share = report["recovered"]
    lines = [
        f"# qatfx finetune: {options.model}", "",
        f"- text: {options.text}; train: the first 90%, test: the last 5% ({report['test_tokens']:,} tokens)",
        f"- {_scheme_text(options, report)}; {options.steps} steps, "
        f"lr {options.lr}, batch {options.batch_size} x {options.seq_len} tokens, seed {options.seed}, "
        f"fake-quant after {options.fake_quant_after} steps",
        *_lora_lines(options, report),
        *_distillation_lines(report),
        "- perplexity: exp(mean next-token NLL) on the test split, windows of the sequence length; lower is better",
        "- float control: the float model fine-tuned for the same steps, data and seed as QAT (the same graph with "
        "fake-quant off); PTQ: that control converted directly; QAT: the float model fine-tuned with fake-quant, "
        "then converted. Comparing with the control keeps QAT's extra steps from counting as recovery",
        "- QAT recovers: (PTQ - QAT converted) / (PTQ - float control); one seed, so when PTQ loses little this "
        "share is noise (`qatfx demo --seeds N` shows the spread on the demo model)",
        "- QAT converted: the model saved here (qatfx.load), the number `qatfx eval` gives on the test split; "
        + ("in torchtune LoRA mode not the fake-quant model's (above)" if options.lora_mode == "torchtune" and options.lora()
           else "equal to the fake-quant model's (checked)"),
        "",
        "| model | test perplexity | vs float control |", "|---|---|---|",
        *(f"| {name} | {value:.4f} | {delta} |" for name, value, delta in rows),
        "",
        f"QAT recovers: {'n/a (PTQ lost nothing)' if share is None else f'{100 * share:.0f}%'} of PTQ's loss.",
    ]
    return "\n".join(lines) + "\n"


def _scheme_text(options: FinetuneOptions, report: dict) -> str:
    if options.preset is None:
        return (f"8da4w (int8 per-token activations, int4 weights in groups of {options.weight_group_size()}, "
                f"{options.scales_precision} scales)")
    layers = ", ".join(f"{n} {scheme}" for scheme, n in report["layer_schemes"].items())
    return f"preset {options.preset} (qatfx.presets; group size {options.weight_group_size()}): {layers}"


def _lora_lines(options: FinetuneOptions, report: dict) -> list:
    lora = options.lora()
    if lora is None:
        return [f"- full fine-tuning: {report['trainable_parameters']:,} trainable parameters"]
    ppl = report["test_perplexity"]
    lines = [f"- LoRA ({lora.mode}): rank {lora.rank}, alpha {lora.alpha:g} on {', '.join(lora.targets)}, "
             f"{report['trainable_parameters']:,} trainable parameters; the control trains the same adapters in float; "
             "both are merged (qatfx.merge_lora) before convert"]
    if lora.mode == "torchtune":
        lines.append(f"- torchtune mode trained fq(W) x_q + sBA x but deploys fq(W + sBA) x_q: the merge moved the test "
                     f"perplexity from {ppl['qat_fake_quant']:.4f} to {ppl['qat_converted']:.4f} "
                     f"({100 * (ppl['qat_converted'] / ppl['qat_fake_quant'] - 1):+.2f}%)")
    return lines


def _distillation_lines(report: dict) -> list:
    kd = report["distillation"]
    if kd is None:
        return []
    w, t = kd["kd_weight"], kd["temperature"]
    return [f"- distillation (QAT only): loss = {1 - w:g} x cross-entropy + {w:g} x KL(teacher || student) x T^2 at "
            f"T = {t:g}; teacher: the float model before fine-tuning, frozen ({kd['teacher_copied_bytes']:,} bytes copied, "
            f"{kd['teacher_shared_bytes']:,} shared with the model); the float control trains on cross-entropy alone, "
            "so the QAT curve is not the control's quantity (report.json has its two terms)"]


def _plot_curves(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, losses in curves.items():
        ax.plot(losses, label=label, linewidth=1)
    ax.set(xlabel="step", ylabel="training loss", title="Float control and QAT fine-tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
