"""Whole-model parity with torchao 0.18: qatfx prepared == torchao QAT, qatfx converted ==
torchao PTQ on the same weights, and prepared == converted over many seeds."""

import copy

import pytest
import torch

import qatfx
from tests import torchao_ref
from tests.models import TinyLM, tokens

GROUP = 32


def float_model(dtype, seed):
    torch.manual_seed(seed)
    return TinyLM(tie=False).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_matches_torchao_qat(dtype):
    model = float_model(dtype, 0)
    reference = torchao_ref.TorchaoQAT(groupsize=GROUP, precision=dtype).prepare(copy.deepcopy(model))
    prepared = qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(GROUP), (tokens(),))
    for seed in range(3):
        t = tokens(batch=3, seq=5 + seed, seed=seed)
        torch.testing.assert_close(prepared(t), reference(t), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_converted_matches_torchao_ptq(dtype):
    model = float_model(dtype, 1)
    reference = torchao_ref.TorchaoPTQ(groupsize=GROUP, precision=dtype).quantize(copy.deepcopy(model))
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(GROUP), (tokens(),)))
    t = tokens(batch=2, seq=9, seed=5)
    torch.testing.assert_close(converted(t), reference(t), atol=0, rtol=0)


def test_gradients_match_torchao_qat():
    model = float_model(torch.float32, 2).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # random masks would differ between the two models
    reference = torchao_ref.TorchaoQAT(groupsize=GROUP).prepare(copy.deepcopy(model))
    prepared = qatfx.prepare_pt2e(copy.deepcopy(model), qatfx.Int8DynActInt4WeightQuantizer(GROUP), (tokens(),))
    t = tokens(seed=3)
    prepared(t).square().mean().backward()
    reference(t).square().mean().backward()
    ours = dict(prepared.named_parameters())
    for name, param in reference.named_parameters():
        if name in ("lm_head.weight", "blocks.1.down_proj.weight", "blocks.1.gate_proj.weight", "blocks.1.up_proj.weight"):
            # Downstream of any shared fake-quant in the backward: bit-identical.
            torch.testing.assert_close(ours[name].grad, param.grad, atol=0, rtol=0, msg=name)
        else:
            # qatfx fake-quantizes x once for q/k/v (torchao three times), so the three
            # gradient contributions are summed before the STE chain instead of after:
            # an fp32 reassociation of a few ulp that the backward carries upstream.
            # A wrong clamp mask or scale would differ by O(1).
            err = ((ours[name].grad - param.grad).abs().max() / param.grad.abs().max()).item()
            assert err < 1e-5, f"{name}: max relative gradient difference {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8da8w_matches_torchao_qat_and_ptq(dtype):
    """torchao's 8da8w computes weight scales and activation qparams in the model's dtype:
    scales_precision=dtype and legacy_eps=False (the default) are its numerics."""
    model = float_model(dtype, 4)
    qat = torchao_ref.prepare_8da8w_qat(copy.deepcopy(model))
    ptq = torchao_ref.quantize_8da8w_ptq(copy.deepcopy(model))
    prepared = qatfx.prepare_pt2e(model, qatfx.Int8DynActInt8WeightQuantizer(scales_precision=dtype), (tokens(),))
    converted = qatfx.convert_pt2e(prepared)
    for seed in range(3):
        t = tokens(batch=3, seq=5 + seed, seed=seed)
        torch.testing.assert_close(prepared(t), qat(t), atol=0, rtol=0)
        torch.testing.assert_close(converted(t), ptq(t), atol=0, rtol=0)


def test_8da8w_gradients_match_torchao_qat():
    model = float_model(torch.float32, 5).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    reference = torchao_ref.prepare_8da8w_qat(copy.deepcopy(model))
    prepared = qatfx.prepare_pt2e(copy.deepcopy(model), qatfx.Int8DynActInt8WeightQuantizer(), (tokens(),))
    t = tokens(seed=3)
    prepared(t).square().mean().backward()
    reference(t).square().mean().backward()
    ours = dict(prepared.named_parameters())
    for name, param in reference.named_parameters():
        # as for 8da4w: q/k/v share one activation fake-quant in qatfx, so upstream gradients
        # differ by an fp32 reassociation of a few ulp; a wrong mask or scale would be O(1)
        err = ((ours[name].grad - param.grad).abs().max() / param.grad.abs().max()).item()
        assert err < 1e-5, f"{name}: max relative gradient difference {err:.2e}"


def _mismatching_seeds(n_seeds, dtype, quantizer=None):
    """Seeds whose converted output differs from the prepared output at all. One export
    serves every seed: each seed's weights are loaded into the same prepared graph."""
    torch.manual_seed(0)
    template = TinyLM(vocab=64, dim=64, layers=1).to(dtype).eval()
    quantizer = quantizer or qatfx.Int8DynActInt4WeightQuantizer(GROUP)
    prepared = qatfx.prepare_pt2e(template, quantizer, (tokens(vocab=64),))
    mismatches = []
    for seed in range(n_seeds):
        torch.manual_seed(seed)
        prepared.load_state_dict(TinyLM(vocab=64, dim=64, layers=1).to(dtype).state_dict())
        converted = qatfx.convert_pt2e(prepared)
        t = torch.randint(0, 64, (2, 3 + seed % 9), generator=torch.Generator().manual_seed(seed))
        if not torch.equal(prepared(t), converted(t)):
            mismatches.append(seed)
    return mismatches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_equals_converted_200_seeds(dtype):
    mismatches = _mismatching_seeds(200, dtype)
    assert not mismatches, f"{len(mismatches)}/200 seeds did not match exactly: {mismatches[:10]}"


@pytest.mark.parametrize("name", ["8da8w", "executorch_llama", "llama_cpp_q4_0"])
def test_other_schemes_prepared_equals_converted_100_seeds(name):
    """8da8w and the mixed presets (int8 per-channel / Q8_0 heads, int8 / Q8_0 tied tables)."""
    quantizer = qatfx.Int8DynActInt8WeightQuantizer() if name == "8da8w" else qatfx.presets.preset(name)
    mismatches = _mismatching_seeds(100, torch.float32, quantizer)
    assert not mismatches, f"{len(mismatches)}/100 seeds did not match exactly: {mismatches[:10]}"


@pytest.mark.long
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_equals_converted_1000_seeds(dtype):
    mismatches = _mismatching_seeds(1000, dtype)
    assert not mismatches, f"{len(mismatches)}/1000 seeds did not match exactly: {mismatches[:10]}"
