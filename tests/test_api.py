"""prepare_pt2e / convert_pt2e behaviour: modules, modes, copies, control, bad inputs."""

import copy

import pytest
import torch
import torch.nn as nn

import qatfx
from tests.model_zoo import ModelSnapshot
from tests.models import Block, TinyLM, tokens

Q = qatfx.Int8DynActInt4WeightQuantizer


def prepared_lm(**kw):
    return qatfx.prepare_pt2e(TinyLM(**kw), Q(32), (tokens(),))


def test_dynamic_batch_and_sequence_length():
    prepared = prepared_lm()
    converted = qatfx.convert_pt2e(prepared.eval())
    for batch, seq in [(1, 1), (3, 17), (5, 2), (2, 64)]:
        t = tokens(batch, seq, seed=batch * seq)
        out = prepared(t)
        assert out.shape == (batch, seq, 96)
        assert torch.equal(out, converted(t))


def test_original_model_is_not_modified():
    """Values, Parameter objects, requires_grad, train flags and modules of the model stay
    as they were; convert_pt2e leaves the prepared module as it was too. (Every real model
    family gets the same check in tests/test_model_families.py.)"""
    model = TinyLM().train()
    model.embed.weight.requires_grad_(False)  # a frozen parameter stays frozen
    model.blocks[1].eval()  # a mixed-mode model keeps its per-module flags
    before = ModelSnapshot.of(model)
    prepared = qatfx.prepare_pt2e(model, Q(32), (tokens(),))
    before.assert_unchanged(model)
    assert prepared.embed.weight is model.embed.weight  # shared, as documented

    prepared_before = ModelSnapshot.of(prepared.eval())
    graph_before = str(prepared.graph)
    qatfx.convert_pt2e(prepared)
    prepared_before.assert_unchanged(prepared)
    assert str(prepared.graph) == graph_before


def test_state_dict_keeps_original_names_and_round_trips():
    model = TinyLM()
    prepared = qatfx.prepare_pt2e(model, Q(32), (tokens(),))
    assert prepared.state_dict().keys() == model.state_dict().keys()
    other = qatfx.prepare_pt2e(TinyLM(), Q(32), (tokens(),))
    other.load_state_dict(prepared.state_dict())
    t = tokens(seed=3)
    assert torch.equal(other.eval()(t), prepared.eval()(t))


def test_tied_weights_stay_tied_and_lm_head_is_quantized():
    prepared = prepared_lm()
    assert prepared.lm_head.weight is prepared.embed.weight
    assert "lm_head" in [r.layer for r in qatfx.summary(prepared).quantized]
    converted = qatfx.convert_pt2e(prepared)
    # the embedding still reads the float weight; lm_head reads packed int4
    assert hasattr(converted.embed, "weight") and hasattr(converted.lm_head, "weight_packed")


def test_deepcopy_prepared_and_converted():
    prepared = prepared_lm().eval()
    clone = copy.deepcopy(prepared)
    assert isinstance(clone, qatfx.QATGraphModule) and clone.qatfx_stage == "prepared"
    t = tokens(seed=4)
    assert torch.equal(clone(t), prepared(t))
    with torch.no_grad():
        clone.get_submodule("blocks.0").q_proj.weight.add_(1.0)  # the copy owns its parameters
    assert not torch.equal(clone.get_submodule("blocks.0").q_proj.weight, prepared.get_submodule("blocks.0").q_proj.weight)
    converted = qatfx.convert_pt2e(prepared)
    assert torch.equal(copy.deepcopy(converted)(t), converted(t))


def test_train_eval_keeps_dropout_p():
    prepared = qatfx.prepare_pt2e(Block(dropout=0.25), Q(32), (torch.randn(2, 8, 64),))
    assert prepared.training

    def dropouts():
        return [n.args[1:] for n in prepared.graph.nodes if n.target is torch.ops.aten.dropout.default]

    assert dropouts() == [(0.25, True)] * 2
    prepared.eval()
    assert dropouts() == [(0.25, False)] * 2
    x = torch.randn(2, 8, 64)
    assert torch.equal(prepared(x), prepared(x))  # deterministic in eval
    prepared.train()
    assert dropouts() == [(0.25, True)] * 2
    assert not torch.equal(prepared(x), prepared(x))


def test_eval_model_is_prepared_in_eval():
    prepared = qatfx.prepare_pt2e(Block().eval(), Q(32), (torch.randn(2, 8, 64),))
    assert not prepared.training


