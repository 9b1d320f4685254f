"""Test-sized builds of the toy Llama (qatfx/recipes/model.py), the one model the tests share.

`TinyLM` and `Block` keep the names and defaults of the classes they replace, so call sites
are unchanged: no RoPE, a biased o_proj (a linear with bias to quantize), dropout 0.1, a
tied head, PyTorch's default init, all as before.
"""

from __future__ import annotations

import torch

from qatfx.recipes.model import Block as _Block
from qatfx.recipes.model import CausalLM, LMConfig


def _config(vocab: int = 96, dim: int = 64, layers: int = 2, hidden: int = 128, heads: int = 4, dropout: float = 0.1, tie: bool = True) -> LMConfig:
    return LMConfig(vocab_size=vocab, dim=dim, layers=layers, heads=heads, hidden=hidden, rope=False, o_proj_bias=True, tie_embeddings=tie, dropout=dropout, init_std=None)


def Block(dim: int = 64, hidden: int = 128, heads: int = 4, dropout: float = 0.1) -> _Block:
    """RMSNorm -> causal attention (q/k/v/o) -> RMSNorm -> SwiGLU MLP, with dropout; called as block(x)."""
    return _Block(_config(dim=dim, hidden=hidden, heads=heads, dropout=dropout))


def TinyLM(vocab: int = 96, dim: int = 64, layers: int = 2, tie: bool = True) -> CausalLM:
    """Embedding -> blocks -> norm -> lm_head tied to the embedding."""
    return CausalLM(_config(vocab=vocab, dim=dim, layers=layers, tie=tie))


def tokens(batch: int = 2, seq: int = 8, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
