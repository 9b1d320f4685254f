"""`save_peft_adapters(prepared, directory)`: a prepared model's LoRA adapters alone, in the
layout the `peft` package saves and loads (`PeftModel.from_pretrained(base, directory)`):

    adapter_model.safetensors   per adapted linear, under its Hugging Face module path M:
                                `base_model.model.M.lora_A.weight` (r x K) and
                                `base_model.model.M.lora_B.weight` (N x r), in the adapters' dtype
    adapter_config.json         peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha (so
                                peft's scale alpha / r is qatfx's), lora_dropout, target_modules,
                                bias "none", fan_in_fan_out false (weights are (N, K))

The layout was read from peft 0.21's `save_pretrained` output and `LoraLayer` (qatfx's A / B
are peft's lora_A / lora_B weights, and peft merges W + (B @ A) * s), not guessed. peft
itself is not imported: writing needs only safetensors.

Module paths are Hugging Face names (`qatfx.export.llama_layout.hf_name_map`): an HF model
prepared directly (`model.layers.0.self_attn.q_proj`), one wrapped in a single module
(`lm.model.…`), or the recipes' CausalLM (`blocks.0.q_proj` -> its Llama name).

The adapters were trained against the fake-quantized base. The deployment that reproduces
training is `convert_pt2e(merge_lora(prepared))` (bit for bit in merge_consistent mode).
Loaded by peft onto the float base, they compute W x + s B A x in float: an approximation
of the trained model, off by the quantization error training saw (of W + sBA in
merge_consistent mode, of W in torchtune mode, and of the activations in both).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from qatfx.export.llama_layout import UnsupportedModel, hf_name_map
from qatfx.passes.lora import LoRA, lora_state

log = logging.getLogger("qatfx.export")

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
ADAPTER_CONFIG = "adapter_config.json"  # peft's CONFIG_NAME
PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> the user's model


def _adapted(prepared: Any) -> tuple[Any, dict]:
    """The graph module (behind a torch.compile wrapper) and its LoRA state, or a ValueError."""
    gm = getattr(prepared, "_orig_mod", prepared)
    state = lora_state(gm) if isinstance(getattr(gm, "meta", None), dict) else None
    if state is None:
        raise ValueError(
            "save_peft_adapters: this model has no LoRA adapters; pass the model prepare_pt2e(..., lora=qatfx.LoRA(...)) "
            "returned (not its merge_lora copy, whose adapters are folded into the weights)"
        )
    return gm, state


def _module_paths(weights: list) -> dict:
    """{adapted weight name: Hugging Face module path}; a ValueError names the weights that
    have no Hugging Face name."""
    try:
        mapping = hf_name_map(weights)
    except UnsupportedModel as exc:
        unmapped = []
        for name in weights:
            try:
                hf_name_map([name])
            except UnsupportedModel:
                unmapped.append(name)
        raise ValueError(
            f"save_peft_adapters: the adapted weights {unmapped or weights} have no Hugging Face module name; "
            f"the PEFT layout addresses adapters by the HF model's module paths (an HF model, or the recipes' "
            f"Llama CausalLM): {exc}"
        ) from exc
    return {name: hf.removesuffix(".weight") for name, hf in mapping.items()}


def _target_modules(gm: Any, adapted_layers: set, paths: list) -> list:
    """peft's target_modules: the leaf names (q_proj, ...) when they pick out exactly the
    adapted layers, else the full module paths (peft matches a target by equality or as a
    dotted suffix; leaf names of a partly adapted family would add adapters peft finds no
    weights for)."""
    leaves = sorted({path.rsplit(".", 1)[-1] for path in paths})
    others = [
        r.layer for r in getattr(gm, "qatfx_layers", [])
        if r.layer.rsplit(".", 1)[-1] in leaves and r.layer not in adapted_layers
    ]
    return sorted(paths) if others else leaves


def adapter_config(config: LoRA, target_modules: list, base_model_name_or_path: Optional[str]) -> dict:
    """The fields of peft's LoraConfig that describe qatfx's adapters; peft fills the rest
    with its defaults."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,  # scale alpha / r, as qatfx's
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_peft_adapters(
    prepared: Any, directory: Union[str, os.PathLike], *, base_model_name_or_path: Optional[str] = None,
) -> Path:
    """Write the LoRA adapters of `prepared` (either mode; the torch.compile wrapper is
    accepted) to `directory` in peft's layout (module docstring), and return its path.
    `base_model_name_or_path` is recorded in adapter_config.json for peft's
    `AutoPeftModel*` loaders (the base weights are not written).

    The adapters were trained against the fake-quantized base: deploy with
    `convert_pt2e(merge_lora(prepared))`, which reproduces training; on a float base in peft
    they are an approximation (off by the base's quantization error).
    """
    from safetensors.torch import save_file

    gm, state = _adapted(prepared)
    config: LoRA = state["config"]
    layers: dict = state["layers"]  # {layer: weight name}
    paths = _module_paths(list(layers.values()))
    tensors = {}
    for weight in layers.values():
        owner = gm.get_submodule(weight.rpartition(".")[0]) if "." in weight else gm
        leaf = weight.rpartition(".")[2]
        for ab, suffix in (("A", "_lora_a"), ("B", "_lora_b")):
            tensor = getattr(owner, leaf + suffix).detach()
            tensors[f"{PREFIX}{paths[weight]}.lora_{ab}.weight"] = tensor.to("cpu", copy=True).contiguous()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    targets = _target_modules(gm, set(layers), list(paths.values()))
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(config, targets, base_model_name_or_path), indent=2) + "\n")
    log.info("qatfx: wrote %d LoRA adapters (%s mode, rank %d) in peft's layout to %s", len(layers), config.mode, config.rank, out)
    return out
