"""Real model families, small and with random weights from their configs (no downloads).

Each family is a `Family`: a builder returning `(model, vocab)` in eval mode, the linear
layers qatfx should quantize and skip with 8da4w at group size 32, and the workaround it
needs (docs/models.md records the table). Sizes are shared: hidden 64, 2 layers, 4 heads
(2 kv heads), head_dim 16, MLP 128, vocab 128.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

VOCAB = 128
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
MLP = 128


class Logits(torch.nn.Module):
    """Return the logits tensor, not the ModelOutput (and no KV cache). qatfx does not need
    it (a ModelOutput without a cache exports fine); tests/test_models.py uses it to get a
    tensor out of the compiled module."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits


def logits(output) -> torch.Tensor:
    """The logits of a model output: a tensor, or a Hugging Face ModelOutput."""
    return output if isinstance(output, torch.Tensor) else output.logits


def _hf(config_name: str, model_name: str, **config) -> Callable[[], tuple[torch.nn.Module, int]]:
    def build():
        import transformers  # a declared test dependency: a broken install fails, not skips

        defaults = dict(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
            max_position_embeddings=64, tie_word_embeddings=False, attn_implementation="sdpa",
            # the one workaround HF models need: no KV cache object in the output, which
            # torch.export cannot return (qatfx.CaptureError says so and names use_cache)
            use_cache=False,
            # special tokens inside the small vocabulary (the defaults are 32000 and up)
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        defaults.update(config)
        torch.manual_seed(0)
        return getattr(transformers, model_name)(getattr(transformers, config_name)(**defaults)).eval(), VOCAB

    return build


def _gpt2():
    import transformers  # a declared test dependency: a broken install fails, not skips
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
        n_inner=4 * HIDDEN, use_cache=False, attn_implementation="sdpa", bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval(), VOCAB


def install_torchtune_nf4_shim() -> None:
    """torchtune 0.6.1 imports torchao.dtypes.nf4tensor, which torchao 0.18 (our parity
    reference) moved; point the old name at the new module (test-only)."""
    sys.modules.setdefault(
        "torchao.dtypes.nf4tensor",
        importlib.import_module("torchao.quantization.quantize_.workflows.nf4.nf4_tensor"),
    )


def _torchtune_llama3_2():
    install_torchtune_nf4_shim()
    from torchtune.models.llama3_2 import llama3_2

    torch.manual_seed(0)
    model = llama3_2(
        vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, embed_dim=HIDDEN,
        max_seq_len=64, intermediate_dim=MLP, tie_word_embeddings=True,
    ).eval()
    return model, VOCAB


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], tuple[torch.nn.Module, int]]
    quantized: int  # linear layers qatfx quantizes (8da4w, group size 32)
    skipped: dict = field(default_factory=dict)  # layer -> substring of its skip reason
    k_by_n: int = 0  # quantized layers whose weight is stored (K, N) (GPT-2 Conv1D)
    tied: bool = False  # lm_head reads the embedding's weight
    workaround: str = ""
    long_only: bool = False  # only in `pytest -m long` (a variant of a default family)


_LLAMA_LIKE = LAYERS * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
_NO_CACHE = "use_cache=False"

FAMILIES = [
    Family("hf_llama", _hf("LlamaConfig", "LlamaForCausalLM"), _LLAMA_LIKE, workaround=_NO_CACHE),
    Family("hf_llama_tied", _hf("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=True), _LLAMA_LIKE, tied=True, workaround=_NO_CACHE),
    Family(
        "hf_llama_eager_attn", _hf("LlamaConfig", "LlamaForCausalLM", attn_implementation="eager"), _LLAMA_LIKE,
        workaround=_NO_CACHE, long_only=True,
    ),
    Family("hf_qwen2", _hf("Qwen2Config", "Qwen2ForCausalLM"), _LLAMA_LIKE, workaround=_NO_CACHE),
    Family("hf_mistral", _hf("MistralConfig", "MistralForCausalLM"), _LLAMA_LIKE, workaround=_NO_CACHE),
    # fused qkv_proj and gate_up_proj: 4 linears per layer
    Family("hf_phi3", _hf("Phi3Config", "Phi3ForCausalLM"), LAYERS * 4 + 1, workaround=_NO_CACHE),
    Family("hf_gemma", _hf("GemmaConfig", "GemmaForCausalLM", tie_word_embeddings=True), _LLAMA_LIKE, tied=True, workaround=_NO_CACHE),
    # Conv1D is addmm(bias, x, W) with W stored (K, N): c_attn, attn.c_proj, c_fc, mlp.c_proj;
    # lm_head is an nn.Linear tied to wte
    Family("hf_gpt2", _gpt2, LAYERS * 4 + 1, k_by_n=LAYERS * 4, tied=True, workaround=_NO_CACHE),
    Family("torchtune_llama3_2", _torchtune_llama3_2, _LLAMA_LIKE, tied=True),
]

BY_NAME = {f.name: f for f in FAMILIES}

# Llama 3.1+ RoPE scaling (transformers' rope_type "llama3"), its original context shrunk to the
# test models' 64 positions so that every frequency band is exercised
LLAMA3_ROPE = dict(
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64},
    rope_theta=500000.0,
)
# docs/deploy.md's families x targets matrix: name -> (config class, model class, config overrides)
DEPLOY_FAMILIES = {
    "llama3_2": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, **LLAMA3_ROPE)),
    "qwen2_5": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(tie_word_embeddings=True, sliding_window=4)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
}


def deploy_family(name: str) -> tuple[torch.nn.Module, int]:
    """A DEPLOY_FAMILIES model with transformers' default config (use_cache=True)."""
    config_class, model_class, overrides = DEPLOY_FAMILIES[name]
    return _hf(config_class, model_class, use_cache=True, **overrides)()


def hf_llama_logits():
    """The HF Llama causal LM wrapped to return the logits tensor."""
    model, vocab = BY_NAME["hf_llama"].build()
    return Logits(model), vocab


def torchtune_llama3_2():
    return BY_NAME["torchtune_llama3_2"].build()


# ---- the user's model must come out of prepare_pt2e untouched --------------------------------


@dataclass
class ModelSnapshot:
    """What prepare_pt2e must not change in the model it is given."""

    values: dict
    tensors: dict  # name -> the Parameter / buffer object itself
    requires_grad: dict
    training: list
    modules: list

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelSnapshot":
        state = model.state_dict(keep_vars=True)
        return cls(
            values={k: v.detach().clone() for k, v in state.items()},
            tensors=dict(state),
            requires_grad={k: p.requires_grad for k, p in model.named_parameters()},
            training=[(name, m.training) for name, m in model.named_modules()],
            modules=[(name, type(m), m) for name, m in model.named_modules()],
        )

    def assert_unchanged(self, model: torch.nn.Module) -> None:
        now = ModelSnapshot.of(model)
        assert now.values.keys() == self.values.keys()
        for name, value in self.values.items():
            assert torch.equal(now.values[name], value), f"{name} changed"
            assert now.tensors[name] is self.tensors[name], f"{name} was replaced"
        assert now.requires_grad == self.requires_grad
        assert now.training == self.training
        assert [(n, t) for n, t, _ in now.modules] == [(n, t) for n, t, _ in self.modules]
        assert all(a is b for (_, _, a), (_, _, b) in zip(now.modules, self.modules))
