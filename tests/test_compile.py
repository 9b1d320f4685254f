"""QAT training through torch.compile (Inductor, CPU): matches eager, fuses fake-quant,
and handles variable batch and sequence length without per-shape recompiles."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

import qatfx
from qatfx.spec import int8_per_token_activation
from tests.models import TinyLM, tokens


def test_compiled_fake_quant_matches_eager_up_to_rounding_ties():
    # Inductor may evaluate x * (1 / s) with a fused multiply or in another order, so a value
    # within an ulp of a .5 tie can round the other way: the integer moves by exactly one.
    spec = int8_per_token_activation()
    fq = torch.compile(lambda t: qatfx.ops.fake_quantize(t, **spec.op_kwargs()))
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 4
    eager, compiled = qatfx.ops.fake_quantize(x, **spec.op_kwargs()), fq(x)
    scale, _ = qatfx.reference.choose_qparams(x, -128, 127, -1, False, spec.eps, torch.float32)
    steps = ((compiled - eager) / scale).round()
    assert steps.abs().max() <= 1
    assert (steps != 0).float().mean() < 1e-3, "more than 0.1% of values moved by one step"


def _one_layer_lm():
    torch.manual_seed(0)
    model = TinyLM(vocab=64, dim=64, layers=1).eval()
    return qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(32), (tokens(vocab=64),))


def test_compiled_training_step_matches_eager():
    eager = _one_layer_lm()
    compiled_module = _one_layer_lm()
    compiled = torch.compile(compiled_module)
    t = tokens(batch=2, seq=8, vocab=64, seed=1)
    loss_e = eager(t).float().logsumexp(-1).mean()
    loss_c = compiled(t).float().logsumexp(-1).mean()
    loss_e.backward()
    loss_c.backward()
    # Without code flips the difference is fp32 reordering (measured: loss 6e-8, gradients
    # 7e-7 relative). A rounding-tie flip moves one of the ~1024 int8 inputs of one token by
    # one step (~1/255 of its range): about 3e-5 of the loss and 1e-4 of a gradient norm.
    # The bounds allow a few flips; a wrong scale, mask or zero point is O(1).
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=0)
    grads_e = dict(eager.named_parameters())
    for name, p in compiled_module.named_parameters():
        ref = grads_e[name].grad
        rel = ((p.grad - ref).norm() / ref.norm()).item()
        assert rel < 1e-3, f"{name}: relative gradient difference {rel:.2e}"


def test_fake_quant_is_decomposed_and_fused_by_inductor():
    prepared = _one_layer_lm()
    compiled = torch.compile(prepared)
    _, (code, *_) = run_and_get_code(compiled, tokens(vocab=64))
    assert "qatfx" not in code, "fake_quantize should be decomposed into aten math, not called"
    # the per-token amax/round/clamp math lives in Inductor-generated kernels
    assert "round" in code.lower() or "nearbyint" in code.lower()


@pytest.mark.long  # four shapes through fresh compiles, ~1 min on 2 cores
def test_variable_batch_and_sequence_length_compile_at_most_twice():
    prepared = _one_layer_lm().train()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(prepared, backend=counter)
    opt = torch.optim.SGD(prepared.parameters(), lr=1e-3)
    for batch, seq in [(2, 8), (3, 11), (4, 5), (2, 17), (5, 9)]:
        loss = compiled(tokens(batch, seq, vocab=64)).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    # first call static, second marks batch/seq dynamic (automatic dynamic shapes), then none.
    # (Dynamo specializes size-1 dims, so a batch of 1 adds one compile by design.)
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for 5 shapes"


def _saved_for_backward(model, options):
    """The tensors the compiled forward keeps for the compiled backward: the backward graph's
    inputs other than the gradients flowing in (Inductor's real partition, captured at its
    inner compile)."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    saved = []

    def inner(gm, example_inputs, **kwargs):
        if kwargs.get("is_backward"):
            saved.extend(n for n in gm.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents"))
        return compile_fx_inner(gm, example_inputs, **kwargs)

    def backend(gm, example_inputs):
        with torch._inductor.config.patch(options):
            return compile_fx(gm, example_inputs, inner_compile=inner)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    # no cache: a cached compile would skip the partition and leave nothing to inspect
    with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
        compiled(tokens(vocab=64, seed=1)).float().logsumexp(-1).mean().backward()
    assert saved, "no compiled backward was captured"
    return saved


@pytest.mark.parametrize("options, weight_sized_saved", [({}, "some"), (qatfx.compile_options(), "none")], ids=["inductor default", "compile_options"])
def test_compiled_backward_recomputes_fake_quantized_weights(options, weight_sized_saved):
    # Left alone, the partitioner keeps fq(W)^T and the clamp's mask of every quantized
    # weight; with qatfx's joint-graph pass it keeps W (a graph input, `primals_*`) only.
    prepared = _one_layer_lm()
    weight_shapes = {tuple(p.shape) for p in prepared.parameters() if p.dim() == 2}
    weight_shapes |= {s[::-1] for s in weight_shapes}
    saved = _saved_for_backward(prepared, options)
    derived = [n.name for n in saved if not n.name.startswith("primals") and tuple(n.meta["val"].shape) in weight_shapes
               or (n.meta["val"].dim() == 3 and n.meta["val"].shape[-1] == 32)]  # (N, K/32, 32) weight blocks
    if weight_sized_saved == "none":
        assert derived == [], f"the compiled forward keeps tensors computed from weights: {derived}"
    else:
        assert derived, "the default partition no longer keeps fq(W): the pass may be unnecessary"
