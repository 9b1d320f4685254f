"""A Llama-style causal LM whose decode step is a pure function, so torch.export captures it.

    logits, k_cache, v_cache = model(tokens, input_pos, k_cache, v_cache)

tokens (B, 1) int64, input_pos (1,) int64 (the position being written), k_cache / v_cache
(layers, B, kv_heads, max_seq, head_dim). The caches are inputs and outputs: each layer
writes its new key/value with an out-of-place `index_copy`, so the graph has no buffer
mutation (torch.export and qatfx.prepare_pt2e need that) and `torch.compile(mode=
"reduce-overhead")` can replay it as a CUDA graph with the caches fed back in.

The model is the toy Llama (qatfx/recipes/model.py) with grouped-query attention, bf16
weights (norm statistics and RoPE in fp32) and an untied lm_head; `DecodeLM` runs its
`decode_step`. Weights are random (normal, std 0.02): the benchmarks measure speed and
compare numerics between paths, not text quality.
"""

from __future__ import annotations

import torch

from qatfx.recipes.model import CausalLM, LMConfig

# ~1.1B parameters: Llama-3.2-1B's widths (dim 2048, 16 layers, 32/8 heads, ffn 8192) with a
# 32k vocabulary and an untied head; Llama 3's RoPE base and norm eps.
LLAMA_1B = LMConfig(vocab_size=32000, dim=2048, layers=16, heads=32, kv_heads=8, hidden=8192, max_seq=1024, rope_base=500000.0, norm_eps=1e-5)
# The CPU smoke configuration: every path runs in seconds.
TINY = LMConfig(vocab_size=96, dim=64, layers=2, heads=4, kv_heads=2, hidden=128, max_seq=32, rope_base=500000.0, norm_eps=1e-5)


class DecodeLM(CausalLM):
    """The toy Llama whose forward is one decode step, so torch.export captures that step.
    Build under `with torch.device(...)` to allocate the weights on that device directly."""

    def __init__(self, cfg: LMConfig, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(cfg, dtype)

    forward = CausalLM.decode_step


def cache_shape(cfg: LMConfig, batch: int) -> tuple[int, ...]:
    return (cfg.layers, batch, cfg.n_kv_heads, cfg.max_seq, cfg.head_dim)


def initial_state(cfg: LMConfig, batch: int, prompt_len: int, dtype: torch.dtype, device, seed: int = 0):
    """(tokens, input_pos, k_cache, v_cache) for the first decode step after a prompt of
    `prompt_len` tokens: cache positions < prompt_len hold random keys/values (a stand-in for
    prefill), the rest zeros."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    k, v = (torch.zeros(cache_shape(cfg, batch), dtype=dtype) for _ in range(2))
    for cache in (k, v):
        cache[:, :, :, :prompt_len] = torch.randn(cache[:, :, :, :prompt_len].shape, generator=g).to(dtype)
    tokens = torch.randint(0, cfg.vocab_size, (batch, 1), generator=g)
    return tokens.to(device), torch.tensor([prompt_len], device=device), k.to(device), v.to(device)
