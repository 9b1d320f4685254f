"""qatfx quickstart: prepare -> compiled QAT steps -> convert, on a tiny Llama-style model.

    python examples/quickstart.py
"""

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

import qatfx


class TinyLM(nn.Module):
    def __init__(self, vocab=256, dim=128):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        x = x + self.down(F.silu(self.up(F.layer_norm(x, x.shape[-1:]))))
        return self.lm_head(x)


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    text = torch.tensor(list(b"quantization-aware training keeps int4 models accurate. " * 40))
    model = TinyLM().train()
    prepared = qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(group_size=32), (text[:32].view(2, 16),))
    print(qatfx.summary(prepared))

    step = torch.compile(prepared)
    opt = torch.optim.AdamW(prepared.parameters(), lr=3e-3)
    for i in range(30):
        seq = 32 + (i % 3) * 8  # variable sequence length, no per-shape state
        start = torch.randint(0, len(text) - seq - 1, (4,))
        batch = torch.stack([text[s : s + seq + 1] for s in start])
        logits = step(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i % 10 == 0:
            print(f"step {i:2d}  loss {loss.item():.3f}")

    prepared.eval()
    quantized = qatfx.convert_pt2e(prepared)
    probe = text[None, :48]
    with torch.no_grad():
        same = torch.equal(quantized(probe), prepared(probe))
    print(f"converted == prepared exactly: {same}")
    assert same


if __name__ == "__main__":
    main()
