"""`qatfx.export.hf(converted, out_dir)`: a Hugging Face model directory in compressed-tensors'
"pack-quantized" W4A16 format, which transformers (with the compressed-tensors package) loads
on any device and vLLM serves with its int4 kernels (Marlin) on a GPU.

What is written (the layout read from compressed-tensors 0.20's `PackedQuantizationCompressor`
and `pack_to_int32`, and transformers' `CompressedTensorsHfQuantizer`, not guessed):

    config.json         the Llama config (the model's own transformers config, or a LlamaConfig
                        built from a recipes LMConfig) with `quantization_config`: quant_method
                        "compressed-tensors", format "pack-quantized", quantization_status
                        "compressed", one config group targeting Linear (and lm_head by name,
                        which vLLM's ParallelLMHead needs) with weights {num_bits 4, type int,
                        symmetric, strategy group, group_size G}, and `ignore`: the linears
                        written in float
    model.safetensors   per quantized linear `<module>.weight_packed` (int32 (N, K/8): the
                        trained codes packed by compressed-tensors' own `pack_to_int32`, i.e.
                        code + 8, element i of a row at bits 4*(i % 8) of word i // 8),
                        `<module>.weight_scale` ((N, K/G) in the checkpoint dtype) and
                        `<module>.weight_shape` (int64 [N, K]); every other tensor (embedding,
                        norms, a float lm_head) under its HF Llama name in the checkpoint dtype
    generation_config.json, tokenizer files   when the model / `tokenizer_dir` has them

The codes are convert's, not a re-quantization of dequantized weights (docs/deploy.md: the
grid must survive export). Scales are stored in the checkpoint dtype, as compressed-tensors
itself stores them (its loader creates `weight_scale` in the model's dtype and dequantizes as
`codes.to(scale.dtype) * scale`); a scale that dtype would round is refused, since the file
would then hold another grid (train with `scales_precision=` the checkpoint dtype).

The format has no activation quantization: an 8da4w model is written as W4A16 (its weights
exactly, its activations float) and the report says so, with the measured logit difference.

Then, by default, `verify_hf` reads the file back (every packed weight unpacked with
compressed-tensors' `unpack_from_int32` must equal convert's codes, every scale its scale,
bit for bit), loads the directory with `transformers.AutoModelForCausalLM.from_pretrained`
and compares its logits with the converted model's on held-out tokens.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import operator
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from qatfx.export.llama_layout import (
    LlamaHParams,
    UnsupportedModel,
    config_of,
    expected_tensors,
    hf_name_map,
    llama_hparams,
)
from qatfx.export.verify import (
    DEFAULT_MAX_RELATIVE_ERROR,
    DEFAULT_MIN_NEXT_TOKEN_AGREEMENT,
    ExportError,
    VerificationError,
    VerifyReport,
    check_thresholds,
    compare_logits,
    held_out_inputs,
    logits_of,
    mismatch_message,
)
from qatfx.export.weights import QuantizedWeight, converted_tensors
from qatfx.graph.meta import CONVERTED
from qatfx.graph.regions import graph_regions, is_regional, model_stage
from qatfx.module import copy_model_sharing_tensors, copy_sharing_tensors
from qatfx.ops import dequantize, quantize_dynamic
from qatfx.serialization import default_example_inputs
from qatfx.summary import summary

log = logging.getLogger("qatfx.export")

WEIGHTS_FILE = "model.safetensors"
FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
BITS = 4
QMIN, QMAX = -8, 7
# Tokenizer files a transformers tokenizer directory may hold (SentencePiece, BPE, fast).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
)
_LINEARS = tuple(f"self_attn.{p}_proj" for p in "qkvo") + tuple(f"mlp.{p}_proj" for p in ("gate", "up", "down"))

# The checkpoint against the converted model it was written from, weight-only: both multiply
# by the same weights (checked bit for bit: the loader's decompressed weights equal convert's
# dequantized ones) and differ at most in the order of their float operations (two
# implementations of RMSNorm, RoPE, attention and the residual adds). A sum of K terms
# computed in another order moves by at most gamma_K ~= K * u relative to sum |terms| (u =
# eps / 2, the unit roundoff; Higham, "Accuracy and Stability of Numerical Algorithms", 3.1).
# A Llama layer has REDUCTIONS_PER_LAYER such sums in sequence (input norm; q/k/v; q.k;
# softmax normalizer; p.v; o; post-attention norm; gate/up; down: parallel ones counted
# once), the head 2 more (final norm, lm_head). RMSNorm renormalizes and the residual adds do
# not amplify relative errors, so to first order the relative logit error is at most
# (9 L + 2) * K_max * u, K_max the longest sum (hidden, intermediate or sequence length).
# float32, the test models (L = 2, K_max = 128): 20 * 128 * 2^-24 = 1.5e-4; a wrong code or
# scale moves logits by a quantization step (~1e-1 relative). Measured here: 0 (bit-identical
# logits) on every model in tests/export/test_hf.py. The bound is capped at
# DEFAULT_MAX_RELATIVE_ERROR (bfloat16's u makes it vacuous for any real model).
REDUCTIONS_PER_LAYER = 9


@dataclass
class HfVerifyReport:
    path: Path
    weights: int  # packed weights unpacked to convert's codes and scales, bit for bit
    decompressed: int  # of those, transformers' decompressed weight == convert's dequantized weight, bit for bit
    float_grids: int  # quantized tables written in float (embedding, float_lm_head) == their dequantized grid
    logits: VerifyReport  # the checkpoint in transformers vs `reference`
    reference: str  # what the logits were compared with
    activation_drop: Optional[VerifyReport] = None  # 8da4w: the checkpoint vs the converted model itself (reported)

    def __str__(self) -> str:
        lines = [
            f"verify {self.path}: {self.weights} packed weights unpack to convert's codes and scales bit for bit; "
            f"{self.decompressed} decompressed by transformers equal convert's dequantized weights"
            + (f"; {self.float_grids} float tables equal their dequantized grid" if self.float_grids else ""),
            f"  logits in transformers vs {self.reference}:",
            *("  " + line for line in str(self.logits).splitlines()[1:]),
        ]
        if self.activation_drop is not None:
            d = self.activation_drop
            lines.append(
                f"  vs the converted 8da4w model (activations quantized there, float here; reported, not a failure): "
                f"relative logit error {d.relative_error:.3g}, next-token agreement {d.next_token_agreement:.2%}, "
                f"max |logit difference| {d.max_abs_error:.3g}"
            )
        return "\n".join(lines)


@dataclass
class HfExport:
    path: Path  # the directory
    bytes: int  # of the files written
    files: list  # their names
    quantized_layers: int  # linears written packed (int4)
    group_size: Optional[int]  # None: one scale per row (compressed-tensors' channel strategy)
    dtype: torch.dtype  # the checkpoint's (config.json "dtype"; float tensors and scales)
    tied: bool  # tie_word_embeddings in config.json
    ignored: dict = field(default_factory=dict)  # HF linear written in float -> why
    differences: list = field(default_factory=list)  # how the checkpoint (or vLLM serving it) differs from the converted model
    verification: Optional[HfVerifyReport] = None  # None: verify=False

    def __str__(self) -> str:
        grouping = "per channel" if self.group_size is None else f"group {self.group_size}"
        lines = [
            f"{self.path}: {self.bytes} bytes ({', '.join(self.files)}); compressed-tensors {FORMAT} W4A16, "
            f"{self.quantized_layers} int4 linears ({grouping}), {_name(self.dtype)}{', tied embeddings' if self.tied else ''}",
            *(f"  float (ignore): {name}: {reason}" for name, reason in self.ignored.items()),
            *(f"  differs: {d}" for d in self.differences),
            *([str(self.verification)] if self.verification is not None else []),
        ]
        return "\n".join(lines)

    def lines(self) -> list:
        """The report as lines (what `print(report)` shows)."""
        return str(self).splitlines()


@dataclass
class _Layout:
    """What the directory holds, before any file is written."""

    config: Any  # the transformers config object to write
    hp: LlamaHParams
    dtype: torch.dtype
    group_size: Optional[int]
    packed: dict  # HF module name -> QuantizedWeight
    floats: dict  # HF tensor name -> tensor (source dtype)
    ignore: dict  # HF module name -> reason
    tied: bool
    activation_layers: list  # layers whose activations the converted model quantizes
    differences: list


def hf(
    converted: torch.nn.Module,
    out_dir: Union[str, os.PathLike],
    *,
    config: Any = None,
    tokenizer_dir: Union[str, os.PathLike, None] = None,
    dtype: Optional[torch.dtype] = None,
    float_lm_head: bool = False,
    allow_activation_drop: bool = True,
    verify: bool = True,
    verify_inputs: Optional[Sequence] = None,
    example_kwargs: Optional[dict] = None,
    min_next_token_agreement: float = DEFAULT_MIN_NEXT_TOKEN_AGREEMENT,
    max_relative_error: Optional[float] = None,
) -> HfExport:
    """Write `converted` (from convert_pt2e, a Llama-architecture model) to the directory
    `out_dir` as a compressed-tensors pack-quantized W4A16 checkpoint.

    config: the model's transformers LlamaConfig or qatfx.recipes.model.LMConfig (default: the
        model's own `.config`; a whole-model capture has none, so pass it).
    tokenizer_dir: a directory whose tokenizer files are copied beside the weights.
    dtype: the checkpoint dtype (float tensors and scales); default the model's weight dtype.
        A scale it would round is refused (the file would hold another grid).
    float_lm_head: write a quantized lm_head as float (its dequantized int4 grid, exact) for a
        runtime that cannot load a packed lm_head (vLLM before ParallelLMHead quantization).
    allow_activation_drop: False refuses a model with quantized activations (8da4w), which the
        format cannot express, instead of writing it as W4A16 and reporting the difference.
    verify: check the written files bit for bit and the logits in transformers (`verify_hf`,
        on `verify_inputs`: argument tuples whose first element is the token ids, default
        `held_out_inputs`; the converted model is also given `example_kwargs`); raises
        VerificationError below the thresholds (the directory stays written, for inspection).
    max_relative_error: None: the float-accumulation bound `float_error_bound` (weight-only and
        the float-activation reference of an 8da4w model are the same computation)."""
    if verify:
        check_thresholds(min_next_token_agreement, DEFAULT_MAX_RELATIVE_ERROR if max_relative_error is None else max_relative_error)
    module = _converted_module(converted, "qatfx.export.hf")
    ct = _compressed_tensors()
    target = Path(out_dir)
    _check_out_dir(target)
    layout = _layout(module, config, dtype, float_lm_head)
    if layout.activation_layers and not allow_activation_drop:
        raise ExportError(
            f"{len(layout.activation_layers)} linears quantize their activations (int8, 8da4w: e.g. "
            f"{layout.activation_layers[0]}); compressed-tensors {FORMAT} is weight-only (W4A16), so written in this "
            "format they would run with float activations. Pass allow_activation_drop=True to write it anyway (the "
            "report measures the difference), or export to a runtime with 8da4w kernels (qatfx.export.executorch)"
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


def verify_hf(
    out_dir: Union[str, os.PathLike],
    converted: torch.nn.Module,
    inputs: Optional[Sequence] = None,
    *,
    kwargs: Optional[dict] = None,
    min_next_token_agreement: float = DEFAULT_MIN_NEXT_TOKEN_AGREEMENT,
    max_relative_error: Optional[float] = None,
) -> HfVerifyReport:
    """Does the directory `hf` wrote hold `converted`'s grid, and does transformers compute
    what `converted` computes from it?

    1. Every `weight_packed` unpacks (compressed-tensors' `unpack_from_int32`) to convert's
       codes and every `weight_scale` equals convert's scale, bit for bit; a quantized table
       written in float (the embedding, a float lm_head) equals its dequantized grid.
    2. `AutoModelForCausalLM.from_pretrained(out_dir)` (compressed-tensors decompresses on the
       first forward, on CPU too): each decompressed weight equals convert's dequantized
       weight bit for bit, and its logits on `inputs` (argument tuples whose first element is
       the token ids; default `held_out_inputs`) are compared with the converted model's
       (called with `kwargs`) by relative error, next-token agreement and max |difference|.
       An 8da4w model is compared with itself with its activation quantization removed (the
       computation the checkpoint describes), and also, reported only, with itself.

    Raises VerificationError when a weight differs or a logit threshold is missed:
    `max_relative_error` None is `float_error_bound` (see REDUCTIONS_PER_LAYER)."""
    path = Path(out_dir)
    module = _converted_module(converted, "qatfx.export.verify_hf")
    AutoModelForCausalLM, unpack_from_int32, load_file = _loaders()
    if not (path / WEIGHTS_FILE).is_file() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} / config.json; pass the directory qatfx.export.hf wrote")
    config = json.loads((path / "config.json").read_text())
    _check_quantization_config(config.get("quantization_config"), path)
    file = load_file(str(path / WEIGHTS_FILE))
    quantized = _quantized_by_hf_name(module)
    weights, float_grids = _check_file(path, file, quantized, unpack_from_int32)

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_checkpoint_dtype(config, file)).eval()
    except Exception as exc:
        raise ExportError(
            f"transformers could not load {path} ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}); "
            "is the compressed-tensors package installed (pip install -e '.[hf]')?"
        ) from exc
    if inputs is None:
        example, recorded = default_example_inputs(module)
        kwargs = recorded if kwargs is None else kwargs
        inputs = held_out_inputs(module, example, kwargs)
    if not inputs:
        raise ValueError("verify_hf needs at least one input: a list of argument tuples whose first element is the token ids")
    kwargs = dict(kwargs or {})
    reference, removed = float_activation_copy(module)
    got, want, quantized_acts = [], [], []
    decompressed = None
    for args in inputs:
        args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
        with torch.no_grad():
            got.append(logits_of(model(input_ids=args[0])).detach())
            if decompressed is None:  # compressed-tensors decompresses on the first forward
                decompressed = _check_decompressed(path, model, quantized, file)
            want.append(logits_of(reference(*args, **kwargs)).detach())
            if removed:
                quantized_acts.append(logits_of(module(*args, **kwargs)).detach())
    bound = max_relative_error
    if bound is None:
        bound = float_error_bound(llama_hparams(model.config), model.dtype, max(int(a[0].shape[-1]) for a in map(_as_tuple, inputs)))
    check_thresholds(min_next_token_agreement, bound)
    logits = compare_logits(path, got, want, min_next_token_agreement, bound)
    what = "the converted model with its activation quantization removed (what W4A16 computes)" if removed else "the converted model"
    report = HfVerifyReport(
        path=path, weights=weights, decompressed=decompressed or 0, float_grids=float_grids, logits=logits, reference=what,
        activation_drop=compare_logits(path, got, quantized_acts, 0.0, math.inf) if removed else None,
    )
    log.info("qatfx: %s", report)
    if not logits.passed:
        raise VerificationError(
            mismatch_message(
                f"{path} in transformers does not compute what {what} computes", logits,
                "The weights match bit for bit, so the difference is in the float computation around them (a config "
                "field the converted model does not follow: rope, norm eps, head dim?). If it is expected, pass "
                "max_relative_error= / min_next_token_agreement=",
            ),
            report,
        )
    return report


def float_error_bound(hp: LlamaHParams, dtype: torch.dtype, seq_len: int = 1) -> float:
    """The relative logit error two float implementations of one Llama with identical weights
    may show (derivation above REDUCTIONS_PER_LAYER), capped at DEFAULT_MAX_RELATIVE_ERROR."""
    u = torch.finfo(dtype).eps / 2
    k_max = max(hp.hidden_size, hp.intermediate_size, seq_len)
    return min((REDUCTIONS_PER_LAYER * hp.num_hidden_layers + 2) * k_max * u, DEFAULT_MAX_RELATIVE_ERROR)


def float_activation_copy(converted: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """A copy of `converted` (sharing its tensors) whose activation quantization
    (`qatfx::quantize_dynamic` -> `qatfx::dequantize`) is removed: the dequantized activation
    is replaced by the float activation it was computed from. With the weights as convert
    stored them, that is the W4A16 model a weight-only file describes. Returns (copy, number
    of activation dequantizes removed); 0 returns `converted` itself."""
    module = getattr(converted, "_orig_mod", converted)
    if not any(_is_activation_dequantize(n) for _, gm in graph_regions(module) for n in gm.graph.nodes):
        return converted, 0
    copy = copy_model_sharing_tensors(module) if is_regional(module) else copy_sharing_tensors(module)
    removed = 0
    for _, gm in graph_regions(copy):
        for node in list(gm.graph.nodes):
            if _is_activation_dequantize(node):
                node.replace_all_uses_with(node.args[0].args[0].args[0])  # dequantize(getitem(quantize_dynamic(x), 0))
                removed += 1
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return copy, removed


# ---- layout --------------------------------------------------------------------------------


def _converted_module(converted: torch.nn.Module, what: str) -> torch.nn.Module:
    module = getattr(converted, "_orig_mod", converted)
    stage = model_stage(module) if isinstance(module, torch.nn.Module) else None
    if stage != CONVERTED:
        raise ExportError(
            f"{what} needs a module returned by qatfx.convert_pt2e "
            f"(got {'a module at stage ' + repr(stage) if stage else type(module).__name__}); convert it first"
        )
    return module


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


def _loaders():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise ExportError(
            f"verifying a compressed-tensors checkpoint needs transformers and compressed-tensors ({exc}); install the "
            "hf extra: pip install -e '.[hf]'"
        ) from exc
    return AutoModelForCausalLM, unpack_from_int32, load_file


def _is_activation_dequantize(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target is not dequantize or not node.args:
        return False
    item = node.args[0]
    return (
        getattr(item, "op", None) == "call_function" and item.target is operator.getitem
        and getattr(item.args[0], "target", None) is quantize_dynamic
    )


def _quantized_by_hf_name(module: torch.nn.Module) -> dict:
    """{HF weight name: QuantizedWeight}; an embedding quantized with its tied lm_head (one
    table, stored under the linear) appears under both names."""
    tensors = converted_tensors(module)
    layers = summary(module).layers
    tied = {r.layer + ".weight": r.tied_to + ".weight" for r in layers if r.op == "embedding" and r.quantized and r.tied_to}
    try:
        names = hf_name_map([*tensors.quantized, *tied])
    except UnsupportedModel as exc:
        raise ExportError(f"{exc}; qatfx.export.hf writes Llama-architecture models") from exc
    found = {names[name]: qw for name, qw in tensors.quantized.items() if names[name] is not None}
    for embedding, linear in tied.items():
        if linear in tensors.quantized:
            found.setdefault(names[embedding], tensors.quantized[linear])
    return found


def _layout(module: torch.nn.Module, config: Any, dtype: Optional[torch.dtype], float_lm_head: bool) -> _Layout:
    try:
        cfg = config_of(module, config)
        hp = llama_hparams(cfg)
    except UnsupportedModel as exc:
        raise ExportError(f"{exc}; qatfx.export.hf writes Llama-architecture models") from exc
    tensors = converted_tensors(module)
    layers = summary(module).layers
    # quantized layers convert stored in a format converted_tensors does not read (asymmetric
    # int4's zero-point format): their storage must not be taken for float tensors
    unread = [r for r in layers if r.quantized and r.tied_to is None and r.layer + ".weight" not in tensors.quantized]
    floats_in = {n: t for n, t in tensors.float.items() if not any(n.startswith(r.layer + ".weight_") for r in unread)}
    report_names = [r.layer + ".weight" for r in layers]
    try:
        names = hf_name_map([*tensors.quantized, *floats_in, *report_names])
    except UnsupportedModel as exc:
        raise ExportError(f"{exc}; qatfx.export.hf writes Llama-architecture models") from exc
    specs = {names[r.layer + ".weight"]: r.weight_spec for r in layers if r.quantized}
    skipped = {names[r.layer + ".weight"].removesuffix(".weight"): r.skip_reason for r in layers if not r.quantized}
    activation_layers = [r.layer for r in layers if r.quantized and r.input_spec is not None]
    model_dtype = dtype or _model_dtype(layers, tensors)
    if not model_dtype.is_floating_point:
        raise ExportError(f"dtype={dtype} is not a floating-point dtype; the checkpoint dtype is float32, bfloat16 or float16")

    packed, floats, ignore, differences = {}, {}, {}, []
    problems = [
        f"{names[r.layer + '.weight']}: {r.weight_spec.describe()} weights"
        + ("; asymmetric (zero points): this export writes symmetric int4 (vLLM's Marlin W4A16)" if not r.weight_spec.symmetric else
           "; stored by convert in a format this export does not read")
        for r in unread
    ]
    for name, qw in tensors.quantized.items():
        target = names[name]
        problem = None if target == "model.embed_tokens.weight" else _unsupported(target, qw, specs.get(target))
        if problem:
            problems.append(problem)
        elif target == "model.embed_tokens.weight":  # any grid: written as the values the lookups return
            floats[target] = qw.dequantized(model_dtype)
        elif target == "lm_head.weight" and float_lm_head:
            floats[target] = qw.dequantized(model_dtype)
            ignore["lm_head"] = "float_lm_head=True: written as its dequantized int4 grid in float (the same values)"
        elif target.endswith("_proj.weight") or target == "lm_head.weight":
            packed[target.removesuffix(".weight")] = qw
        else:
            problems.append(f"{target}: a quantized tensor with no place in a Llama checkpoint")
    if problems:
        raise ExportError(
            f"qatfx.export.hf writes int4 symmetric weights (compressed-tensors {FORMAT} W4A16); "
            f"{len(problems)} quantized weights cannot be written:\n" + "\n".join(f"  {p}" for p in problems[:8])
            + ("\n  ..." if len(problems) > 8 else "")
            + "\nTrain with an int4 symmetric weight spec (qatfx.Int4WeightOnlyQuantizer(group_size), "
            "qatfx.spec.int4_per_group_weight) or skip those layers (skip=[...]: they are written in float)"
        )
    if not packed:
        raise ExportError("the converted model has no int4 linear weights; there is nothing for a W4A16 checkpoint to pack")
    for r in layers:  # an embedding quantized with its tied lm_head: one table, stored under the linear
        if r.op == "embedding" and r.quantized and r.tied_to is not None:
            source = tensors.quantized.get(r.tied_to + ".weight")
            if source is not None:
                floats.setdefault(names[r.layer + ".weight"], source.dequantized(model_dtype))
    for r in layers:
        if r.op == "embedding" and r.quantized:
            differences.append(
                f"embedding: quantized in training ({r.weight_spec.describe()}), written as its dequantized grid in float "
                "(the format packs Linear weights here; the lookups return the same values)"
            )
    for name, tensor in floats_in.items():
        if names[name] is not None:
            floats.setdefault(names[name], tensor)

    group_size = _group_size(packed)
    _check_scales(packed, model_dtype)
    tied = _tie(hp, packed, floats, differences)
    for module_name in _linear_modules(hp):
        if module_name not in packed:
            ignore.setdefault(module_name, skipped.get(module_name) or (
                "tied to the float embedding (the same tensor)" if module_name == "lm_head" and tied else "not quantized by convert"
            ))
    _check_complete(hp, tied, packed, floats)
    rounded = [n for n, t in floats.items() if t.is_floating_point() and not _exact_in(t, model_dtype)]
    if rounded:
        differences.append(
            f"float tensors: {len(rounded)} ({', '.join(rounded[:3])}{', ...' if len(rounded) > 3 else ''}) are rounded to "
            f"{_name(model_dtype)} (dtype={_name(model_dtype)}; the model's are {_name(floats[rounded[0]].dtype)})"
        )
    if activation_layers:
        schemes = ", ".join(sorted({r.input_spec.describe() for r in layers if r.quantized and r.input_spec is not None}))
        differences.insert(0, (
            f"activations: the converted model quantizes the inputs of {len(activation_layers)} linears ({schemes}: 8da4w); "
            f"{FORMAT} is weight-only (W4A16), so they are float here (the weights are convert's, exactly)"
        ))
    if model_dtype == torch.float32:
        inexact = [m for m, qw in packed.items() if not (_exact_in(qw.scales, torch.bfloat16) or _exact_in(qw.scales, torch.float16))]
        if inexact:
            differences.append(
                f"serving: vLLM runs {FORMAT} W4A16 in float16/bfloat16 and casts the scales to that dtype; {len(inexact)} "
                f"linears (e.g. {inexact[0]}) have {_name(packed[inexact[0]].scales.dtype)} scales that both round "
                "(transformers in float32 is exact; train with scales_precision=torch.bfloat16 for a grid vLLM keeps)"
            )
    hf_config = _hf_config(cfg, hp, tied, model_dtype)
    return _Layout(hf_config, hp, model_dtype, group_size, packed, floats, ignore, tied, activation_layers, differences)


def _unsupported(target: str, qw: QuantizedWeight, spec) -> Optional[str]:
    if spec is not None and spec.bits != BITS:
        return f"{target}: int{spec.bits} weights ({spec.describe()}); the format's W4A16 scheme has 4-bit weights"
    if qw.zeros is not None or (spec is not None and not spec.symmetric):
        return f"{target}: asymmetric weights (zero points); this export writes symmetric int4 (vLLM's Marlin W4A16)"
    if qw.codes.numel() and (int(qw.codes.min()) < QMIN or int(qw.codes.max()) > QMAX):
        return f"{target}: codes in [{int(qw.codes.min())}, {int(qw.codes.max())}], not the int4 grid [{QMIN}, {QMAX}]"
    k = qw.codes.shape[-1]
    if qw.scales.dim() != 2 or qw.scales.shape[0] != qw.codes.shape[0] or k % qw.scales.shape[-1]:
        return f"{target}: scales {tuple(qw.scales.shape)} are not per-group along K={k}"
    return None


def _group_size(packed: dict) -> Optional[int]:
    """The config group's group_size (scales per row: K / group_size); None: one scale per
    row in every layer (compressed-tensors' channel strategy, whatever each K)."""
    if all(qw.scales.shape[-1] == 1 for qw in packed.values()):
        return None
    sizes = Counter(qw.codes.shape[-1] // qw.scales.shape[-1] for qw in packed.values())
    if len(sizes) > 1:
        raise ExportError(
            f"the int4 linears use {len(sizes)} group sizes ({dict(sizes)}); this export writes one compressed-tensors "
            "config group (one group size): train every layer with one group size"
        )
    return next(iter(sizes))


def _check_scales(packed: dict, dtype: torch.dtype) -> None:
    bad = [(m, qw) for m, qw in packed.items() if not _exact_in(qw.scales, dtype)]
    if bad:
        module, qw = bad[0]
        changed = int((qw.scales.to(dtype).to(qw.scales.dtype) != qw.scales).sum())
        raise ExportError(
            f"{len(bad)} of {len(packed)} int4 linears have weight scales that {_name(dtype)} (the checkpoint dtype, "
            f"which compressed-tensors and vLLM hold scales in) cannot hold exactly: e.g. {module}, {changed} of "
            f"{qw.scales.numel()} {_name(qw.scales.dtype)} scales would round, so the file would hold another grid than "
            f"the one trained. Train with scales_precision=torch.{_name(dtype)} (e.g. Int4WeightOnlyQuantizer(group_size, "
            f"scales_precision=torch.{_name(dtype)})), or write a checkpoint in the scales' dtype (dtype=torch.{_name(qw.scales.dtype)})"
        )


def _tie(hp: LlamaHParams, packed: dict, floats: dict, differences: list) -> bool:
    """Whether config.json ties lm_head to the embedding; drops a float lm_head equal to it."""
    embed = floats.get("model.embed_tokens.weight")
    if "lm_head" in packed:
        if hp.tie_word_embeddings:
            differences.append(
                "tied embeddings: lm_head is int4 and the embedding float, so the checkpoint is untied "
                "(tie_word_embeddings false; embed_tokens and a packed lm_head, the same values the converted model uses)"
            )
        return False
    head = floats.get("lm_head.weight")
    if head is None:
        if not hp.tie_word_embeddings:
            raise ExportError("the converted model has no lm_head weight and its config does not tie embeddings; is it a causal LM?")
        return True
    if embed is not None and head.shape == embed.shape and torch.equal(head, embed):
        del floats["lm_head.weight"]
        return True
    if hp.tie_word_embeddings:
        differences.append("tied embeddings: lm_head and the embedding hold different values, so the checkpoint is untied")
    return False


def _linear_modules(hp: LlamaHParams) -> list:
    return [f"model.layers.{i}.{p}" for i in range(hp.num_hidden_layers) for p in _LINEARS] + ["lm_head"]


def _check_complete(hp: LlamaHParams, tied: bool, packed: dict, floats: dict) -> None:
    expected = set(expected_tensors(replace(hp, tie_word_embeddings=tied)))
    have = set(floats) | {m + ".weight" for m in packed}
    missing, extra = sorted(expected - have), sorted(have - expected)
    if missing or extra:
        raise ExportError(
            "the converted model's tensors do not make the Llama its config describes "
            f"({hp.num_hidden_layers} layers, hidden {hp.hidden_size}): "
            + (f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}" if extra else "")
            + "; pass config= the model's own config"
        )


def _model_dtype(layers, tensors) -> torch.dtype:
    dtypes = Counter(r.weight_dtype for r in layers if r.weight_dtype.is_floating_point)
    if not dtypes:
        dtypes = Counter(t.dtype for t in tensors.float.values() if t.is_floating_point())
    return dtypes.most_common(1)[0][0] if dtypes else torch.float32


def _exact_in(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    if tensor.dtype == dtype:
        return True
    cast = tensor.to(dtype)
    return bool(torch.isfinite(cast).all() == torch.isfinite(tensor).all()) and torch.equal(cast.to(tensor.dtype), tensor)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _hf_config(cfg: Any, hp: LlamaHParams, tied: bool, dtype: torch.dtype):
    """The model's own transformers config (a copy), else a LlamaConfig with `hp`'s fields."""
    import copy

    import transformers

    if isinstance(cfg, transformers.PretrainedConfig):
        config = copy.deepcopy(cfg)
        config.tie_word_embeddings = tied
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    else:
        fields = dict(
            vocab_size=hp.vocab_size, hidden_size=hp.hidden_size, intermediate_size=hp.intermediate_size,
            num_hidden_layers=hp.num_hidden_layers, num_attention_heads=hp.num_attention_heads,
            num_key_value_heads=hp.num_key_value_heads, head_dim=hp.head_dim, rms_norm_eps=hp.rms_norm_eps,
            max_position_embeddings=hp.max_position_embeddings, tie_word_embeddings=tied, hidden_act="silu",
            attention_bias=False, mlp_bias=False,
            # a recipes LMConfig names no special tokens; LlamaConfig's defaults (1, 2) would invent them
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
        if "rope_parameters" in transformers.LlamaConfig.__init__.__code__.co_varnames:
            fields["rope_parameters"] = {"rope_type": "default", "rope_theta": hp.rope_theta}
        else:
            fields["rope_theta"] = hp.rope_theta
        config = transformers.LlamaConfig(**fields)
    config.architectures = ["LlamaForCausalLM"]
    # transformers 5 names it `dtype` (config.json "dtype"), 4.x `torch_dtype`
    if "dtype" in inspect.signature(transformers.PretrainedConfig.__init__).parameters:
        config.dtype = dtype
    else:
        config.torch_dtype = dtype
    return config


# ---- writing -------------------------------------------------------------------------------


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
    compressed_tensors, _, QuantizationArgs, QuantizationConfig, QuantizationScheme = ct
    if layout.group_size is None:
        weights = QuantizationArgs(num_bits=BITS, type="int", symmetric=True, strategy="channel", dynamic=False)
    else:
        weights = QuantizationArgs(num_bits=BITS, type="int", symmetric=True, strategy="group", group_size=layout.group_size, dynamic=False)
    # vLLM matches lm_head (a ParallelLMHead, not a Linear) by name only; named first, so that
    # compressed-tensors' matching (first target wins) uses every target and warns of none
    targets = (["lm_head"] if "lm_head" in layout.packed else []) + ["Linear"]
    scheme = QuantizationScheme(targets=targets, weights=weights, format=FORMAT)
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, format=FORMAT, quantization_status="compressed", ignore=sorted(layout.ignore),
    )
    # the structure compressed-tensors' ModelCompressor.update_config writes
    return {
        "version": compressed_tensors.__version__,
        "quant_method": QUANT_METHOD,
        "sparsity_config": {},
        "transform_config": {},
        **config.model_dump(exclude={"quant_method"}),
    }


def _write(layout: _Layout, target: Path, ct, module: torch.nn.Module, tokenizer_dir) -> list:
    from safetensors.torch import save_file

    _, pack_to_int32, *_ = ct
    state, seen = {}, set()
    for name, qw in layout.packed.items():
        state[f"{name}.weight_packed"] = pack_to_int32(qw.codes.to(torch.int8).contiguous(), BITS)
        state[f"{name}.weight_scale"] = qw.scales.to(layout.dtype).contiguous()
        state[f"{name}.weight_shape"] = torch.tensor(list(qw.codes.shape), dtype=torch.int64)
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


# ---- verification --------------------------------------------------------------------------


def _as_tuple(args) -> tuple:
    return tuple(args) if isinstance(args, (tuple, list)) else (args,)


def _check_quantization_config(q: Optional[dict], path: Path) -> None:
    if not q or q.get("quant_method") != QUANT_METHOD or q.get("format") != FORMAT:
        raise ExportError(f"{path}/config.json has no compressed-tensors {FORMAT} quantization_config; pass a directory qatfx.export.hf wrote")


def _checkpoint_dtype(config: dict, file: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return next((t.dtype for t in file.values() if t.is_floating_point()), torch.float32)


def _check_file(path: Path, file: dict, quantized: dict, unpack_from_int32) -> tuple[int, int]:
    """(packed weights checked, float tables checked); raises VerificationError on a mismatch."""
    problems, packed, tables = [], 0, 0
    for name, qw in quantized.items():
        module = name.removesuffix(".weight")
        if f"{module}.weight_packed" in file:
            shape = file[f"{module}.weight_shape"]
            codes = unpack_from_int32(file[f"{module}.weight_packed"], BITS, torch.Size(shape.tolist()))
            scale = file[f"{module}.weight_scale"]
            if tuple(shape.tolist()) != tuple(qw.codes.shape) or not torch.equal(codes, qw.codes.to(torch.int8)):
                problems.append(f"{module}: weight_packed does not unpack to convert's codes")
            elif scale.shape != qw.scales.shape or not torch.equal(scale.double(), qw.scales.double()):
                problems.append(f"{module}: weight_scale differs from convert's scales")
            packed += 1
        elif name in file:
            if not torch.equal(file[name], qw.dequantized(file[name].dtype)):
                problems.append(f"{name}: the float table differs from convert's dequantized int4 grid")
            tables += 1
        else:
            problems.append(f"{module}: quantized in the converted model, absent from {WEIGHTS_FILE}")
    if problems:
        raise VerificationError(
            f"{path}/{WEIGHTS_FILE} does not hold the converted model's weights:\n" + "\n".join(f"  {p}" for p in problems[:8])
            + "\nWas the directory written from this converted model?",
            None,
        )
    return packed, tables


def _check_decompressed(path: Path, model: torch.nn.Module, quantized: dict, file: dict) -> int:
    """After the first forward: each packed linear's weight in transformers (decompressed by
    compressed-tensors) against convert's dequantized weight, in the model's dtype."""
    problems, checked = [], 0
    for name, qw in quantized.items():
        module_name = name.removesuffix(".weight")
        if f"{module_name}.weight_packed" not in file:
            continue
        weight = getattr(model.get_submodule(module_name), "weight", None)
        if weight is None or weight.shape != qw.codes.shape:
            problems.append(f"{module_name}: transformers holds no decompressed weight of shape {tuple(qw.codes.shape)}")
        elif not torch.equal(weight.detach(), qw.dequantized(weight.dtype)):
            problems.append(f"{module_name}: the decompressed weight differs from convert's dequantized weight")
        checked += 1
    if problems:
        raise VerificationError(
            f"{path} loaded in transformers does not multiply by the converted model's weights:\n"
            + "\n".join(f"  {p}" for p in problems[:8]),
            None,
        )
    return checked
