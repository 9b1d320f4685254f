"""The layout of a compressed-tensors "pack-quantized" W4A16 checkpoint (`qatfx.export.hf`),
read from a converted model before any file is written: which linears are packed (convert's
int4 codes and scales, refused when the format or the checkpoint dtype cannot hold them
exactly), which tensors are written in float under their HF Llama names, the `ignore` list,
the tie, and the transformers config. Shared by the writer (`qatfx.export.hf`) and the
verifier (`qatfx.export.hf_verify`).
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass, replace
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
from qatfx.summary import summary

WEIGHTS_FILE = "model.safetensors"
FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
BITS = 4
QMIN, QMAX = -8, 7
_LINEARS = tuple(f"self_attn.{p}_proj" for p in "qkvo") + tuple(f"mlp.{p}_proj" for p in ("gate", "up", "down"))


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
        elif target == "lm_head.weight" and not quantize_lm_head:
            floats[target] = qw.dequantized(model_dtype)
            ignore["lm_head"] = (
                "written as its dequantized int4 grid in float (the same values): vLLM before 0.20 cannot load a packed "
                "lm_head; quantize_lm_head=True packs it"
            )
        elif target.endswith(".weight") and (own_config or target.endswith("_proj.weight") or target == "lm_head.weight"):
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
    linears = [names[r.layer + ".weight"].removesuffix(".weight") for r in layers if r.op != "embedding"]
    for module_name in linears if own_config else _linear_modules(hp):
        if module_name not in packed:
            ignore.setdefault(module_name, skipped.get(module_name) or (
                "tied to the float embedding (the same tensor)" if module_name == "lm_head" and tied else "not quantized by convert"
            ))
    _check_fused_groups(packed, ignore)
    if not own_config:  # a config rebuilt from a recipes LMConfig: the tensors must make its Llama
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


def _is_transformers_config(config: Any) -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return isinstance(config, transformers.PretrainedConfig)


# vLLM loads q/k/v as one qkv_proj and gate/up as one gate_up_proj (its models'
# packed_modules_mapping) and refuses shards of one fused layer with different schemes
# (vllm/model_executor/layers/quantization/compressed_tensors/utils.py, should_ignore_layer)
FUSED_GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _check_fused_groups(packed: dict, ignore: dict) -> None:
    """Members of one vLLM fused layer are all packed (int4) or all float, before any file is
    written; transformers would load a mixed group, vLLM refuses it."""
    problems = []
    for parent in sorted({m.rpartition(".")[0] for m in (*packed, *ignore)}):
        for fused, members in FUSED_GROUPS.items():
            quantized = [m for m in members if f"{parent}.{m}" in packed]
            floating = [m for m in members if f"{parent}.{m}" in ignore]
            if quantized and floating:
                reason = ignore[f"{parent}.{floating[0]}"]
                problems.append(f"{parent}.{fused}: {', '.join(quantized)} int4 but {', '.join(floating)} float ({reason})")
    if problems:
        raise ExportError(
            f"vLLM fuses q/k/v_proj into qkv_proj and gate/up_proj into gate_up_proj and requires one scheme per fused "
            f"layer, but {len(problems)} fused layer(s) mix int4 and float members:\n"
            + "\n".join(f"  {p}" for p in problems[:6]) + ("\n  ..." if len(problems) > 6 else "")
            + "\nQuantize every member (remove the one skipped from skip=) or skip them all, e.g. "
            "skip=['*.k_proj', '*.q_proj', '*.v_proj'], then prepare and train again"
        )


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