def test_disabled_fake_quant_equals_float_model_forward_and_after_step():
    model = TinyLM().eval()
    reference = copy.deepcopy(model)
    prepared = qatfx.prepare_pt2e(copy.deepcopy(model), Q(32), (tokens(),)).eval()
    qatfx.disable_fake_quant(prepared)
    assert not qatfx.fake_quant_enabled(prepared)
    t = tokens(seed=1)
    assert torch.equal(prepared(t), reference(t))
    for module in (prepared, reference):
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        module(t).square().mean().backward()
        opt.step()
    assert torch.equal(prepared(t), reference(t))
    qatfx.enable_fake_quant(prepared)
    assert not torch.equal(prepared(t), reference(t))


def test_fake_quant_after_n_steps():
    prepared = prepared_lm()
    schedule = qatfx.FakeQuantAfterNSteps(prepared, n_steps=2)
    assert not qatfx.fake_quant_enabled(prepared)
    schedule.step()
    assert not qatfx.fake_quant_enabled(prepared)
    schedule.step()
    assert qatfx.fake_quant_enabled(prepared)


def test_accepts_exported_program_and_its_module():
    model = TinyLM()
    ep = torch.export.export(model, (tokens(),))
    t = tokens()
    a = qatfx.prepare_pt2e(ep, Q(32)).eval()
    gm = ep.module()
    b = qatfx.prepare_pt2e(gm, Q(32)).eval()
    assert torch.equal(a(t), b(t))
    assert not any(n.target is qatfx.ops.fake_quantize for n in gm.graph.nodes)  # input untouched


def test_summary_counts_and_bytes():
    s = qatfx.summary(prepared_lm())
    assert len(s.quantized) == 15 and not s.skipped  # 2 blocks x 7 + lm_head
    # per 32 weights: 16 bytes of int4, a 4-byte fp32 scale and a 2-byte int16 group sum,
    # 0.5 + 4/32 + 2/32 = 0.6875 bytes per weight vs 4 in fp32 (integers: exact)
    assert s.quantized_bytes * 4 == s.float_bytes * 0.6875
    assert "15 quantized, 0 skipped" in str(s)


def test_bf16_scales_on_request():
    prepared = qatfx.prepare_pt2e(TinyLM().eval(), Q(32, scales_precision=torch.bfloat16), (tokens(),))
    converted = qatfx.convert_pt2e(prepared)
    assert converted.lm_head.weight_scales.dtype == torch.bfloat16
    t = tokens(seed=2)
    assert torch.equal(prepared(t), converted(t))


def test_skip_by_name_and_type_is_reported():
    prepared = qatfx.prepare_pt2e(TinyLM(), Q(32, skip=["lm_head", "*.down_proj"]), (tokens(),))
    skipped = {r.layer: r.skip_reason for r in qatfx.summary(prepared).skipped}
    assert set(skipped) == {"lm_head", "blocks.0.down_proj", "blocks.1.down_proj"}
    assert "skip pattern 'lm_head'" in skipped["lm_head"]


# ---- bad inputs ---------------------------------------------------------------------------


def test_k_not_divisible_by_group_size_is_skipped_with_reason(caplog):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 48)
            self.b = nn.Linear(48, 16)

        def forward(self, x):
            return self.b(self.a(x))

    with caplog.at_level("WARNING", logger="qatfx"):
        prepared = qatfx.prepare_pt2e(Odd(), Q(32), (torch.randn(2, 64),))
    (skipped,) = qatfx.summary(prepared).skipped
    assert skipped.layer == "b" and "48 is not divisible by group size 32" in skipped.skip_reason
    assert "b left in float" in caplog.text
    x = torch.randn(3, 64)
    assert torch.equal(qatfx.convert_pt2e(prepared)(x), prepared(x))


def test_model_without_linear_raises():
    with pytest.raises(ValueError, match="no linear layers"):
        qatfx.prepare_pt2e(nn.Sequential(nn.ReLU()), Q(32), (torch.randn(2, 8),))


def test_unsupported_dtype_raises_with_reason():
    with pytest.raises(ValueError, match=r"float64 is not supported.*model.to\(torch.float32\)"):
        qatfx.prepare_pt2e(nn.Linear(64, 8).double(), Q(32), (torch.randn(2, 64, dtype=torch.float64),))


