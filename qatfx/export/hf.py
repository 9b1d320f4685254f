"""`qatfx.export.hf(converted, out_dir)`: a Hugging Face model directory in compressed-tensors'
format, which transformers (with the compressed-tensors package) loads on any device and vLLM
serves on a GPU: int4 / int8 weight-only linears as "pack-quantized" W4A16 / W8A16 (vLLM's
Marlin kernels), 8da8w linears as "int-quantized" W8A8 (int8 weights, int8 dynamic per-token
activations), one config group per scheme.

What is written (the layout read from compressed-tensors 0.20's `PackedQuantizationCompressor`,
`IntQuantizationCompressor` and `pack_to_int32`, and transformers' `CompressedTensorsHfQuantizer`,
not guessed):

    config.json         the model's config (its own transformers config, or a LlamaConfig built
                        from a recipes LMConfig) with `quantization_config`: quant_method
                        "compressed-tensors", quantization_status "compressed", one config group
                        per distinct scheme (`hf_layout.CtScheme`) with its weights {num_bits,
                        type int, symmetric, strategy group / channel, group_size} and, for W8A8,
                        input_activations {8 bits, strategy token, dynamic, asymmetric}; the
                        group's `format`, and the global one (the groups' format, or
                        "mixed-precision" when they differ). One group targets "Linear" (and
                        lm_head by name, which vLLM's ParallelLMHead needs); several list their
                        modules by name. `ignore`: the linears written in float
    model.safetensors   per pack-quantized linear `<module>.weight_packed` (int32 (N, K*b/32): the
                        trained codes packed by compressed-tensors' own `pack_to_int32`, i.e.
                        code + 2^(b-1), element i of a row at bits b*(i % (32/b)) of word
                        i // (32/b)), `<module>.weight_scale` ((N, K/G) in the checkpoint dtype)
                        and `<module>.weight_shape` (int64 [N, K]); per int-quantized linear
                        `<module>.weight` (int8 (N, K): the codes as they are) and
                        `<module>.weight_scale` ((N, 1)); every other tensor (embedding, norms, a
                        float lm_head) under its HF name in the checkpoint dtype
    generation_config.json, tokenizer files   when the model / `tokenizer_dir` has them

The codes are convert's, not a re-quantization of dequantized weights (docs/deploy.md: the
grid must survive export). Scales are stored in the checkpoint dtype, as compressed-tensors
itself stores them (its loader creates `weight_scale` in the model's dtype and dequantizes as
`codes.to(scale.dtype) * scale`); a scale that dtype would round is refused, since the file
would then hold another grid (train with `scales_precision=` the checkpoint dtype).

Activations that no served scheme expresses with those weights (8da4w's int8 activations next
to int4 weights, llama.cpp's Q8_0 activations) are dropped: those layers are written
weight-only, and the report says so, with the measured logit difference.

What goes where is read from the model by `qatfx.export.hf_layout`; this module writes it and
then, by default, checks it with `verify_hf` (`qatfx.export.hf_verify`, re-exported here with
`HfVerifyReport`, `float_error_bound` and `float_activation_copy`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from qatfx.export.hf_layout import (
    FORMAT,
    INT_FORMAT,
    MIXED_FORMAT,
    QUANT_METHOD,
    WEIGHTS_FILE,
    CtScheme,
    _converted_module,
    _Layout,
    _layout,
    _name,
)
from qatfx.export.hf_verify import (
    REDUCTIONS_PER_LAYER,
    HfVerifyReport,
    float_activation_copy,
    float_error_bound,
    verify_hf,
)
from qatfx.export.verify import (
    DEFAULT_MAX_RELATIVE_ERROR,
    DEFAULT_MIN_NEXT_TOKEN_AGREEMENT,
    ExportError,
    VerificationError,
    check_thresholds,
)

__all__ = [
    "CtScheme", "HfExport", "HfVerifyReport", "REDUCTIONS_PER_LAYER", "float_activation_copy", "float_error_bound", "hf", "verify_hf",
]

log = logging.getLogger("qatfx.export")

# Tokenizer files a transformers tokenizer directory may hold (SentencePiece, BPE, fast).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
)


@dataclass
class HfExport:
    path: Path  # the directory
    bytes: int  # of the files written
    files: list  # their names
    quantized_layers: int  # linears written quantized (packed int4 / int8, or int8 W8A8)
    group_size: Optional[int]  # of every quantized linear when they share one scheme; None: per channel, or several
    dtype: torch.dtype  # the checkpoint's (config.json "dtype"; float tensors and scales)
    tied: bool  # tie_word_embeddings in config.json
    ignored: dict = field(default_factory=dict)  # HF linear written in float -> why
    differences: list = field(default_factory=list)  # how the checkpoint (or vLLM serving it) differs from the converted model
    verification: Optional[HfVerifyReport] = None  # None: verify=False
    schemes: dict = field(default_factory=dict)  # CtScheme -> its HF modules, one config group each, in model order

    @property
    def format(self) -> str:
        """quantization_config's global format: the groups' one, or "mixed-precision"."""
        formats = {scheme.format for scheme in self.schemes}
        return formats.pop() if len(formats) == 1 else MIXED_FORMAT

    def __str__(self) -> str:
        head = f"{self.path}: {self.bytes} bytes ({', '.join(self.files)}); compressed-tensors "
        if len(self.schemes) == 1:
            (scheme, modules), = self.schemes.items()
            grouping = "per channel" if scheme.group_size is None else f"group {scheme.group_size}"
            acts = ", int8 per-token activations" if scheme.activations else ""
            head += f"{scheme.format} {scheme.name}, {len(modules)} int{scheme.bits} linears ({grouping}{acts})"
        else:
            head += f"{self.format}, {self.quantized_layers} quantized linears in {len(self.schemes)} config groups"
        lines = [
            f"{head}, {_name(self.dtype)}{', tied embeddings' if self.tied else ''}",
            *(f"  group: {len(modules)} x {scheme.describe()}" for scheme, modules in self.schemes.items() if len(self.schemes) > 1),
            *(f"  float (ignore): {name}: {reason}" for name, reason in self.ignored.items()),
            *(f"  differs: {d}" for d in self.differences),
            *([str(self.verification)] if self.verification is not None else []),
        ]
        return "\n".join(lines)

    def lines(self) -> list:
        """The report as lines (`str(report)` split)."""
        return str(self).splitlines()


def hf(
    converted: torch.nn.Module,
    out_dir: Union[str, os.PathLike],
    *,
    config: Any = None,
    tokenizer_dir: Union[str, os.PathLike, None] = None,
    dtype: Optional[torch.dtype] = None,
    quantize_lm_head: bool = False,
    allow_activation_drop: bool = True,
    verify: bool = True,
    verify_inputs: Optional[Sequence] = None,
    example_kwargs: Optional[dict] = None,
    min_next_token_agreement: float = DEFAULT_MIN_NEXT_TOKEN_AGREEMENT,
    max_relative_error: Optional[float] = None,
) -> HfExport:
    """Write `converted` (from convert_pt2e, a Llama-architecture model) to the directory
    `out_dir` as a compressed-tensors checkpoint: one config group per scheme, W4A16 / W8A16
    (pack-quantized) for weight-only int4 / int8 linears, W8A8 (int-quantized) for 8da8w ones.

    config: the model's transformers LlamaConfig or qatfx.recipes.model.LMConfig (default: the
        model's own `.config`; a whole-model capture has none, so pass it).
    tokenizer_dir: a directory whose tokenizer files are copied beside the weights.
    dtype: the checkpoint dtype (float tensors and scales); default the model's weight dtype.
        A scale it would round is refused (the file would hold another grid).
    quantize_lm_head: write a quantized lm_head quantized too (its own config group when its
        scheme differs from the body's). By default it is written in float as its dequantized
        grid (the same values, exactly) and listed in `ignore`: vLLM before 0.20
        (ParallelLMHead quantization, vllm PR #37291) cannot load a quantized lm_head.
    allow_activation_drop: False refuses a model with quantized activations the file cannot
        keep (8da4w, Q8_0: their layers are written weight-only) instead of writing them and
        reporting the difference. 8da8w layers keep theirs (W8A8).
    verify: check the written files bit for bit and the logits in transformers (`verify_hf`,
        on `verify_inputs`: argument tuples whose first element is the token ids, default
        `held_out_inputs`; the converted model is also given `example_kwargs`); raises
        VerificationError below the thresholds (the directory stays written, for inspection).
    max_relative_error: None: the float-accumulation bound `float_error_bound` (the checkpoint
        and its reference, the converted model without the activation quantization the file
        drops, are the same computation)."""
    if verify:
        check_thresholds(min_next_token_agreement, DEFAULT_MAX_RELATIVE_ERROR if max_relative_error is None else max_relative_error)
    module = _converted_module(converted, "qatfx.export.hf")
    ct = _compressed_tensors()
    target = Path(out_dir)
    _check_out_dir(target)
    layout = _layout(module, config, dtype, quantize_lm_head)
    if layout.activation_layers and not allow_activation_drop:
        raise ExportError(
            f"{len(layout.activation_layers)} linears quantize their activations in a way compressed-tensors cannot "
            f"serve with their weights (e.g. {layout.activation_layers[0]}: 8da4w or Q8_0 activations; only 8da8w's are "
            f"kept, as W8A8); written weight-only ({FORMAT}) they would run with float activations. Pass "
            "allow_activation_drop=True to write it anyway (the report measures the difference), or export to a runtime "
            "with 8da4w kernels (qatfx.export.executorch)"
        )
    target.mkdir(parents=True, exist_ok=True)
    files = _write(layout, target, ct, module, tokenizer_dir)
    report = HfExport(
        path=target,
        bytes=sum((target / name).stat().st_size for name in files),
        files=files,
        quantized_layers=len(layout.packed),
        group_size=layout.group_size,
        dtype=layout.dtype,
        tied=layout.tied,
        ignored=dict(layout.ignore),
        differences=list(layout.differences),
        schemes=dict(layout.groups),
    )
    if verify:
        try:
            report.verification = verify_hf(
                target, module, verify_inputs, kwargs=example_kwargs,
                min_next_token_agreement=min_next_token_agreement, max_relative_error=max_relative_error,
            )
        except VerificationError as exc:
            exc.export = report
            raise
        if report.verification.activation_drop is not None:
            d = report.verification.activation_drop
            report.differences = [
                f"{line} (measured on {d.positions} positions: relative logit error {d.relative_error:.3g}, "
                f"next-token agreement {d.next_token_agreement:.2%})" if line.startswith("activations:") else line
                for line in report.differences
            ]
    log.info("qatfx: %s", report)
    return report


def _compressed_tensors():
    try:
        import compressed_tensors
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
        import transformers  # noqa: F401  (config.json is a transformers config)
    except ImportError as exc:
        raise ExportError(
            f"writing a compressed-tensors checkpoint needs the compressed-tensors and transformers packages ({exc}); "
            "install the hf extra: pip install -e '.[hf]'"
        ) from exc
    return compressed_tensors, pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme



def _check_out_dir(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} is a file; hf writes a directory (config.json, {WEIGHTS_FILE}, ...)")
    stale = sorted(p.name for p in target.glob("*.safetensors*") if p.name != WEIGHTS_FILE) if target.is_dir() else []
    if stale:
        raise ExportError(
            f"{target} already holds {', '.join(stale[:3])}: transformers would load those beside {WEIGHTS_FILE}; "
            "pass an empty directory"
        )


def _quantization_config(layout: _Layout, ct) -> dict:
    """config.json's quantization_config with only the fields that differ from
    compressed-tensors' defaults: vLLM validates each group's `weights` with the
    compressed-tensors version it pins, whose models forbid unknown fields (0.11 lacks
    `scale_dtype` / `zp_dtype`), and reads nothing else we could leave out (docs/export_hf.md
    lists the rules, with vLLM's source lines). One group per scheme: a single group targets
    "Linear" (as llm-compressor writes it); several name their modules, so each layer is
    matched by exactly one group (compressed-tensors and vLLM both try exact names first)."""
    _, _, QuantizationArgs, QuantizationConfig, QuantizationScheme = ct
    groups = layout.groups
    config_groups = {}
    for i, (scheme, modules) in enumerate(groups):
        strategy = dict(strategy="channel") if scheme.group_size is None else dict(strategy="group", group_size=scheme.group_size)
        weights = QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=True, dynamic=False, **strategy)
        activations = None
        if scheme.activations:
            activations = QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="token", dynamic=True)
        if len(groups) == 1:
            # vLLM matches lm_head (a ParallelLMHead, not a Linear) by name only; named first, so that
            # compressed-tensors' matching (first target wins) uses every target and warns of none
            targets = (["lm_head"] if "lm_head" in modules else []) + ["Linear"]
        else:
            targets = list(modules)
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=targets, weights=weights, input_activations=activations, format=scheme.format,
        )
    formats = {scheme.format for scheme, _ in groups}
    config = QuantizationConfig(
        config_groups=config_groups, format=formats.pop() if len(formats) == 1 else MIXED_FORMAT,
        quantization_status="compressed", ignore=sorted(layout.ignore),
    )
    return {"quant_method": QUANT_METHOD, **config.model_dump(exclude_defaults=True, exclude={"quant_method"})}


def _write(layout: _Layout, target: Path, ct, module: torch.nn.Module, tokenizer_dir) -> list:
    from safetensors.torch import save_file

    _, pack_to_int32, *_ = ct
    state, seen = {}, set()
    for name, qw in layout.packed.items():
        scheme: CtScheme = layout.schemes[name]
        if scheme.format == INT_FORMAT:  # compressed-tensors' IntQuantizationCompressor: int8 codes as they are
            state[f"{name}.weight"] = qw.codes.to(torch.int8).contiguous()
        else:
            state[f"{name}.weight_packed"] = pack_to_int32(qw.codes.to(torch.int8).contiguous(), scheme.bits)
            state[f"{name}.weight_shape"] = torch.tensor(list(qw.codes.shape), dtype=torch.int64)
        state[f"{name}.weight_scale"] = qw.scales.to(layout.dtype).contiguous()
    for name, tensor in layout.floats.items():
        tensor = tensor.detach().to(layout.dtype).contiguous()
        if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        state[name] = tensor
    save_file(state, str(target / WEIGHTS_FILE), metadata={"format": "pt"})
    # what save_pretrained writes (the fields that differ from the defaults), the tie stated
    config = layout.config.to_diff_dict() if hasattr(layout.config, "to_diff_dict") else layout.config.to_dict()
    config["tie_word_embeddings"] = layout.tied
    config["quantization_config"] = _quantization_config(layout, ct)
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    files = ["config.json", WEIGHTS_FILE]
    generation = getattr(module, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(str(target))
        files.append("generation_config.json")
    if tokenizer_dir is not None:
        files += _copy_tokenizer(Path(tokenizer_dir), target)
    return files


def _copy_tokenizer(source: Path, target: Path) -> list:
    found = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not source.is_dir() or not found:
        raise ExportError(
            f"tokenizer_dir={source}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); pass the directory "
            "tokenizer.save_pretrained wrote (or the model's checkpoint directory)"
        )
    for name in found:
        if (source / name).resolve() != (target / name).resolve():
            shutil.copyfile(source / name, target / name)
    return found
