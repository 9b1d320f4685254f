"""Training a LoRA-prepared model: only the adapters learn, a run resumes from plain PyTorch
checkpoints (model, optimizer, FakeQuantAfterNSteps) with bit-identical losses, and the
schedule reaches the torchtune mode's fq(W) buffers."""

import pytest
import torch
import torch.nn.functional as F

import qatfx
from qatfx.ops import fake_quantize
from tests.models import Block, TinyLM, tokens
from tests.test_resume import BATCHES, FAKE_QUANT_AFTER, SAVE_AFTER, STEPS, checkpoint, restore

MODES = ["merge_consistent", "torchtune"]
TARGETS = ["*.q_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]  # q/v/o/gate/up/down


def _lora(mode):
    # torchtune mode with adapter dropout: the resume must restore the RNG it draws from
    return qatfx.LoRA(rank=4, alpha=8, targets=TARGETS, mode=mode, dropout=0.1 if mode == "torchtune" else 0.0)


def fresh_run(seed, mode):
    """Model, optimizer over the trainable parameters and schedule, as a LoRA training script
    builds them at its start; another seed gives other base weights and adapters."""
    torch.manual_seed(seed)
    prepared = qatfx.prepare_pt2e(TinyLM(layers=1), qatfx.Int8DynActInt4WeightQuantizer(32), (tokens(),), lora=_lora(mode))
    opt = torch.optim.AdamW([p for p in prepared.parameters() if p.requires_grad], lr=1e-2)
    return prepared, opt, qatfx.FakeQuantAfterNSteps(prepared, n_steps=FAKE_QUANT_AFTER)


def train(run, steps):
    prepared, opt, schedule = run
    losses = []
    for i in steps:
        batch = BATCHES[i]
        logits = prepared(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("mode", MODES)
def test_only_the_adapters_learn(mode):
    prepared, opt, _ = fresh_run(0, mode)
    adapters = {n for n, p in prepared.named_parameters() if p.requires_grad}
    assert len(adapters) == 2 * 6 and all(n.endswith(("_lora_a", "_lora_b")) for n in adapters)
    # the optimizer holds exactly the adapters
    params = {id(p) for group in opt.param_groups for p in group["params"]}
    assert params == {id(p) for n, p in prepared.named_parameters() if n in adapters}
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    train((prepared, opt, qatfx.FakeQuantAfterNSteps(prepared, 0)), range(2))
    for name, p in prepared.named_parameters():
        assert (p.grad is None) or name in adapters, name  # zero_grad(set_to_none) after each step
    after = prepared.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # every B moved off zero; nothing but adapters changed (base weights, norms, embedding)
    assert changed <= adapters and {n for n in adapters if n.endswith("_lora_b")} <= changed


@pytest.mark.parametrize("mode", MODES)
def test_resumed_lora_run_has_bit_identical_losses(mode):
    uninterrupted = fresh_run(0, mode)
    expected = train(uninterrupted, range(STEPS))

    first = fresh_run(0, mode)
    before = train(first, range(SAVE_AFTER))
    data = checkpoint(first)  # model (W, A, B), optimizer (the adapters' moments), schedule, RNG
    del first
    resumed = fresh_run(1, mode)  # other W and adapters: everything must come from the checkpoint
    restore(resumed, data)
    assert not qatfx.fake_quant_enabled(resumed[0])
    after = train(resumed, range(SAVE_AFTER, STEPS))

    assert qatfx.fake_quant_enabled(resumed[0])  # switched on at the same step
    assert torch.equal(torch.cat([before, after]), expected), (torch.cat([before, after]), expected)
    for (name, a), b in zip(uninterrupted[0].state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(a, b), name
    if mode == "torchtune":  # the non-persistent fq(W) buffers followed the load and the switch
        q = resumed[0].get_submodule("blocks.0.q_proj")
        torch.testing.assert_close(q.weight_fq, _fq(resumed[0], q.weight), atol=0, rtol=0)


def _fq(prepared, weight):
    spec = next(n.meta["qatfx_spec"] for n in prepared.graph.nodes if n.meta.get("qatfx_lora_weight"))
    return fake_quantize(weight, **spec.op_kwargs())


def test_schedule_switches_the_frozen_weight():
    """torchtune mode: the graph reads fq(W) from a buffer. Before the switch it holds W
    (fake-quant off), from the switch on fq(W)."""
    prepared, opt, schedule = fresh_run(0, "torchtune")
    q = prepared.get_submodule("blocks.0.q_proj")
    fq_w = _fq(prepared, q.weight)
    assert not torch.equal(fq_w, q.weight)
    for step in range(FAKE_QUANT_AFTER):
        torch.testing.assert_close(q.weight_fq, q.weight, atol=0, rtol=0)
        train((prepared, opt, schedule), [step])
    torch.testing.assert_close(q.weight_fq, fq_w, atol=0, rtol=0)
    assert qatfx.fake_quant_enabled(prepared)


def test_weight_only_with_every_layer_adapted():
    """A weight-only quantizer has no activation fake-quants, and torchtune mode replaces each
    adapted weight's fake-quant by the fq(W) buffer: with every quantized layer adapted, the
    buffers are the graph's only fake-quants. Loads and toggles must still keep their state."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 64)
    prepared = qatfx.prepare_pt2e(Block(64, 64).train(), qatfx.Int4WeightOnlyQuantizer(32), (x,),
                                  lora=qatfx.LoRA(rank=4, alpha=8, targets=["*"], mode="torchtune"))
    q = prepared.q_proj
    fq_w = _fq(prepared, q.weight)
    assert qatfx.fake_quant_enabled(prepared)
    prepared.load_state_dict(prepared.state_dict())  # the load hook recomputes the buffer: still fq(W)
    torch.testing.assert_close(q.weight_fq, fq_w, atol=0, rtol=0)
    qatfx.disable_fake_quant(prepared)
    assert not qatfx.fake_quant_enabled(prepared)
    prepared.load_state_dict(prepared.state_dict())
    torch.testing.assert_close(q.weight_fq, q.weight, atol=0, rtol=0)
    # merged while off: the restored weight fake-quants are off too, like every other site
    merged = qatfx.merge_lora(prepared)
    assert [n.kwargs.get("enabled") for n in merged.graph.nodes if n.target is fake_quantize] == [False] * 7
    qatfx.enable_fake_quant(prepared)
    torch.testing.assert_close(q.weight_fq, fq_w, atol=0, rtol=0)
