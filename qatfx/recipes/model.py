"""The toy Llama: a small Llama-style causal LM (RMSNorm, RoPE, SwiGLU, untied head).

The demo's model, and the one model the tests, examples and benchmarks share. Every
projection is an `nn.Linear` without bias, as in Llama, so qatfx quantizes all of them
(attention q/k/v/o, MLP gate/up/down, and the output head).

`LMConfig`'s options after `rope_base` exist for those other users (grouped-query attention,
no RoPE, a biased o_proj, tied embeddings, dropout, PyTorch's default init); at their
defaults the model is the demo's, parameter for parameter and op for op. `CausalLM(config,
dtype=torch.bfloat16)` builds a low-precision model (norm statistics and RoPE in fp32), and
`CausalLM.decode_step` runs one KV-cache decode step as a pure function (benchmarks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int
    dim: int = 128
    layers: int = 4
    heads: int = 4
    hidden: int = 384  # SwiGLU width (~3 x dim, a multiple of the group sizes used)
    max_seq: int = 256
    rope_base: float = 10000.0
    # Options for the tests, examples and benchmarks; the defaults are the demo's.
    kv_heads: Optional[int] = None  # grouped-query attention; None: one kv head per head
    norm_eps: float = 1e-6
    rope: bool = True  # False: no position encoding (attention stays causal)
    o_proj_bias: bool = False  # one biased linear, for tests (Llama has none)
    tie_embeddings: bool = False  # lm_head reads the embedding's weight
    dropout: float = 0.0  # on the attention and MLP outputs, before the residual adds
    init_std: Optional[float] = 0.02  # None: PyTorch's default init (logits of order one)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    def to_dict(self) -> dict:
        # Options at their defaults are left out, so the demo's report and its float-model
        # cache key (a hash of this dict) are what they were before the options existed.
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in _DEMO_FIELDS or getattr(self, f.name) != f.default}


_DEMO_FIELDS = ("vocab_size", "dim", "layers", "heads", "hidden", "max_seq", "rope_base")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:  # the statistic in fp32 for a bf16 model, as Llama's code does
            return self._normalize(x.float()).to(x.dtype) * self.weight
        return self._normalize(x) * self.weight

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rope_tables(head_dim: int, max_seq: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); rotates pairs (first half, second half). cos / sin
    are fp32 (seq, head_dim // 2); a bf16 x is rotated in fp32."""
    if x.dtype != torch.float32:
        return apply_rope(x.float(), cos, sin).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    def __init__(self, config: LMConfig, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.heads, config.n_kv_heads, config.head_dim
        dim, kv_dim, eps = config.dim, config.n_kv_heads * config.head_dim, config.norm_eps
        self.attn_norm = RMSNorm(dim, eps, dtype)
        self.q_proj = nn.Linear(dim, dim, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(dim, kv_dim, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(dim, kv_dim, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(dim, dim, bias=config.o_proj_bias, dtype=dtype)
        self.mlp_norm = RMSNorm(dim, eps, dtype)
        self.gate_proj = nn.Linear(dim, config.hidden, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(dim, config.hidden, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(config.hidden, dim, bias=False, dtype=dtype)
        # no module at p = 0: the demo's module tree and graph have no dropout
        self.dropout = nn.Dropout(config.dropout) if config.dropout else None

    def forward(self, x: torch.Tensor, cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (batch, seq, dim); cos / sin None: no RoPE."""
        b, t, d = x.shape
        q, k, v = self._qkv(self.attn_norm(x), cos, sin)
        n_rep = self.heads // self.kv_heads
        if n_rep > 1:  # grouped-query attention as Llama's code: query head h reads kv head h // n_rep
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self._drop(self.o_proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self._drop(self._mlp(x))

    def decode(self, x, cos, sin, mask, input_pos, k_cache, v_cache):
        """One token (x: (batch, 1, dim)) against the caches (batch, kv_heads, max_seq,
        head_dim); writes this token's key/value at input_pos out of place (no mutation, so
        torch.export captures it). Returns (x, k_cache, v_cache)."""
        b = x.shape[0]
        q, k, v = self._qkv(self.attn_norm(x), cos, sin)
        k_cache = k_cache.index_copy(2, input_pos, k)
        v_cache = v_cache.index_copy(2, input_pos, v)
        # Grouped-query attention for one token without repeating the cache: the query heads
        # sharing a kv head (head h uses kv head h // n_rep) become its query-length dim.
        q = q.reshape(b, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        a = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        x = x + self.o_proj(a.reshape(b, 1, self.heads * self.head_dim))
        return x + self._mlp(x), k_cache, v_cache

    def _qkv(self, h, cos, sin):
        b, t, _ = h.shape

        def heads(proj: nn.Linear, n: int) -> torch.Tensor:
            return proj(h).view(b, t, n, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj, self.heads), heads(self.k_proj, self.kv_heads), heads(self.v_proj, self.kv_heads)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp_norm(x)
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.dropout is None else self.dropout(x)


class CausalLM(nn.Module):
    """Build under `with torch.device(...)` to allocate on that device directly; pass `dtype`
    rather than casting afterwards (`.to(dtype)` would also cast the fp32 RoPE tables)."""

    def __init__(self, config: LMConfig, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim, dtype=dtype)
        self.blocks = nn.ModuleList(Block(config, dtype) for _ in range(config.layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, dtype)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False, dtype=dtype)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if config.rope:
            cos, sin = rope_tables(config.head_dim, config.max_seq, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if config.init_std is not None:
            self.apply(lambda module: _init_weights(module, config.init_std))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab)."""
        t = tokens.shape[1]
        cos, sin = (self.rope_cos[:t], self.rope_sin[:t]) if self.config.rope else (None, None)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))

    def decode_step(self, tokens, input_pos, k_cache, v_cache):
        """One decode step as a pure function: tokens (batch, 1) int64, input_pos (1,) int64
        (the position written), k_cache / v_cache (layers, batch, kv_heads, max_seq, head_dim)
        -> (logits (batch, 1, vocab), k_cache, v_cache), the caches with this step written."""
        if tokens.shape[1] != 1:
            raise ValueError(f"decode_step runs one token: tokens must be (B, 1), got {tuple(tokens.shape)}")
        cos, sin = (self.rope_cos[input_pos], self.rope_sin[input_pos]) if self.config.rope else (None, None)
        positions = torch.arange(k_cache.shape[-2], device=tokens.device)
        mask = (positions <= input_pos).view(1, 1, 1, -1)  # attend to the positions written so far
        x = self.embed(tokens)
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block.decode(x, cos, sin, mask, input_pos, k_cache[i], v_cache[i])
            new_k.append(k)
            new_v.append(v)
        return self.lm_head(self.norm(x)), torch.stack(new_k), torch.stack(new_v)


def _init_weights(module: nn.Module, std: float) -> None:
    # GPT-2 style: small normal init keeps the first losses near log(vocab).
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def initial_loss(vocab_size: int) -> float:
    """Cross-entropy of a uniform guess: what an untrained model should start near."""
    return math.log(vocab_size)
