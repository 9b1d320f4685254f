"""What llama.cpp needs to know about each model family, in one place: the GGUF architecture,
the hyperparameter keys, the tensor names and the layout transforms, following llama.cpp's
own converter (`convert_hf_to_gguf.py` and its `conversion/` package, llama-cpp-python
0.3.36), which tests/export/test_gguf_reference.py runs as the reference.

Tensor names come from gguf-py's tables (`gguf.get_tensor_name_map`), not from a table of
ours; a tensor they do not name is refused. The hyperparameters are read from the model's
transformers config as the converter reads them (`AutoConfig.to_dict()`, `text_config`
merged in), so a key the converter writes from config.json is written from the same value.

A family here is a transformers `model_type` the converter writes with a dense decoder
architecture of llama.cpp; its transforms are the ones that reach quantized weights: Llama's
q/k row permutation (llama.cpp rotates adjacent pairs, Hugging Face the two halves of each
head), a row permutation, so codes and scales move unchanged. Gemma's norms (stored as
1 + w) and Llama 3's `rope_freqs` touch float tensors only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from qatfx.export.llama_layout import UnsupportedModel, llama_hparams


@dataclass(frozen=True)
class Family:
    """How llama.cpp's converter writes one transformers `model_type`."""

    arch: str  # gguf.MODEL_ARCH member
    permute_qk: bool = False  # LlamaModel.undo_permute: q/k rows to llama.cpp's adjacent rotary pairs
    llama_converter: bool = False  # written by conversion/llama.py LlamaModel: its extra keys and set_vocab
    phi3_converter: bool = False  # conversion/phi.py Phi3MiniModel: its own keys, vocabulary and longrope factors
    gemma3_converter: bool = False  # conversion/gemma.py Gemma3Model: norms as 1 + w, its keys, the embedding cut to the tokenizer


# model_type -> Family; conversion/llama.py registers MistralForCausalLM as LlamaModel, and
# SmolLM2 is a LlamaForCausalLM.
FAMILIES = {
    "llama": Family("LLAMA", permute_qk=True, llama_converter=True),
    "mistral": Family("LLAMA", permute_qk=True, llama_converter=True),
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3"),
    "phi3": Family("PHI3", phi3_converter=True),
    "gemma3_text": Family("GEMMA3", gemma3_converter=True),
}


def family_of(hparams: dict) -> Family:
    model_type = hparams.get("model_type", "llama")
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModel(
            f"model_type {model_type!r} has no GGUF export here; supported: {', '.join(sorted(FAMILIES))} "
            "(export it to compressed-tensors with qatfx.export.hf, or to ExecuTorch)"
        )
    return family


def hparams_of(config: Any) -> dict:
    """The converter's view of a config: `to_dict()` with `text_config` merged in. A qatfx
    recipes LMConfig (the demo's CausalLM) is described as the LlamaConfig it is."""
    if hasattr(config, "to_dict") and hasattr(config, "model_type"):
        hparams = config.to_dict()
        if isinstance(hparams.get("text_config"), dict):
            hparams = {**hparams, **hparams["text_config"]}
        return hparams
    # a recipes LMConfig (or anything else llama_hparams reads or refuses): the Llama it describes
    return {"model_type": "llama", **dataclasses.asdict(llama_hparams(config))}


def _find(hparams: dict, keys: tuple) -> Any:
    return next((hparams[k] for k in keys if k in hparams), None)


