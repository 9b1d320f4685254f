"""The layout of a compressed-tensors checkpoint (`qatfx.export.hf`), read from a converted
model before any file is written: which linears are quantized in the file and with which
compressed-tensors scheme (one config group per distinct scheme, `CtScheme`: convert's codes
and scales, refused by name when the format or the checkpoint dtype cannot hold them
exactly), which tensors are written in float under their HF Llama names, the `ignore` list,
the tie, and the transformers config. Shared by the writer (`qatfx.export.hf`) and the
verifier (`qatfx.export.hf_verify`).

Schemes, each a vLLM scheme too (docs/export_hf.md has the rules and their sources):

    int4 / int8 symmetric weights, group or channel, weight-only  -> "pack-quantized" W4A16 /
        W8A16 (vLLM's CompressedTensorsWNA16, Marlin); int8 is what compressed-tensors itself
        infers for weight-only int8 (its int-quantized compressor needs input activations)
    int8 symmetric per-channel weights with int8 dynamic per-token asymmetric activations (8da8w)
        -> "int-quantized" W8A8 with `input_activations` {8 bits, token, dynamic, asymmetric}
        (vLLM's CompressedTensorsW8A8Int8 with an activation zero point, "azp")

Activations of any other scheme (8da4w, llama.cpp's Q8_0) are not expressible with the weights
vLLM serves them with: those layers are written weight-only and the report says so.
"""

from __future__ import annotations

import inspect
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

from qatfx.export.llama_layout import (
    LlamaHParams,
    UnsupportedModel,
    config_of,
    expected_tensors,
    hf_name_map,
    llama_hparams,
)
from qatfx.export.verify import ExportError
from qatfx.export.weights import QuantizedWeight, converted_tensors
from qatfx.graph.meta import CONVERTED
from qatfx.graph.regions import model_stage
from qatfx.spec import TORCHAO, PerChannel, PerGroup, PerToken
from qatfx.summary import summary

WEIGHTS_FILE = "model.safetensors"
FORMAT = "pack-quantized"  # weight-only groups (W4A16, W8A16)
INT_FORMAT = "int-quantized"  # W8A8 groups: int8 weights one per byte, activations quantized by the runtime
MIXED_FORMAT = "mixed-precision"  # the global format of a checkpoint whose groups have different formats
FORMATS = (FORMAT, INT_FORMAT, MIXED_FORMAT)
QUANT_METHOD = "compressed-tensors"
BITS = 4  # the default scheme's (W4A16)
WEIGHT_BITS = (4, 8)  # vLLM's WNA16_SUPPORTED_BITS (0.11 / 0.20); W8A8 is 8 bits
_LINEARS = tuple(f"self_attn.{p}_proj" for p in "qkvo") + tuple(f"mlp.{p}_proj" for p in ("gate", "up", "down"))


@dataclass(frozen=True)
class CtScheme:
    """One compressed-tensors config group: a symmetric integer weight grid and, for W8A8,
    int8 dynamic per-token asymmetric input activations."""

    bits: int  # 4 or 8
    group_size: Optional[int]  # None: one scale per row (compressed-tensors' channel strategy)
    activations: bool = False  # W8A8 (int-quantized): the runtime quantizes the inputs per token

    @property
    def format(self) -> str:
        return INT_FORMAT if self.activations else FORMAT

    @property
    def name(self) -> str:
        return f"W{self.bits}A{8 if self.activations else 16}"

    @property
    def grid(self) -> str:
        return f"int{self.bits} " + ("per channel" if self.group_size is None else f"group {self.group_size}")

    def describe(self) -> str:
        acts = " + int8 dynamic per-token asymmetric activations" if self.activations else ""
        return f"{self.name} ({self.grid}{acts}; {self.format})"


