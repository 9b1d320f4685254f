"""The whole flow on two real model families (random weights from configs, no downloads):
export -> prepare -> compiled QAT steps -> convert -> prepared == converted exactly, and the
compiled converted model. tests/test_model_families.py runs every family of
tests/model_zoo.py (compiled training there under `pytest -m long`)."""

import pytest
import torch

import qatfx
from tests.model_zoo import hf_llama_logits, torchtune_llama3_2


# compiled QAT of a real model, 1-2.5 min each on 2 cores: the long run (the default run
# compiles the toy model's training in tests/test_compile.py and prepares every family eagerly)
@pytest.mark.long
@pytest.mark.parametrize("build", [hf_llama_logits, torchtune_llama3_2], ids=["hf_llama", "torchtune_llama3_2"])
def test_real_model_flow(build):
    model, vocab = build()
    example = torch.randint(0, vocab, (2, 8))
    prepared = qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(32), (example,))
    summary = qatfx.summary(prepared)
    assert len(summary.quantized) == 2 * 7 + 1, str(summary)  # q,k,v,o,gate,up,down per layer + lm_head

    prepared.train()
    compiled = torch.compile(prepared)
    opt = torch.optim.AdamW(prepared.parameters(), lr=1e-3)
    losses = []
    for step, seq in enumerate([8, 12, 8]):
        t = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(step))
        logits = compiled(t)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), t[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))

    prepared.eval()
    converted = qatfx.convert_pt2e(prepared)
    t = torch.randint(0, vocab, (3, 10), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(converted(t), prepared(t), atol=0, rtol=0)
    with torch.no_grad():  # the converted model is for inference
        compiled_out = torch.compile(converted)(t)
    # Inductor reorders fp32 reductions (RMSNorm, attention): measured 1e-7 relative RMS
    # without flips. An activation within an ulp of a rounding tie gets the neighbouring
    # int8 code, moving one token's logits by ~(1/255)/sqrt(64) = 5e-4 relative, i.e.
    # ~1e-4 over the 30 tokens. The bound allows a few flips; a wrong scale, zero point or
    # packing would be O(1).
    expected = prepared(t)
    rel_rms = ((compiled_out - expected).norm() / expected.norm()).item()
    assert rel_rms < 1e-3, f"compiled converted model off by {rel_rms:.2e} relative RMS"
