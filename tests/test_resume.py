"""Resume mid-QAT with plain PyTorch checkpoints: the prepared model's, the optimizer's and
the FakeQuantAfterNSteps schedule's state_dict() plus the RNG state, loaded into a freshly
prepared model, continue with bit-identical losses (docs/serialization.md)."""

import io

import pytest
import torch
import torch.nn.functional as F

import qatfx
from tests.models import TinyLM, tokens

Q = qatfx.Int8DynActInt4WeightQuantizer
STEPS, SAVE_AFTER, FAKE_QUANT_AFTER = 4, 2, 3  # the schedule switches after the resume
BATCHES = [tokens(4, 16, seed=100 + i) for i in range(STEPS)]


def fresh_run(seed):
    """Model, optimizer and schedule as a training script builds them at its start."""
    torch.manual_seed(seed)
    prepared = qatfx.prepare_pt2e(TinyLM(layers=1), Q(32), (tokens(),))  # train mode: dropout draws from the RNG
    opt = torch.optim.AdamW(prepared.parameters(), lr=1e-2)
    return prepared, opt, qatfx.FakeQuantAfterNSteps(prepared, n_steps=FAKE_QUANT_AFTER)


def train(run, steps, compiled):
    prepared, opt, schedule = run
    forward = torch.compile(prepared) if compiled else prepared
    losses = []
    for i in steps:
        batch = BATCHES[i]
        logits = forward(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def checkpoint(run) -> bytes:
    prepared, opt, schedule = run
    buffer = io.BytesIO()
    torch.save(
        {"model": prepared.state_dict(), "optimizer": opt.state_dict(), "schedule": schedule.state_dict(), "rng": torch.get_rng_state()},
        buffer,
    )
    return buffer.getvalue()


def restore(run, data: bytes) -> None:
    prepared, opt, schedule = run
    state = torch.load(io.BytesIO(data))
    prepared.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])


@pytest.fixture
def deterministic():
    # Inductor's CPU embedding backward scatter-adds with atomics across threads, so even two
    # uninterrupted compiled runs differ in the last bit; deterministic mode falls back to the
    # eager (ordered) index_put. Eager needs nothing.
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


# compiled: five compiles (two runs, a fresh module after the resume, the fake-quant switch), ~75 s
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.long)], ids=["eager", "compiled"])
def test_resumed_run_has_bit_identical_losses(compiled, deterministic):
    uninterrupted = fresh_run(seed=0)
    expected = train(uninterrupted, range(STEPS), compiled)

    first = fresh_run(seed=0)
    before = train(first, range(SAVE_AFTER), compiled)
    data = checkpoint(first)
    del first
    # another seed: every value that matters must come from the checkpoint
    resumed = fresh_run(seed=1)
    assert not qatfx.fake_quant_enabled(resumed[0])
    restore(resumed, data)
    assert resumed[2].steps_done == SAVE_AFTER and not qatfx.fake_quant_enabled(resumed[0])
    after = train(resumed, range(SAVE_AFTER, STEPS), compiled)

    assert qatfx.fake_quant_enabled(resumed[0])  # switched on at the same step
    assert torch.equal(torch.cat([before, after]), expected), (torch.cat([before, after]), expected)
    for (name, a), b in zip(uninterrupted[0].state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(a, b), name


def test_schedule_state_past_the_switch_enables_fake_quant():
    prepared, _, schedule = fresh_run(seed=0)
    schedule.load_state_dict({"n_steps": FAKE_QUANT_AFTER, "steps_done": FAKE_QUANT_AFTER + 5})
    assert qatfx.fake_quant_enabled(prepared)
    with pytest.raises(ValueError, match="switches after 7 steps"):
        schedule.load_state_dict({"n_steps": 7, "steps_done": 0})