@dataclass
class _Layout:
    """What the directory holds, before any file is written."""

    config: Any  # the transformers config object to write
    hp: LlamaHParams
    dtype: torch.dtype
    group_size: Optional[int]  # of every quantized linear when they share one scheme; None: per channel, or several
    packed: dict  # HF module name -> QuantizedWeight (every linear written quantized, whatever its format)
    schemes: dict  # HF module name -> CtScheme, for every module in `packed`
    floats: dict  # HF tensor name -> tensor (source dtype)
    ignore: dict  # HF module name -> reason
    tied: bool
    activation_layers: list  # layers whose activation quantization the file drops (written weight-only)
    differences: list
    kept_activations: list = field(default_factory=list)  # layers written W8A8 (the runtime quantizes their inputs)

    @property
    def groups(self) -> list:
        """[(CtScheme, [HF module names])], one per config group, in model order."""
        found: dict = {}
        for module, scheme in self.schemes.items():
            found.setdefault(scheme, []).append(module)
        return list(found.items())


def _converted_module(converted: torch.nn.Module, what: str) -> torch.nn.Module:
    module = getattr(converted, "_orig_mod", converted)
    stage = model_stage(module) if isinstance(module, torch.nn.Module) else None
    if stage != CONVERTED:
        raise ExportError(
            f"{what} needs a module returned by qatfx.convert_pt2e "
            f"(got {'a module at stage ' + repr(stage) if stage else type(module).__name__}); convert it first"
        )
    return module



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


