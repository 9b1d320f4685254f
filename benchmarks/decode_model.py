"""A Llama-style causal LM whose decode step is a pure function, so torch.export captures it.

    logits, k_cache, v_cache = model(tokens, input_pos, k_cache, v_cache)

tokens (B, 1) int64, input_pos (1,) int64 (the position being written), k_cache / v_cache
(layers, B, kv_heads, max_seq, head_dim). The caches are inputs and outputs: each layer
writes its new key/value with an out-of-place `index_copy`, so the graph has no buffer
mutation (torch.export and qatfx.prepare_pt2e need that) and `torch.compile(mode=
"reduce-overhead")` can replay it as a CUDA graph with the caches fed back in.

RMSNorm, RoPE (rotate-half, as Llama's HF code), grouped-query attention, SwiGLU MLP, an
untied lm_head. Weights are random (normal, std 0.02): the benchmarks measure speed and
compare numerics between paths, not text quality.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class DecodeConfig:
    vocab: int = 32000
    dim: int = 2048
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    ffn: int = 8192
    max_seq: int = 1024
    rope_theta: float = 500000.0  # Llama 3
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def cache_shape(self, batch: int) -> tuple[int, ...]:
        return (self.layers, batch, self.kv_heads, self.max_seq, self.head_dim)


# ~1.1B parameters: Llama-3.2-1B's widths (dim 2048, 16 layers, 32/8 heads, ffn 8192) with a
# 32k vocabulary and an untied head.
LLAMA_1B = DecodeConfig()
# The CPU smoke configuration: every path runs in seconds.
TINY = DecodeConfig(vocab=96, dim=64, layers=2, heads=4, kv_heads=2, ffn=128, max_seq=32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # the statistic in fp32 even for a bf16 model, as Llama's code does
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on (B, heads, T, head_dim) with fp32 cos/sin of shape (T, head_dim // 2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DecodeConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False, dtype=dtype)

    def forward(self, h, cos, sin, mask, input_pos, k_cache, v_cache):
        b = h.shape[0]
        q = apply_rope(self.q_proj(h).view(b, 1, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(h).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = self.v_proj(h).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        k_cache = k_cache.index_copy(2, input_pos, k)
        v_cache = v_cache.index_copy(2, input_pos, v)
        # Grouped-query attention for one token without repeating the cache: the query heads
        # sharing a kv head (head h uses kv head h // n_rep, as Llama's repeat_interleave)
        # become the query-length dim of that kv head.
        n_rep = self.heads // self.kv_heads
        q = q.reshape(b, self.kv_heads, n_rep, self.head_dim)
        o = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        return self.o_proj(o.reshape(b, 1, self.heads * self.head_dim)), k_cache, v_cache


class Block(nn.Module):
    def __init__(self, cfg: DecodeConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.attn = Attention(cfg, dtype)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(cfg.ffn, cfg.dim, bias=False, dtype=dtype)

    def forward(self, x, cos, sin, mask, input_pos, k_cache, v_cache):
        a, k_cache, v_cache = self.attn(self.attn_norm(x), cos, sin, mask, input_pos, k_cache, v_cache)
        x = x + a
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)), k_cache, v_cache


class DecodeLM(nn.Module):
    """Build under `with torch.device(...)` to allocate the weights on that device directly."""

    def __init__(self, cfg: DecodeConfig, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim, dtype=dtype)
        self.layers = nn.ModuleList(Block(cfg, dtype) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False, dtype=dtype)
        # fp32 on purpose: never cast the model with .to(dtype) after construction
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("positions", torch.arange(cfg.max_seq), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, input_pos, k_cache, v_cache):
        if tokens.shape[1] != 1:
            raise ValueError(f"DecodeLM runs one decode step: tokens must be (B, 1), got {tuple(tokens.shape)}")
        x = self.embed(tokens)
        angle = input_pos.float()[:, None] * self.inv_freq  # (1, head_dim // 2)
        cos, sin = angle.cos(), angle.sin()
        mask = (self.positions <= input_pos).view(1, 1, 1, -1)  # attend to positions written so far
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, mask, input_pos, k_cache[i], v_cache[i])
            new_k.append(k)
            new_v.append(v)
        return self.lm_head(self.norm(x)), torch.stack(new_k), torch.stack(new_v)


def initial_state(cfg: DecodeConfig, batch: int, prompt_len: int, dtype: torch.dtype, device, seed: int = 0):
    """(tokens, input_pos, k_cache, v_cache) for the first decode step after a prompt of
    `prompt_len` tokens: cache positions < prompt_len hold random keys/values (a stand-in for
    prefill), the rest zeros."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    k, v = (torch.zeros(cfg.cache_shape(batch), dtype=dtype) for _ in range(2))
    for cache in (k, v):
        cache[:, :, :, :prompt_len] = torch.randn(cache[:, :, :, :prompt_len].shape, generator=g).to(dtype)
    tokens = torch.randint(0, cfg.vocab, (batch, 1), generator=g)
    return tokens.to(device), torch.tensor([prompt_len], device=device), k.to(device), v.to(device)
