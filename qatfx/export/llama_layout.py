"""The Llama architecture of a converted model, whichever code defined it: Hugging Face's
`LlamaForCausalLM` or qatfx's own `recipes.model.CausalLM` (the demo's model). File-format
exports (GGUF, compressed-tensors) write Llama tensors under one naming, Hugging Face's, and
the hyperparameters a loader needs.

Both models rotate the two halves of each head (`rotate_half`), as Hugging Face checkpoints
do; a runtime that rotates adjacent pairs (llama.cpp) permutes the q/k rows on export.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

# qatfx.recipes.model.CausalLM name -> Hugging Face LlamaForCausalLM name
_CAUSAL_LM_NAMES = (
    (r"^embed\.weight$", "model.embed_tokens.weight"),
    (r"^blocks\.(\d+)\.attn_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^blocks\.(\d+)\.([qkvo])_proj\.(weight|bias)$", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"^blocks\.(\d+)\.mlp_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^blocks\.(\d+)\.(gate|up|down)_proj\.weight$", r"model.layers.\1.mlp.\2_proj.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
)
# computed buffers a file does not carry (the loader recomputes them from the hyperparameters:
# RoPE tables, Gemma's sqrt(hidden) embedding scale)
_DERIVED = re.compile(r"(^|\.)(rope_cos|rope_sin|\w*inv_freq|embed_scale)$")


@dataclass(frozen=True)
class LlamaHParams:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class UnsupportedModel(ValueError):
    """The model is not a Llama-architecture model these exports can write."""


def llama_hparams(config: Any) -> LlamaHParams:
    """From a transformers decoder config (Llama, Qwen2/3, Mistral, Phi-3, Gemma: the fields
    every one of them has; a multimodal config's text_config) or a recipes LMConfig."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if hasattr(config, "num_hidden_layers"):
        return LlamaHParams(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads or config.num_attention_heads,
            rms_norm_eps=float(getattr(config, "rms_norm_eps", 0.0)), rope_theta=float(_rope_theta(config)),
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )
    if hasattr(config, "dim") and hasattr(config, "rope_base"):
        if not config.rope or config.o_proj_bias or config.dropout:
            raise UnsupportedModel(
                "this CausalLM is not a Llama: it needs rope=True, o_proj_bias=False and dropout=0 to be written as one"
            )
        return LlamaHParams(
            vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden,
            num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.n_kv_heads,
            rms_norm_eps=float(config.norm_eps), rope_theta=float(config.rope_base),
            max_position_embeddings=config.max_seq, tie_word_embeddings=bool(config.tie_embeddings),
        )
    raise UnsupportedModel(
        f"cannot read decoder hyperparameters from a {type(config).__name__}; pass config= the model's transformers "
        "config or a qatfx.recipes.model.LMConfig"
    )


def _rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers >= 5 keeps it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return theta


def config_of(converted: torch.nn.Module, config: Optional[Any]) -> Any:
    """The model's own config (region capture keeps the model object), else the one passed."""
    found = config if config is not None else getattr(getattr(converted, "_orig_mod", converted), "config", None)
    if found is None:
        raise UnsupportedModel(
            "this converted model carries no config (a whole-model capture is a GraphModule); "
            "pass config= the model's transformers LlamaConfig or qatfx.recipes.model.LMConfig"
        )
    return found


def hf_name(name: str) -> Optional[str]:
    """A tensor's Hugging Face Llama name; None for a derived buffer (RoPE tables)."""
    if _DERIVED.search(name):
        return None
    if name.startswith(("model.", "lm_head.")):
        return name
    for pattern, replacement in _CAUSAL_LM_NAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    raise UnsupportedModel(f"tensor {name!r} has no place in a Llama checkpoint; is this a Llama-architecture model?")


def hf_name_map(names) -> dict:
    """{source name: Hugging Face name, or None for a derived buffer}. A model wrapped in one
    module (`qatfx finetune`'s `LogitsOnly(lm)`: names `lm.model.…`) is read under the wrapper."""
    names = list(names)
    try:
        return {name: hf_name(name) for name in names}
    except UnsupportedModel as first:
        heads = {name.split(".", 1)[0] for name in names if "." in name}
        if len(heads) == 1 and all("." in name for name in names):
            head = heads.pop() + "."
            try:
                return {name: hf_name(name.removeprefix(head)) for name in names}
            except UnsupportedModel:
                pass
        raise first


def hf_names(names) -> dict:
    """{Hugging Face name: source name} for the tensors a file carries."""
    return {target: name for name, target in hf_name_map(names).items() if target is not None}


def expected_tensors(hp: LlamaHParams) -> list:
    """Every Hugging Face name a Llama with these hyperparameters has (lm_head only untied)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(hp.num_hidden_layers):
        layer = f"model.layers.{i}."
        names += [layer + "input_layernorm.weight", layer + "post_attention_layernorm.weight"]
        names += [f"{layer}self_attn.{p}_proj.weight" for p in "qkvo"]
        names += [f"{layer}mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    if not hp.tie_word_embeddings:
        names.append("lm_head.weight")
    return names