def _layout(module: torch.nn.Module, config: Any, dtype: Optional[torch.dtype], quantize_lm_head: bool) -> _Layout:
    try:
        cfg = config_of(module, config)
        hp = llama_hparams(cfg)
    except UnsupportedModel as exc:
        raise ExportError(f"{exc}; qatfx.export.hf writes transformers causal LMs and the demo's Llama") from exc
    own_config = _is_transformers_config(cfg)
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
        raise ExportError(f"{exc}; qatfx.export.hf writes transformers causal LMs and the demo's Llama") from exc
    reports = {names[r.layer + ".weight"]: r for r in layers if r.quantized}
    skipped = {names[r.layer + ".weight"].removesuffix(".weight"): r.skip_reason for r in layers if not r.quantized}
    model_dtype = dtype or _model_dtype(layers, tensors)
    if not model_dtype.is_floating_point:
        raise ExportError(f"dtype={dtype} is not a floating-point dtype; the checkpoint dtype is float32, bfloat16 or float16")

    packed, schemes, floats, ignore, differences = {}, {}, {}, {}, []
    problems = [
        f"{names[r.layer + '.weight']}: {r.weight_spec.describe()} weights"
        + ("; asymmetric (zero points): this export writes the symmetric schemes vLLM's kernels run"
           if not r.weight_spec.symmetric else "; stored by convert in a format this export does not read")
        for r in unread
    ]
    for name, qw in tensors.quantized.items():
        target = names[name]
        report = reports.get(target)
        if target == "model.embed_tokens.weight":  # any grid: written as the values the lookups return
            floats[target] = qw.dequantized(model_dtype)
        elif target == "lm_head.weight" and not quantize_lm_head:  # any grid: its values, exactly
            floats[target] = qw.dequantized(model_dtype)
            spec = report.weight_spec if report is not None else qw.spec
            ignore["lm_head"] = (
                f"written as its dequantized {spec.describe() if spec is not None else 'quantized'} grid in float (the same "
                "values): vLLM before 0.20 cannot load a quantized lm_head; quantize_lm_head=True writes it quantized"
            )
        elif not (target.endswith(".weight") and (own_config or target.endswith("_proj.weight") or target == "lm_head.weight")):
            problems.append(f"{target}: a quantized tensor with no place in a Llama checkpoint")
        elif isinstance(scheme := _scheme(target, qw, report), str):
            problems.append(scheme)
        else:
            packed[target.removesuffix(".weight")] = qw
            schemes[target.removesuffix(".weight")] = scheme
    if problems:
        raise ExportError(
            "qatfx.export.hf writes symmetric int4 / int8 weights (compressed-tensors W4A16, W8A16, W8A8); "
            f"{len(problems)} quantized weights cannot be written exactly:\n" + "\n".join(f"  {p}" for p in problems[:8])
            + ("\n  ..." if len(problems) > 8 else "")
            + "\nTrain those layers with a symmetric int4 or int8 weight spec (qatfx.Int4WeightOnlyQuantizer(group_size), "
            "qatfx.Int8DynActInt8WeightQuantizer(), or a MixedQuantizer rule giving them one) or skip them "
            "(skip=[...] or a None rule: they are written in float)"
        )
    if not packed:
        raise ExportError(
            "the converted model has no quantized linear weights to write (an lm_head alone is written in float unless "
            "quantize_lm_head=True); there is nothing for a compressed-tensors checkpoint to hold"
        )
    for r in layers:  # an embedding quantized with its tied lm_head: one table, stored under the linear
        if r.op == "embedding" and r.quantized and r.tied_to is not None:
            source = tensors.quantized.get(r.tied_to + ".weight")
            if source is not None:
                floats.setdefault(names[r.layer + ".weight"], source.dequantized(model_dtype))
    for r in layers:
        if r.op == "embedding" and r.quantized:
            differences.append(
                f"embedding: quantized in training ({r.weight_spec.describe()}), written as its dequantized grid in float "
                "(the format quantizes Linear weights here; the lookups return the same values)"
            )
    for name, tensor in floats_in.items():
        if names[name] is not None:
            floats.setdefault(names[name], tensor)

    _check_scales(packed, model_dtype)
    tied = _tie(hp, packed, schemes, floats, differences)
    linears = [names[r.layer + ".weight"].removesuffix(".weight") for r in layers if r.op != "embedding"]
    for module_name in linears if own_config else _linear_modules(hp):
        if module_name not in packed:
            ignore.setdefault(module_name, skipped.get(module_name) or (
                "tied to the float embedding (the same tensor)" if module_name == "lm_head" and tied else "not quantized by convert"
            ))
    _check_fused_groups(schemes, ignore)
    if not own_config:  # a config rebuilt from a recipes LMConfig: the tensors must make its Llama
        _check_complete(hp, tied, packed, floats)
    rounded = [n for n, t in floats.items() if t.is_floating_point() and not _exact_in(t, model_dtype)]
    if rounded:
        differences.append(
            f"float tensors: {len(rounded)} ({', '.join(rounded[:3])}{', ...' if len(rounded) > 3 else ''}) are rounded to "
            f"{_name(model_dtype)} (dtype={_name(model_dtype)}; the model's are {_name(floats[rounded[0]].dtype)})"
        )
    by_model = {r.layer: names[r.layer + ".weight"].removesuffix(".weight") for r in layers if r.quantized and r.op != "embedding"}
    with_acts = [r for r in layers if r.quantized and r.op != "embedding" and r.input_spec is not None]
    kept = [r.layer for r in with_acts if by_model[r.layer] in schemes and schemes[by_model[r.layer]].activations]
    dropped = [r for r in with_acts if r.layer not in kept]
    if dropped:
        specs = ", ".join(sorted({r.input_spec.describe() for r in dropped}))
        names_ = ", ".join(sorted({r.scheme for r in dropped}))
        weight_only = sorted({schemes[by_model[r.layer]].name for r in dropped if by_model[r.layer] in schemes})
        where = f"{FORMAT} is weight-only ({'/'.join(weight_only)})" if weight_only else "the float lm_head has no quantization"
        if weight_only and any(by_model[r.layer] not in schemes for r in dropped):
            where += " (and the float lm_head has none)"
        differences.insert(0, (
            f"activations: the converted model quantizes the inputs of {len(dropped)} linears ({specs}: {names_}); "
            f"{where}, so they are float here (the weights are convert's, exactly)"
            + (f"; the W8A8 layers ({len(kept)}) keep theirs" if kept else "")
        ))
    if kept:
        differences.append(
            f"activations (W8A8): the inputs of {len(kept)} linears ({', '.join(by_model[k] for k in kept[:3])}"
            f"{', ...' if len(kept) > 3 else ''}) are quantized per token (int8, asymmetric) by the loader's code, not "
            "qatfx's: compressed-tensors (transformers) takes the same scale, (max - min) / 255 of the token widened to "
            "include 0, but rounds x / s + z where qatfx rounds x * (1 / s) and then adds z, so a code may differ by one "
            "where the two round differently; vLLM's kernel rounds as qatfx does but takes the token's own min and max, "
            "not widened to include 0 (the same grid whenever a token holds both signs)"
        )
    if model_dtype == torch.float32:
        # W8A8 scales are float32 in vLLM (ChannelQuantScaleParameter): only the Marlin groups cast them
        inexact = [
            m for m, qw in packed.items()
            if not schemes[m].activations and not (_exact_in(qw.scales, torch.bfloat16) or _exact_in(qw.scales, torch.float16))
        ]
        if inexact:
            differences.append(
                f"serving: vLLM runs {FORMAT} {'/'.join(sorted({schemes[m].name for m in inexact}))} in float16/bfloat16 and "
                f"casts the scales to that dtype; {len(inexact)} "
                f"linears (e.g. {inexact[0]}) have {_name(packed[inexact[0]].scales.dtype)} scales that both round "
                "(transformers in float32 is exact; train with scales_precision=torch.bfloat16 for a grid vLLM keeps)"
            )
    hf_config = _hf_config(cfg, hp, tied, model_dtype)
    return _Layout(
        hf_config, hp, model_dtype, _group_size(schemes), packed, schemes, floats, ignore, tied,
        [r.layer for r in dropped], differences, kept,
    )


