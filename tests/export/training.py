"""A few QAT steps before an export, so the grid written is a trained one, not the
initialization's (shared by the export tests)."""

import torch

from tests.models import tokens


def qat_steps(prepared, vocab: int, steps: int = 2, compiled: bool = False) -> None:
    opt = torch.optim.AdamW(prepared.parameters(), lr=1e-3)
    forward = torch.compile(prepared) if compiled else prepared
    for step in range(steps):
        ids = tokens(2, 8, vocab, 10 + step)
        logits = forward(ids)
        logits = getattr(logits, "logits", logits)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
