"""Learnable scales (QuantSpec.learnable, `learnable_scales=True`): the trained qparams are
parameters of the prepared model, start where the dynamic rule is, train, and convert
stores them so that prepared == converted bit for bit; the gradient's formula is checked in
tests/test_reference.py (test_learned_*)."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import qatfx
from qatfx.graph.meta import LEARNED_SCALE_SUFFIX, LEARNED_ZERO_SUFFIX
from qatfx.recipes.model import CausalLM, LMConfig
from qatfx.spec import PerChannel, PerGroup, QuantSpec, int4_per_group_weight, int8_per_token_activation
from tests.models import TinyLM, tokens

VOCAB = 96


def _optimizer(prepared, lr: float = 1e-2, scale_lr: float = 1e-3) -> torch.optim.Optimizer:
    """Scales get their own, smaller learning rate: Adam moves a parameter by ~lr per step,
    and these scales are ~0.01 (weights of +-0.125 over 7.5 levels)."""
    scales = list(qatfx.learned_qparams(prepared).values())
    others = [p for p in prepared.parameters() if all(p is not s for s in scales)]
    return torch.optim.AdamW([{"params": others}, {"params": scales, "lr": scale_lr}], lr=lr)


def _train(prepared, steps: int = 3, vocab: int = VOCAB) -> None:
    opt = _optimizer(prepared)
    prepared.train()
    for step in range(steps):
        ids = tokens(4, 16, vocab, seed=50 + step)
        logits = prepared(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    prepared.eval()


def _asymmetric(bits: int, granularity) -> callable:
    def make(learnable: bool = True) -> qatfx.Quantizer:
        spec = QuantSpec(bits, granularity, symmetric=False)
        return qatfx.Quantizer(int8_per_token_activation(), spec, learnable_scales=learnable)

    return make


def _executorch_like(learnable: bool = True) -> qatfx.Quantizer:
    return qatfx.MixedQuantizer(
        [("lm_head", qatfx.Int8DynActInt8WeightQuantizer())],
        default=qatfx.Int8DynActInt4WeightQuantizer(32, scales_precision=torch.bfloat16),
        learnable_scales=learnable,
    )


def _llama_cpp(learnable: bool = True) -> qatfx.Quantizer:
    preset = qatfx.presets.llama_cpp_q4_0()
    return preset.with_learnable_scales() if learnable else preset


QUANTIZERS = {
    "8da4w": lambda learnable=True: qatfx.Int8DynActInt4WeightQuantizer(32, learnable_scales=learnable),
    "8da4w bf16 scales": lambda learnable=True: qatfx.Int8DynActInt4WeightQuantizer(
        32, scales_precision=torch.bfloat16, learnable_scales=learnable
    ),
    "asymmetric int4": _asymmetric(4, PerGroup(32)),  # int4_zp_packed format
    "asymmetric int3 per-channel": _asymmetric(3, PerChannel()),  # int_codes format
    "llama.cpp preset": _llama_cpp,  # Q4_0 body, Q8_0 (ggml rule) lm_head
    "executorch-like preset": _executorch_like,  # 8da4w bf16 scales, 8da8w lm_head
}


def _model(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return TinyLM(layers=1, tie=False).eval()


def test_the_flag_reaches_every_weight_spec_and_no_activation_spec():
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(32, learnable_scales=True, embedding_spec=int4_per_group_weight(32))
    assert quantizer.weight_spec.learnable and quantizer.embedding_spec.learnable and not quantizer.input_spec.learnable
    preset = qatfx.presets.executorch_llama().with_learnable_scales()
    assert all(r.quantizer.weight_spec.learnable and r.quantizer.embedding_spec.learnable for r in (*preset.rules, preset.default))
    assert not qatfx.presets.executorch_llama().default.quantizer.weight_spec.learnable  # a copy: the preset is unchanged
    assert "learned" in quantizer.weight_spec.describe()


def test_bad_uses_are_refused_naming_the_fix():
    learned_activation = QuantSpec(8, qatfx.PerToken(), symmetric=False, learnable=True)
    with pytest.raises(ValueError, match="cannot be learned"):
        qatfx.Quantizer(learned_activation, int4_per_group_weight(32))
    with pytest.raises(ValueError, match="merge_consistent"):
        qatfx.prepare_pt2e(_model(), QUANTIZERS["8da4w"](), (tokens(),), lora=qatfx.LoRA(4, 8, targets=("*q_proj",), mode="torchtune"))


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_training_starts_on_the_dynamic_grid_and_converts_to_the_trained_one(name):
    """At prepare, each trained qparam is the dynamic rule's value, so the model computes
    exactly what the dynamic spec does (float32 weights hold every scale dtype's value); the
    ggml rule's Q8_0 lm_head rounds codes with h / absmax, not 1 / s, so there the start
    differs at rounding ties only. After training the qparams have moved, and convert stores
    them: converted == prepared, bit for bit (the same reference ops on the same cast qparams)."""
    x = tokens(2, 16, VOCAB)
    learned = qatfx.prepare_pt2e(_model(), QUANTIZERS[name](), (x,))
    dynamic = qatfx.prepare_pt2e(_model(), QUANTIZERS[name](learnable=False), (x,))
    params = qatfx.learned_qparams(learned)
    assert params and not qatfx.learned_qparams(dynamic)
    quantized = [r for r in qatfx.summary(learned).layers if r.quantized]
    assert sum(n.endswith(LEARNED_SCALE_SUFFIX) for n in params) == len(quantized)
    asymmetric = not quantized[0].weight_spec.symmetric
    assert any(n.endswith(LEARNED_ZERO_SUFFIX) for n in params) == asymmetric
    if name == "llama.cpp preset":
        # a tie moves one int8 code of one token: at most one Q8_0 step of one weight, far
        # below the logits' spread (1% of their max here; measured: a few ulps)
        torch.testing.assert_close(learned(x), dynamic(x), rtol=0, atol=1e-2 * dynamic(x).abs().max().item())
    else:
        assert torch.equal(learned(x), dynamic(x))

    start = {n: p.detach().clone() for n, p in params.items()}
    _train(learned)
    moved = [n for n, p in params.items() if not torch.equal(p, start[n])]
    assert any(n.endswith(LEARNED_SCALE_SUFFIX) for n in moved), "no scale trained"
    if asymmetric:
        assert any(n.endswith(LEARNED_ZERO_SUFFIX) for n in moved), "no zero point trained"
    converted = qatfx.convert_pt2e(learned)
    assert not qatfx.learned_qparams(converted)  # stored as the format's parts instead
    assert torch.equal(converted(x), learned(x))


def test_convert_stores_the_trained_scales_rounded_to_the_scale_dtype():
    """The exported grid is the trained one: each stored scale is the trained parameter
    cast to the spec's scale dtype (bfloat16 here), as the forward used it."""
    prepared = qatfx.prepare_pt2e(_model(), QUANTIZERS["8da4w bf16 scales"](), (tokens(),))
    _train(prepared)
    trained = qatfx.learned_qparams(prepared)["blocks.0.q_proj.weight" + LEARNED_SCALE_SUFFIX].detach()
    converted = qatfx.convert_pt2e(prepared)
    stored = dict(converted.named_buffers())["blocks.0.q_proj.weight_scales"]
    assert stored.dtype == torch.bfloat16 and torch.equal(stored, trained.to(torch.bfloat16))


def test_region_capture_trains_one_grid_for_a_table_tied_across_regions():
    """A tied embedding and lm_head captured as two regions read one set of trained qparams."""
    config = LMConfig(vocab_size=VOCAB, dim=64, layers=1, heads=4, hidden=128, tie_embeddings=True)
    torch.manual_seed(0)
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(32, learnable_scales=True, embedding_spec=int4_per_group_weight(32))
    prepared = qatfx.prepare_pt2e(CausalLM(config).eval(), quantizer, (tokens(2, 16, VOCAB),), regions="auto")
    named = {n: p for n, p in prepared.named_parameters(remove_duplicate=False) if n.endswith(LEARNED_SCALE_SUFFIX)}
    table_scales = [p for n, p in named.items() if "embed" in n or "lm_head" in n]
    assert len(table_scales) == 2 and table_scales[0] is table_scales[1], list(named)
    _train(prepared)
    x = tokens(2, 16, VOCAB)
    assert torch.equal(qatfx.convert_pt2e(prepared)(x), prepared(x))


def test_lora_keeps_training_the_scales_of_its_frozen_base():
    """merge_consistent LoRA trains fq(W + sBA) with the learned scale: the base W stays
    frozen, adapters and scales train, and the merged, converted model is the trained one."""
    x = tokens(2, 16, VOCAB)
    prepared = qatfx.prepare_pt2e(_model(), QUANTIZERS["8da4w"](), (x,), lora=qatfx.LoRA(4, 8, targets=("*q_proj",)))
    scales = qatfx.learned_qparams(prepared)
    assert scales and all(p.requires_grad for p in scales.values())
    weight = dict(prepared.named_parameters())["blocks.0.q_proj.weight"]
    assert not weight.requires_grad
    start_w = weight.detach().clone()
    start_s = {n: p.detach().clone() for n, p in scales.items()}
    _train(prepared)
    assert torch.equal(weight, start_w)
    assert not all(torch.equal(p, start_s[n]) for n, p in scales.items())
    merged = qatfx.merge_lora(prepared)
    assert torch.equal(qatfx.convert_pt2e(merged)(x), prepared(x))


def test_a_compiled_step_trains_the_scales_as_eager_does():
    """torch.compile traces the reference math: the scales' gradients are eager's up to
    Inductor's reassociation of the float32 sums (measured: <= 1.2e-6 of the largest gradient
    on an AVX2 CPU). The bound is 1e-2 of the largest: another CPU's summation order can move
    an activation across an int8 rounding tie, which changes that token's term by one code
    step (1/255 of its range), not the gradient's sign or scale."""
    x = tokens(4, 16, VOCAB)
    grads = []
    for compiled in (False, True):
        prepared = qatfx.prepare_pt2e(_model(), QUANTIZERS["8da4w"](), (x,))  # eval: no dropout draws
        forward = torch.compile(prepared) if compiled else prepared
        F.cross_entropy(forward(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        grads.append({n: p.grad for n, p in qatfx.learned_qparams(prepared).items()})
    eager, compiled = grads
    for name, g in eager.items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(compiled[name], g, rtol=0, atol=1e-2 * g.abs().max().item())


def test_a_checkpoint_resumes_with_the_trained_scales():
    """The trained qparams are in the prepared model's state_dict: a fresh prepare + load
    continues from them (tests/test_resume.py checks whole runs), and save/load of the
    converted model keeps its trained grid."""
    x = tokens(2, 16, VOCAB)
    prepared = qatfx.prepare_pt2e(_model(), QUANTIZERS["asymmetric int4"](), (x,))
    _train(prepared)
    buffer = io.BytesIO()
    torch.save(prepared.state_dict(), buffer)
    fresh = qatfx.prepare_pt2e(_model(seed=1), QUANTIZERS["asymmetric int4"](), (x,))
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    fresh.eval()
    assert torch.equal(fresh(x), prepared(x))


def test_save_and_load_keep_the_trained_grid(tmp_path):
    x = tokens(2, 16, VOCAB)
    prepared = qatfx.prepare_pt2e(_model(), QUANTIZERS["8da4w"](), (x,))
    _train(prepared)
    converted = qatfx.convert_pt2e(prepared)
    qatfx.save(converted, tmp_path / "m")
    loaded = qatfx.load(tmp_path / "m")
    assert torch.equal(loaded(x), prepared(x))
    assert all(r.weight_spec.learnable for r in qatfx.summary(loaded).layers if r.quantized)


def test_disabled_fake_quant_ignores_the_scales():
    """With fake-quant off the model is the float model (the float control); the scales get
    no gradient."""
    x = tokens(2, 16, VOCAB)
    float_model = _model()
    prepared = qatfx.prepare_pt2e(copy.deepcopy(float_model), QUANTIZERS["8da4w"](), (x,))
    qatfx.disable_fake_quant(prepared)
    assert torch.equal(prepared(x), float_model(x))
    prepared(x).sum().backward()
    assert all(p.grad is None for p in qatfx.learned_qparams(prepared).values())
