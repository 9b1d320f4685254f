"""qatfx quickstart: prepare -> compiled QAT steps -> convert, on a tiny Llama-style model.

    python examples/quickstart.py
"""

import logging

import torch
import torch.nn.functional as F

import qatfx
from qatfx.recipes.model import CausalLM, LMConfig  # the toy Llama: any nn.Module with linears works


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    text = torch.tensor(list(b"quantization-aware training keeps int4 models accurate. " * 40))
    model = CausalLM(LMConfig(vocab_size=256, dim=128, layers=1, heads=4, hidden=384, max_seq=64)).train()
    prepared = qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(group_size=32), (text[:32].view(2, 16),))
    print(qatfx.summary(prepared))

    step = torch.compile(prepared, options=qatfx.compile_options())  # backward recomputes fq(W)
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
