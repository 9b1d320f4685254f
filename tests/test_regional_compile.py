"""qatfx.compile_regions: a region capture compiled region by region, each distinct region
graph compiled once however many layers run it; prepared (training) and converted
(backend="qatfx"); a pass on one region after compiling leaves the others' code alone."""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

import qatfx
from qatfx.graph.regions import graph_regions
from qatfx.passes.fake_quant_toggle import set_fake_quant_enabled
from qatfx.passes.infra import run_pass
from qatfx.recipes.model import CausalLM, LMConfig
from tests.model_zoo import _hf
from tests.models import tokens

Q = qatfx.Int8DynActInt4WeightQuantizer
GROUP = 32
VOCAB = 64


def toy(layers: int) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(LMConfig(vocab_size=VOCAB, dim=64, layers=layers, heads=4, hidden=128, max_seq=32))


def regional(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    return qatfx.prepare_pt2e(model, Q(GROUP), (example,), regions="auto")


def distinct_classes(model: torch.nn.Module) -> int:
    return len({type(gm) for _, gm in graph_regions(model)})


def test_identical_blocks_compile_once():
    x = tokens(2, 8, VOCAB, 0)
    prepared = regional(toy(layers=6), x)
    expected = prepared(x)
    counter = CompileCounter()  # runs Dynamo's graphs eagerly: the same ops, so the same numbers
    assert qatfx.compile_regions(prepared, backend=counter) is prepared
    out = prepared(x)
    # 6 blocks + lm_head: one compile for the block graph (reused by all six), one for lm_head
    assert counter.frame_count == 2 and distinct_classes(prepared) == 2
    assert torch.equal(out, expected)
    prepared(x)
    assert counter.frame_count == 2, "a second call recompiled"
    # convert works on the compiled model; its copy is not compiled and owns plain classes
    converted = qatfx.convert_pt2e(prepared)
    assert all(gm._compiled_call_impl is None for _, gm in graph_regions(converted))
    assert distinct_classes(converted) == len(graph_regions(converted))


def test_prepared_training_step_through_compiled_regions_matches_eager():
    x, target = tokens(2, 16, VOCAB, 1), tokens(2, 16, VOCAB, 2)
    eager = regional(toy(layers=3), x)
    compiled = regional(toy(layers=3), x)
    counters.clear()
    with fresh_cache():
        qatfx.compile_regions(compiled)  # Inductor
        losses = []
        for model in (eager, compiled):
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), target.flatten())
            loss.backward()
            losses.append(loss)
    assert counters["stats"]["unique_graphs"] == 2  # block (x3) + lm_head
    # Inductor reorders fp32 sums (RMSNorm's mean, the fake-quant min/max are exact): without
    # code flips that is ~1e-7 of the loss and ~1e-6 of a gradient (measured here: loss
    # equal, gradients <= 4e-7). A rounding-tie flip (Inductor evaluating x * (1 / s) in
    # another order) moves one int8 input of one token by one step, ~3e-5 of the loss and
    # ~1e-4 of a gradient norm (tests/test_compile.py); the bounds allow a few flips, while a
    # region computing the wrong thing (another layer's weights, fake-quant skipped) is O(1e-2).
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=0)
    reference = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        rel = ((p.grad - reference[name].grad).norm() / reference[name].grad.norm()).item()
        assert rel < 1e-3, f"{name}: relative gradient difference {rel:.2e}"
    # an optimizer step updates the shared parameters, and the next step reuses the compiled code
    before = compiled.blocks[1].q_proj.weight.detach().clone()
    torch.optim.SGD(compiled.parameters(), lr=0.1).step()
    assert not torch.equal(compiled.blocks[1].q_proj.weight, before)
    compiled(x).sum().backward()
    assert counters["stats"]["unique_graphs"] == 2


def test_converted_regions_with_the_qatfx_backend_match_eager():
    x = tokens(2, 8, VOCAB, 0)
    converted = qatfx.convert_pt2e(regional(toy(layers=3), x).eval())
    counters.clear()
    with torch.no_grad(), fresh_cache():  # a converted model is for inference (no dequantize gradient)
        expected = converted(x)
        qatfx.compile_regions(converted, backend="qatfx")
        out = converted(x)
    assert counters["stats"]["unique_graphs"] == 2
    # The lowering ran once on the block graph and once on lm_head: 7 + 1 fused linears, not 3 x 7 + 1.
    assert counters["qatfx"]["w4a8_linear"] == 8
    # As tests/lowering/test_graph_pass.py:assert_matches_eager: the CPU w4a8_linear is the
    # eager formula, so only Inductor's activation-quantization code differs: a rounding tie
    # resolved the other way moves one int8 code by one step, ~1/K of that token's outputs'
    # RMS (K = 64 or 128). 1e-3 relative RMS allows a few flips; a wrong scale or a region
    # run with another layer's weights is > 1e-1.
    rel = ((out - expected).norm() / expected.norm()).item()
    assert rel < 1e-3, f"compiled output differs from eager by {rel:.2e} relative RMS"


def test_a_pass_on_one_region_after_compiling_leaves_the_others_alone():
    x = tokens(2, 8, VOCAB, 0)
    model = toy(layers=4)
    prepared, reference = regional(model, x), regional(copy.deepcopy(model), x)
    counter = CompileCounter()
    qatfx.compile_regions(prepared, backend=counter)
    prepared(x)
    # switch fake-quant off in block 1 only: it leaves the shared class, the other blocks keep it
    for m in (prepared, reference):
        run_pass(m.blocks[1], "disable_fake_quant", set_fake_quant_enabled(False))
    assert torch.equal(prepared(x), reference(x))
    assert counter.frame_count == 3  # block 1's new graph, once
    blocks = [type(b) for b in prepared.blocks]
    assert blocks[1] not in (blocks[0], blocks[2]) and blocks[0] is blocks[2] is blocks[3]
    # the whole model switched: every block runs the same code again, one class, compiled once more at most
    for m in (prepared, reference):
        qatfx.disable_fake_quant(m)
    assert len({type(b) for b in prepared.blocks}) == 1
    assert torch.equal(prepared(x), reference(x))
    assert counter.frame_count <= 5


def test_split_hf_llama_regions_compile_once_per_distinct_graph():
    model, vocab = _hf("LlamaConfig", "LlamaForCausalLM", use_cache=True)()
    x = tokens(2, 8, vocab, 0)
    prepared = regional(model, x)
    expected = prepared(x).logits
    counter = CompileCounter()
    qatfx.compile_regions(prepared, backend=counter)
    assert torch.equal(prepared(x).logits, expected)
    # 2 layers x (q, k, v, o, mlp) + lm_head = 11 regions, 4 distinct: q and o (64 x 64), k and
    # v (32 x 64 with 2 kv heads: same code, other shapes), the MLP, lm_head
    assert len(graph_regions(prepared)) == 11 and counter.frame_count == 4
    assert prepared.generate(x, max_new_tokens=2, do_sample=False).shape == (2, 10)


def test_refuses_what_it_cannot_compile_by_region():
    x = tokens(2, 8, VOCAB, 0)
    whole = qatfx.prepare_pt2e(toy(layers=2), Q(GROUP), (x,))
    with pytest.raises(ValueError, match=r"whole-model QATGraphModule.*torch\.compile\(model\)"):
        qatfx.compile_regions(whole)
    with pytest.raises(ValueError, match=r"holds no qatfx regions.*regions='auto'"):
        qatfx.compile_regions(toy(layers=2))
    with pytest.raises(TypeError, match="already wrapped by torch.compile"):
        qatfx.compile_regions(torch.compile(regional(toy(layers=2), x)))
