"""LlamaCppQuantizer: Q4_0 weights x Q8_0 activations (scale_rule="ggml") through prepare,
compiled training, convert, summary and save/load; prepared == converted bit for bit."""

import json

import pytest
import torch
import torch.nn as nn

import qatfx
from qatfx import ops, reference
from qatfx.quantizer import LlamaCppQuantizer, Quantizer
from qatfx.serialization import MANIFEST_FILE, spec_from_json
from qatfx.spec import PerGroup, QuantSpec, int4_per_group_weight, q4_0_weight, q8_0_activation
from tests.models import TinyLM, tokens

SHAPES = [(2, 8), (3, 17), (1, 1)]


def prepared_lm(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return qatfx.prepare_pt2e(TinyLM().to(dtype), LlamaCppQuantizer(), (tokens(),))


def assert_prepared_equals_converted(prepared, dtype=torch.float32):
    prepared.eval()
    converted = qatfx.convert_pt2e(prepared)
    with torch.no_grad():
        for batch, seq in SHAPES:
            t = tokens(batch, seq, seed=batch * seq)
            expected = prepared(t)
            assert expected.dtype == dtype
            torch.testing.assert_close(converted(t), expected, atol=0, rtol=0)
    return converted


def test_specs_and_summary():
    quantizer = LlamaCppQuantizer()
    assert quantizer.input_spec == q8_0_activation() and quantizer.weight_spec == q4_0_weight()
    assert "int8/group32/sym/narrow/ggml" in repr(quantizer)
    report = qatfx.summary(prepared_lm())
    assert len(report.quantized) == 15 and not report.skipped
    assert all(r.input_spec == q8_0_activation() for r in report.quantized)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_equals_converted(dtype):
    assert_prepared_equals_converted(prepared_lm(dtype), dtype)


# cold compiles (~17-30 s each on 2 cores): the long run; eager prepared == converted is above
@pytest.mark.long
@pytest.mark.parametrize("backend", ["inductor", "qatfx"])
def test_prepared_equals_converted_after_compiled_training(backend):
    prepared = prepared_lm(seed=1).train()
    compiled = torch.compile(prepared, backend=backend)
    opt = torch.optim.SGD(prepared.parameters(), lr=1e-2)
    for step in range(3):
        loss = compiled(tokens(2, 8, seed=step)).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    assert_prepared_equals_converted(prepared)


def test_converted_storage_and_graph():
    converted = assert_prepared_equals_converted(prepared_lm())
    buffers = dict(converted.named_buffers())
    scales = buffers["blocks.0.q_proj.weight_scales"]
    assert scales.dtype == torch.float16 and scales.shape == (64, 2)
    codes = reference.unpack_int4(buffers["blocks.0.q_proj.weight_packed"], 32)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    quantize = [n for n in converted.graph.nodes if n.target is ops.quantize_dynamic]
    dequantize = [n for n in converted.graph.nodes if n.target is ops.dequantize]
    assert quantize and dequantize
    for node in quantize:
        assert node.args[1:] == (-127, 127, 32, True, 2.0**-25, torch.float16)
        assert node.kwargs == {"scale_rule": "ggml"}
    assert all(node.args[3] == 32 for node in dequantize)  # (q, scale, zero, group_size, dtype)


def test_compiled_fake_quant_is_exact_with_the_qatfx_backend():
    # Inductor elides a float32 -> fp16 -> float32 round trip inside one kernel by default,
    # so plain torch.compile dequantizes with the unrounded scale d (same codes). The qatfx
    # backend turns on emulate_precision_casts: forward and gradient are then eager's.
    spec = q8_0_activation()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 512, generator=g) * torch.rand(64, 1, generator=g).mul(10)).requires_grad_(True)
    grad = torch.randn(x.shape, generator=g)

    def fq(t):
        return ops.fake_quantize(t, **spec.op_kwargs())

    eager = fq(x)
    exact = torch.compile(fq, backend="qatfx")(x)
    torch.testing.assert_close(exact, eager, atol=0, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(exact, x, grad)[0], torch.autograd.grad(eager, x, grad)[0], atol=0, rtol=0)

    default = torch.compile(fq)(x).detach().view(64, -1, 32)
    q, _, _ = ops.quantize_dynamic(x.detach(), **spec.op_kwargs())
    d = x.detach().view(64, -1, 32).abs().amax(-1, keepdim=True) / 127
    # the same codes, each times d or fp16(d) (which one is Inductor's choice)
    assert torch.equal(torch.round(default / d), q.view(64, -1, 32).float())


def test_k_not_divisible_by_32_is_skipped_with_the_reason():
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    prepared = qatfx.prepare_pt2e(model.eval(), LlamaCppQuantizer(), (torch.randn(3, 64),))
    report = qatfx.summary(prepared)
    assert [r.layer for r in report.quantized] == ["0"]
    (skipped,) = report.skipped
    assert skipped.layer == "2" and "in_features 48 is not divisible by activation group size 32" in skipped.skip_reason


def test_activation_groups_must_divide_k_too():
    # weight groups of 32 divide K = 96; activation groups of 64 do not: skipped, and said so
    act = QuantSpec(8, PerGroup(64), symmetric=True, narrow=True, scale_rule="ggml", scale_dtype=torch.float16)
    model = nn.Sequential(nn.Linear(128, 96), nn.Linear(96, 16))
    prepared = qatfx.prepare_pt2e(model.eval(), Quantizer(act, int4_per_group_weight(32)), (torch.randn(2, 128),))
    (skipped,) = qatfx.summary(prepared).skipped
    assert skipped.layer == "1" and "in_features 96 is not divisible by activation group size 64" in skipped.skip_reason


def test_skip_and_embedding_spec_are_accepted():
    quantizer = LlamaCppQuantizer(skip=["lm_head"], embedding_spec=q4_0_weight())
    torch.manual_seed(0)
    prepared = qatfx.prepare_pt2e(TinyLM(), quantizer, (tokens(),))
    report = qatfx.summary(prepared)
    assert [r.layer for r in report.skipped] == ["lm_head"]
    assert any(r.op == "embedding" for r in report.quantized)
    assert_prepared_equals_converted(prepared)


def test_save_load_round_trip_is_exact(tmp_path):
    converted = assert_prepared_equals_converted(prepared_lm())
    directory = qatfx.save(converted, tmp_path / "lm")
    loaded = qatfx.load(directory, scheme=LlamaCppQuantizer())
    with torch.no_grad():
        for batch, seq in SHAPES:
            t = tokens(batch, seq, seed=7 + batch)
            assert torch.equal(loaded(t), converted(t)), (batch, seq)
    data = json.loads((directory / MANIFEST_FILE).read_text())
    assert data["activation"]["narrow"] and data["activation"]["scale_rule"] == "ggml"
    assert spec_from_json(data["activation"]) == q8_0_activation()
    assert spec_from_json(data["weight"]) == q4_0_weight()
    assert "scale_rule" not in data["weight"] and "narrow" not in data["weight"]  # defaults are not written
    with pytest.raises(qatfx.SerializationError, match="not the expected"):
        qatfx.load(directory, scheme=qatfx.Int8DynActInt4WeightQuantizer(32))


def test_manifest_specs_without_the_new_fields_load_as_the_defaults():
    old = {"bits": 8, "granularity": "PerToken", "group_size": None, "symmetric": False, "signed": True,
           "dynamic": True, "eps": 1.1920928955078125e-07, "scale_dtype": "float32"}
    spec = spec_from_json(old)
    assert not spec.narrow and spec.scale_rule == "torchao"