def _is_transformers_config(config: Any) -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return isinstance(config, transformers.PretrainedConfig)


# vLLM loads q/k/v as one qkv_proj and gate/up as one gate_up_proj (its models'
# packed_modules_mapping) and refuses shards of one fused layer with different schemes
# (vllm/model_executor/layers/quantization/compressed_tensors/utils.py, should_ignore_layer;
# find_matched_target matches a fused layer only when all its shards match one target)
FUSED_GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _check_fused_groups(schemes: dict, ignore: dict) -> None:
    """Members of one vLLM fused layer share one scheme (all quantized alike, or all float),
    before any file is written; transformers would load a mixed group, vLLM refuses it."""
    problems = []
    for parent in sorted({m.rpartition(".")[0] for m in (*schemes, *ignore)}):
        for fused, members in FUSED_GROUPS.items():
            kinds = {m: (f"{schemes[f'{parent}.{m}'].grid} ({schemes[f'{parent}.{m}'].name})" if f"{parent}.{m}" in schemes else "float")
                     for m in members if f"{parent}.{m}" in schemes or f"{parent}.{m}" in ignore}
            if len(set(kinds.values())) > 1:
                by_kind: dict = {}
                for m, kind in kinds.items():
                    by_kind.setdefault(kind, []).append(m)
                parts = [
                    f"{', '.join(ms)} {kind if kind != 'float' else 'float (' + ignore[f'{parent}.{ms[0]}'] + ')'}"
                    for kind, ms in by_kind.items()
                ]
                problems.append(f"{parent}.{fused}: " + " but ".join(parts))
    if problems:
        raise ExportError(
            f"vLLM fuses q/k/v_proj into qkv_proj and gate/up_proj into gate_up_proj and requires one scheme per fused "
            f"layer, but {len(problems)} fused layer(s) mix schemes:\n"
            + "\n".join(f"  {p}" for p in problems[:6]) + ("\n  ..." if len(problems) > 6 else "")
            + "\nGive every member one scheme (one MixedQuantizer rule for the group, or remove the one skipped from skip=) "
            "or skip them all, e.g. skip=['*.k_proj', '*.q_proj', '*.v_proj'], then prepare and train again"
        )


def _int8_per_token_asymmetric(spec) -> bool:
    """The activations qatfx's 8da8w (and 8da4w) trains, which compressed-tensors expresses
    as {num_bits 8, type int, strategy token, dynamic true, symmetric false}."""
    return (
        spec is not None and spec.bits == 8 and spec.signed and not spec.symmetric and not spec.narrow
        and isinstance(spec.granularity, PerToken) and spec.dynamic and spec.scale_rule == TORCHAO
    )