def rope_parameters(hparams: dict) -> dict:
    """TextModel.__init__'s rope_parameters: rope_parameters (transformers 5) or rope_scaling,
    with rope_theta and the scaling type mirrored in."""
    rope = dict(hparams.get("rope_parameters", hparams.get("rope_scaling")) or {})
    theta = _find(hparams, ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"))
    local_theta = _find(hparams, ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq"))
    if "full_attention" not in rope and "sliding_attention" not in rope:
        if local_theta is not None:
            rope["sliding_attention"] = {"rope_theta": local_theta}
        if "rope_theta" not in rope and theta is not None:
            rope["rope_theta"] = theta
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
        for key in ("partial_rotary_factor", "original_max_position_embeddings"):
            if key not in rope and hparams.get(key) is not None:
                rope[key] = hparams[key]
    return rope


def block_count(hparams: dict) -> int:
    return _find(hparams, ("n_layers", "num_hidden_layers", "n_layer", "num_layers"))


def head_dim(hparams: dict) -> int:
    return hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]


def write_hparams(gguf, writer, hparams: dict, family: Family) -> None:
    """TextModel.set_gguf_parameters for a dense decoder (+ LlamaModel's keys), or Phi-3's own."""
    if family.phi3_converter:
        _write_phi3_hparams(writer, hparams)
        return
    writer.add_block_count(block_count(hparams))
    for keys, add in (
        (("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length"), writer.add_context_length),
        (("hidden_size", "n_embd", "dim"), writer.add_embedding_length),
        (("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner", "hidden_dim"), writer.add_feed_forward_length),
        (("num_attention_heads", "n_head", "n_heads"), writer.add_head_count),
        (("num_key_value_heads", "n_kv_heads"), writer.add_head_count_kv),
    ):
        value = _find(hparams, keys)
        if value is not None:
            add(value)
    rope = rope_parameters(hparams)
    params = rope.get("full_attention", rope)
    rope_type = params.get("rope_type")
    if rope_type not in (None, "default", "llama3"):  # llama3: rope_freqs (extra_tensors)
        _write_rope_scaling(gguf, writer, rope_type, params)
    if params.get("rope_theta") is not None:
        writer.add_rope_freq_base(params["rope_theta"])
    if rope.get("sliding_attention", {}).get("rope_theta") is not None:
        writer.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    if (eps := _find(hparams, ("rms_norm_eps", "norm_eps"))) is not None:
        writer.add_layer_norm_rms_eps(eps)
    if (eps := _find(hparams, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        writer.add_layer_norm_eps(eps)
    if hparams.get("head_dim") is not None:
        writer.add_key_length(hparams["head_dim"])
        writer.add_value_length(hparams["head_dim"])
    if family.llama_converter:
        writer.add_vocab_size(hparams["vocab_size"])
        writer.add_rope_dimension_count(head_dim(hparams))
    if family.gemma3_converter:
        _write_gemma3_hparams(writer, hparams, rope)


def _write_gemma3_hparams(writer, hparams: dict, rope: dict) -> None:
    """Gemma3Model.set_gguf_parameters: its defaults and keys over the base ones."""
    writer.add_context_length(hparams.get("max_position_embeddings", 131072))
    writer.add_head_count(hparams.get("num_attention_heads", 8))
    writer.add_layer_norm_rms_eps(hparams.get("rms_norm_eps", 1e-6))
    writer.add_key_length(hparams.get("head_dim", 256))
    writer.add_value_length(hparams.get("head_dim", 256))
    writer.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
    if hparams.get("attn_logit_softcapping") is not None:
        raise UnsupportedModel("attention logit softcapping has no GGUF form in llama.cpp's Gemma 3 converter")
    if hparams.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(hparams["final_logit_softcapping"])
    if hparams.get("sliding_window_pattern") != 1:
        writer.add_sliding_window(hparams["sliding_window"])
    writer.add_head_count_kv(hparams.get("num_key_value_heads", 4))


def _phi3_rope(hparams: dict) -> tuple[dict, int]:
    rope = rope_parameters(hparams)
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * hparams["hidden_size"]) // hparams["num_attention_heads"]
    return rope, rope_dims


def _write_phi3_hparams(writer, hparams: dict) -> None:
    """Phi3MiniModel.set_gguf_parameters."""
    rope, rope_dims = _phi3_rope(hparams)
    writer.add_context_length(_find(hparams, ("n_positions", "max_position_embeddings")))
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_block_count(block_count(hparams))
    writer.add_head_count(hparams["num_attention_heads"])
    writer.add_head_count_kv(hparams["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    writer.add_rope_dimension_count(rope_dims)
    writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    writer.add_sliding_window(hparams.get("sliding_window") or 0)
    longrope = _phi3_longrope(hparams)
    if longrope is not None:
        writer.add_rope_scaling_attn_factors(longrope[0])


def _phi3_longrope(hparams: dict) -> Optional[tuple[float, list, list]]:
    """Phi3MiniModel.generate_extra_tensors: (attention factor, long factors, short factors)
    of longrope scaling; None without it."""
    rope, rope_dims = _phi3_rope(hparams)
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long:
        return None
    scale = _find(hparams, ("n_positions", "max_position_embeddings")) / rope["original_max_position_embeddings"]
    kind = (rope.get("rope_type") or "").lower()
    if kind in ("su", "longrope"):
        attn = math.sqrt(1 + math.log(scale) / math.log(rope["original_max_position_embeddings"])) if scale > 1.0 else 1.0
    elif kind == "yarn":
        attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        raise UnsupportedModel(f"Phi-3 RoPE scaling {kind!r} has no GGUF form in llama.cpp's converter")
    if short is None or len(long) != len(short) or len(long) != rope_dims / 2:
        raise UnsupportedModel(f"Phi-3 longrope needs long_factor and short_factor of {rope_dims // 2} values each")
    return attn, long, short


def extra_tensors(gguf, hparams: dict, family: Family) -> dict:
    """Tensors the converter generates from the config (F32): Llama 3.1+'s rope_freqs, Phi-3's
    longrope factors."""
    names = gguf.TENSOR_NAMES
    if family.phi3_converter:
        longrope = _phi3_longrope(hparams)
        if longrope is None:
            return {}
        _, long, short = longrope
        return {
            names[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight": torch.tensor(long, dtype=torch.float32),
            names[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight": torch.tensor(short, dtype=torch.float32),
        }
    factors = llama3_rope_factors(hparams)
    return {} if factors is None else {names[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": factors}


def _write_rope_scaling(gguf, writer, rope_type: str, params: dict) -> None:
    factor = params.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        for key, add in (
            ("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if params.get(key) is not None:
                add(params[key])
        if (attn := params.get("attention_factor", params.get("attn_factor"))) is not None:
            writer.add_rope_scaling_yarn_attn_factor(attn)
    elif rope_type in ("su", "longrope"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    else:
        raise UnsupportedModel(f"RoPE scaling {rope_type!r} has no GGUF form in llama.cpp's converter")


def llama3_rope_factors(hparams: dict) -> Optional[torch.Tensor]:
    """Llama 3.1+'s frequency factors (`rope_freqs.weight`, F32, head_dim / 2 values), computed
    as LlamaModel.generate_extra_tensors does; None without llama3 scaling."""
    rope = rope_parameters(hparams)
    params = rope.get("full_attention", rope)
    if (params.get("rope_type") or "").lower() != "llama3":
        return None
    base = params.get("rope_theta", 10000.0)
    dim = head_dim(hparams)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_context = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def rotary_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k rows (weights, their scales' rows, biases) from Hugging Face's rotate-half
    layout to llama.cpp's adjacent pairs (LlamaModel.permute): a permutation, so codes and
    scales move unchanged."""
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def row_transform(hf_name: str, hparams: dict, family: Family, vocab_rows: Optional[int] = None) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The row permutation or selection llama.cpp's converter applies to this tensor, or None.
    vocab_rows: Gemma 3's converter keeps the embedding rows of the tokenizer's tokens only."""
    if family.gemma3_converter and hf_name == "model.embed_tokens.weight" and vocab_rows is not None:
        return lambda rows: rows[:vocab_rows]
    if not family.permute_qk:
        return None
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        heads = hparams["num_attention_heads"]
    elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        heads = hparams.get("num_key_value_heads") or hparams["num_attention_heads"]
    else:
        return None
    return lambda rows: rotary_rows(rows, heads)


def value_shift(hf_name: str, family: Family) -> float:
    """What the converter adds to a float tensor: Gemma 3 stores its RMSNorm weights as 1 + w
    (Gemma3Model.norm_shift), as llama.cpp multiplies by the stored weight."""
    return 1.0 if family.gemma3_converter and hf_name.endswith("norm.weight") else 0.0


def tensor_namer(gguf, hparams: dict, family: Family) -> Callable[[str], str]:
    """Hugging Face tensor name -> GGUF name, from gguf-py's table for the architecture."""
    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.arch), block_count(hparams))

    def name(hf_name: str) -> str:
        found = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise UnsupportedModel(f"{hf_name} has no tensor in llama.cpp's {family.arch.lower()} architecture (gguf-py's name table)")
        return found

    return name