def test_convert_before_prepare_raises():
    gm = torch.export.export(nn.Linear(64, 8), (torch.randn(2, 64),)).module()
    with pytest.raises(ValueError, match="call qatfx.prepare_pt2e"):
        qatfx.convert_pt2e(gm)


def test_convert_twice_raises():
    converted = qatfx.convert_pt2e(prepared_lm())
    with pytest.raises(ValueError, match="already converted"):
        qatfx.convert_pt2e(converted)


def test_prepare_twice_raises():
    prepared = prepared_lm()
    with pytest.raises(ValueError, match="already prepared"):
        qatfx.prepare_pt2e(prepared, Q(32))


def test_symbolic_trace_graph_is_rejected():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(64, 8)))
    with pytest.raises(ValueError, match="does not come from torch.export"):
        qatfx.prepare_pt2e(gm, Q(32))


def test_missing_example_inputs_and_export_failure():
    with pytest.raises(ValueError, match="example_inputs"):
        qatfx.prepare_pt2e(TinyLM(), Q(32))
    with pytest.raises(qatfx.CaptureError, match="(?s)torch.export could not capture CausalLM.*Hints"):
        qatfx.prepare_pt2e(TinyLM(), Q(32), (torch.randn(2, 3, 4),))


def test_static_activation_spec_is_refused():
    spec = qatfx.QuantSpec(8, qatfx.PerToken(), symmetric=False, dynamic=False)
    with pytest.raises(ValueError, match="dynamic=False"):
        qatfx.Quantizer(spec, qatfx.QuantSpec(4, qatfx.PerGroup(32), symmetric=True))


@pytest.mark.parametrize(
    "quantizer, buffer, dtype",
    [
        (qatfx.Int8WeightOnlyQuantizer(), "weight_packed", torch.int8),
        (qatfx.Int4WeightOnlyQuantizer(32), "weight_packed", torch.uint8),
    ],
)
def test_weight_only_schemes(quantizer, buffer, dtype):
    model = TinyLM()
    prepared = qatfx.prepare_pt2e(model, quantizer, (tokens(),))
    converted = qatfx.convert_pt2e(prepared)
    assert getattr(converted.get_submodule("blocks.0").q_proj, buffer).dtype == dtype
    assert not any(n.target is qatfx.ops.quantize_dynamic for n in converted.graph.nodes)
    t = tokens(seed=6)
    assert torch.equal(prepared.eval()(t), converted.eval()(t))


def test_skip_types_by_class():
    class LoRALikeLinear(nn.Linear):
        pass

    model = nn.Sequential(LoRALikeLinear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    prepared = qatfx.prepare_pt2e(model, Q(32, skip_types=[LoRALikeLinear]), (torch.randn(2, 64),))
    (skipped,) = qatfx.summary(prepared).skipped
    assert skipped.layer == "0" and "skip_types" in skipped.skip_reason


def test_linear_with_computed_weight_is_skipped_with_reason():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 64))
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            return torch.nn.functional.linear(self.fc(x), self.w * 2.0)

    prepared = qatfx.prepare_pt2e(Scaled(), Q(32), (torch.randn(2, 64),))
    (skipped,) = qatfx.summary(prepared).skipped
    assert skipped.shape == (16, 64) and "computed in the graph" in skipped.skip_reason


class _CastingBlock(torch.nn.Module):
    """`x.to(dtype)` in forward: torch.export records an `_assert_tensor_metadata` with the
    capture device."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(32, 32)

    def forward(self, x):
        return self.proj(x.to(torch.float32)).to(torch.float32)


@pytest.mark.parametrize("regions", [None, "auto"])
def test_prepared_on_one_device_runs_on_another(regions):
    """Prepared on the meta device (as a model too large for one device is built), then
    materialized on CPU: the graph keeps no assert of the capture device (the same holds for
    a model prepared on CPU and moved to a GPU)."""
    torch.manual_seed(0)
    real = torch.nn.Sequential(_CastingBlock(), _CastingBlock())
    with torch.device("meta"):
        model = torch.nn.Sequential(_CastingBlock(), _CastingBlock())
    prepared = qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(32), (torch.randn(2, 4, 32, device="meta"),), regions=regions)
    prepared.to_empty(device="cpu")
    prepared.load_state_dict(real.state_dict())
    x = torch.randn(3, 5, 32)
    reference = qatfx.prepare_pt2e(real, qatfx.Int8DynActInt4WeightQuantizer(32), (torch.randn(2, 4, 32),), regions=regions)
    assert torch.equal(prepared(x), reference(x))