def _scheme(target: str, qw: QuantizedWeight, report):
    """The CtScheme `qw` is written with, or a problem naming the layer and why."""
    spec = report.weight_spec if report is not None else qw.spec
    bits = spec.bits if spec is not None else None
    if bits is not None and bits not in WEIGHT_BITS:
        return (f"{target}: int{bits} weights ({spec.describe()}); compressed-tensors' schemes that vLLM serves hold 4- or "
                "8-bit weights (WNA16_SUPPORTED_BITS)")
    if qw.zeros is not None or (spec is not None and not spec.symmetric):
        return f"{target}: asymmetric weights (zero points); this export writes symmetric int4 / int8 (vLLM's Marlin and W8A8 kernels)"
    bits = bits or (4 if qw.codes.numel() and int(qw.codes.min()) >= -8 and int(qw.codes.max()) <= 7 else 8)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if qw.codes.numel() and (int(qw.codes.min()) < qmin or int(qw.codes.max()) > qmax):
        return f"{target}: codes in [{int(qw.codes.min())}, {int(qw.codes.max())}], not the int{bits} grid [{qmin}, {qmax}]"
    k = qw.codes.shape[-1]
    if qw.scales.dim() != 2 or qw.scales.shape[0] != qw.codes.shape[0] or k % qw.scales.shape[-1]:
        return f"{target}: scales {tuple(qw.scales.shape)} are not per group or per channel along K={k}"
    if spec is not None and isinstance(spec.granularity, PerGroup):
        group_size = spec.granularity.group_size
    elif (spec is not None and isinstance(spec.granularity, PerChannel)) or qw.scales.shape[-1] == 1:
        group_size = None
    else:
        group_size = k // qw.scales.shape[-1]
    input_spec = report.input_spec if report is not None else None
    w8a8 = bits == 8 and group_size is None and _int8_per_token_asymmetric(input_spec)
    return CtScheme(bits, group_size, w8a8)


def _group_size(schemes: dict) -> Optional[int]:
    """The report's group_size: that of every quantized linear when they share one scheme;
    None for per-channel weights or several schemes (`HfExport.schemes` lists them)."""
    found = set(schemes.values())
    return next(iter(found)).group_size if len(found) == 1 else None


def _check_scales(packed: dict, dtype: torch.dtype) -> None:
    bad = [(m, qw) for m, qw in packed.items() if not _exact_in(qw.scales, dtype)]
    if bad:
        module, qw = bad[0]
        changed = int((qw.scales.to(dtype).to(qw.scales.dtype) != qw.scales).sum())
        raise ExportError(
            f"{len(bad)} of {len(packed)} quantized linears have weight scales that {_name(dtype)} (the checkpoint dtype, "
            f"which compressed-tensors and vLLM hold scales in) cannot hold exactly: e.g. {module}, {changed} of "
            f"{qw.scales.numel()} {_name(qw.scales.dtype)} scales would round, so the file would hold another grid than "
            f"the one trained. Train with scales_precision=torch.{_name(dtype)} (e.g. Int4WeightOnlyQuantizer(group_size, "
            f"scales_precision=torch.{_name(dtype)})), or write a checkpoint in the scales' dtype (dtype=torch.{_name(qw.scales.dtype)})"
        )


def _tie(hp: LlamaHParams, packed: dict, schemes: dict, floats: dict, differences: list) -> bool:
    """Whether config.json ties lm_head to the embedding; drops a float lm_head equal to it."""
    embed = floats.get("model.embed_tokens.weight")
    if "lm_head" in packed:
        if hp.tie_word_embeddings:
            grid = schemes["lm_head"].grid.split(" ")[0]
            differences.append(
                f"tied embeddings: lm_head is {grid} and the embedding float, so the checkpoint is untied "
                f"(tie_word_embeddings false; embed_tokens and a quantized lm_head, the same values the converted model uses)"
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
        # vLLM picks the model class from `architectures`: the config's own, else the causal LM
        # class transformers maps its model_type to (a config built in code names none)
        if not config.architectures:
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
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


def config_group_of(module: str, config_groups: dict, ignore=()) -> Optional[str]:
    """The config group (its key) compressed-tensors applies to the Linear named `module` of a
    written quantization_config (config.json's dicts), None when it is ignored or untargeted:
    exact names first, then `re:` patterns, then the class name "Linear", the order of
    compressed-tensors' `match_targets` (utils/match.py), whose first target wins."""
    def named(name: str, target: str) -> bool:
        return re.match(target[3:], name) is not None if target.startswith("re:") else target == name

    if any(named(module, entry) or entry == "Linear" for entry in ignore):
        return None
    ordered = [(key, t) for key, group in config_groups.items() for t in group.get("targets", [])]
    for wanted in ("exact", "re", "class"):
        for key, target in ordered:
            kind = "class" if target == "Linear" else "re" if target.startswith("re:") else "exact"
            if kind == wanted and (kind == "class" or named(module, target)):
                return key
    return None
