"""qatfx.export.verify_pte and the verify step of qatfx.export.executorch: a good export
passes, a .pte that is not the converted model fails with its numbers, bad input is refused.
Lowering is slow (~10-20 s on 2 cores), so each .pte is exported once per module."""

import math
import sys

import pytest
import torch
from torch.utils import _pytree as pytree

import qatfx
from qatfx.export import ExportError, VerificationError, executorch, held_out_inputs, verify_pte
from qatfx.export.verify import HELD_OUT_BATCHES, load_method
from tests.models import TinyLM, tokens

VOCAB = 96  # TinyLM's


def _convert(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    # bf16 scales: the weight grid XNNPACK stores, so the runtime's weights equal convert's
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(32, scales_precision=torch.bfloat16)
    return qatfx.convert_pt2e(qatfx.prepare_pt2e(model.eval(), quantizer, (example,)))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """TinyLM (tied head) 8da4w g32, exported with the default verify step."""
    torch.manual_seed(0)
    converted = _convert(TinyLM(tie=True), tokens())
    return converted, executorch(converted, tmp_path_factory.mktemp("pte") / "tiny.pte")


@pytest.fixture(scope="module")
def other():
    """Another TinyLM, converted the same way: same inputs and logit shape, other weights."""
    torch.manual_seed(1)
    return _convert(TinyLM(tie=True), tokens())


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """A float-input model (two linears), exported with the default verify step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    converted = _convert(model, torch.randn(4, 64))
    return converted, executorch(converted, tmp_path_factory.mktemp("pte") / "mlp.pte")


def test_export_verifies_by_default_on_held_out_tokens(good):
    converted, export = good
    report = export.verification
    assert export.delegated == export.quantized_layers == 15
    assert report.passed and report.batches == HELD_OUT_BATCHES and report.positions == HELD_OUT_BATCHES * 2 * 8
    # Same weight grid (bf16 scales) and same int8 per-token scheme: only float accumulation
    # order and XNNPACK's own activation rounding differ. Accumulation order alone is ~1e-6
    # relative; one activation code flipped in one row is ~1/255 of that row's range, and the
    # 4-layer charlm-size model (many more rounding chances) measured 2.4e-3 on CPU here.
    # 1e-3 on this 2-layer model: no systematic error (wrong scale, layout, ...) hides in it.
    assert report.relative_error < 1e-3
    assert report.next_token_agreement == 1.0  # no argmax is near-tied at 1e-3 relative error
    # the report is the one verify_pte gives on held_out_inputs (fixed seed): same numbers, exactly
    again = verify_pte(export.path, converted, held_out_inputs(converted))
    assert (again.relative_error, again.max_abs_error, again.next_token_agreement) == (
        report.relative_error, report.max_abs_error, report.next_token_agreement)
    text = str(export)
    assert "next-token agreement" in text and "relative logit error" in text and "FAILED" not in text


def test_report_numbers_follow_their_definitions(good):
    converted, export = good
    inputs = [(tokens(seed=s),) for s in range(10, 13)]
    report = verify_pte(export.path, converted, inputs)
    method = load_method(export.path)
    runtime = [method.execute([x])[0].double() for (x,) in inputs]
    reference = [converted(x).detach().double() for (x,) in inputs]
    squared_diff = sum(((a - b) ** 2).sum() for a, b in zip(runtime, reference))
    squared_ref = sum((b ** 2).sum() for b in reference)
    # float64 sums of ~2,300 terms in another order: relative rounding ~ n * 2^-53 < 1e-12
    assert report.relative_error == pytest.approx(math.sqrt(squared_diff / squared_ref), rel=1e-12)
    # a float32 difference is exact in float64 and max does not depend on order: exact
    assert report.max_abs_error == max((a - b).abs().max().item() for a, b in zip(runtime, reference))
    agree = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(runtime, reference))
    assert report.positions == 3 * 2 * 8 and report.next_token_agreement == agree / report.positions


def test_hf_style_and_tuple_outputs_compare_their_logits(good):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    converted, export = good

    class HFStyle(torch.nn.Module):
        def forward(self, input_ids):
            return CausalLMOutputWithPast(logits=converted(input_ids))

    class Tuple(torch.nn.Module):
        def forward(self, input_ids):
            return (converted(input_ids),)

    inputs = held_out_inputs(converted)
    plain = verify_pte(export.path, converted, inputs)
    for wrapped in (HFStyle(), Tuple()):
        report = verify_pte(export.path, wrapped, inputs)
        # the same logits tensors, compared by the same code: identical numbers
        assert (report.relative_error, report.max_abs_error, report.next_token_agreement) == (
            plain.relative_error, plain.max_abs_error, plain.next_token_agreement)


def test_a_pte_from_another_model_fails_with_its_numbers(good, other):
    _, export = good
    with pytest.raises(VerificationError) as raised:
        verify_pte(export.path, other, held_out_inputs(other))
    report, message = raised.value.report, str(raised.value)
    # two independently initialised models: their logits are about as far apart as they are large
    assert report.relative_error > 0.5 and not report.passed
    assert f"relative logit error {report.relative_error:.3g} > max_relative_error 0.1" in message
    assert "--max-relative-error" in message and "max_relative_error=" in message
    # Untrained tied models predict their input token whatever their weights: agreement alone
    # would pass this wrong program, which is why relative error is checked too.
    assert report.next_token_agreement >= 0.9


def test_a_low_agreement_fails_naming_the_threshold(good):
    torch.manual_seed(2)
    untied = _convert(TinyLM(tie=False), tokens())  # its own head: argmax no longer the input token
    _, export = good
    with pytest.raises(VerificationError) as raised:
        verify_pte(export.path, untied, held_out_inputs(untied), max_relative_error=math.inf)
    report, message = raised.value.report, str(raised.value)
    assert report.next_token_agreement < 0.9
    assert f"next-token agreement {report.next_token_agreement:.2%} < min_next_token_agreement 90.00%" in message
    assert "--min-agreement" in message and "relative logit error" not in message  # only the threshold missed


def test_an_impossible_threshold_fails_the_good_export(good):
    converted, export = good
    # XNNPACK's arithmetic is not op-for-op the converted model's (report.differences), so
    # the relative error is small but not zero, and a threshold of 0 cannot be met.
    with pytest.raises(VerificationError, match=r"relative logit error \S+ > max_relative_error 0\n"):
        verify_pte(export.path, converted, held_out_inputs(converted), max_relative_error=0.0)


def test_float_inputs_get_randn_and_a_failed_export_keeps_its_file(mlp, tmp_path):
    converted, export = mlp
    assert export.verification.passed and export.verification.positions == HELD_OUT_BATCHES * 4
    state = torch.random.get_rng_state()
    inputs = held_out_inputs(converted)
    assert torch.equal(torch.random.get_rng_state(), state)  # a generator of its own
    x = inputs[0][0]
    assert x.shape == (4, 64) and x.dtype == torch.float32 and x.std() > 0.5  # randn, not the zeros example
    with pytest.raises(VerificationError) as raised:
        executorch(converted, tmp_path / "strict.pte", verify_inputs=[(torch.randn(4, 64),)], max_relative_error=0.0)
    assert raised.value.report.batches == 1  # the verify_inputs given, not the 4 drawn ones
    assert raised.value.export.path == tmp_path / "strict.pte" and (tmp_path / "strict.pte").stat().st_size > 0


def test_held_out_token_ids_cover_the_vocabulary_deterministically(good):
    converted, _ = good
    inputs = held_out_inputs(converted)  # the default example is zeros of the capture size
    assert len(inputs) == HELD_OUT_BATCHES
    ids = torch.stack([x for (x,) in inputs])
    assert ids.shape == (HELD_OUT_BATCHES, 2, 8) and ids.dtype == torch.int64
    # vocab from the logits' last dim (96), not from the example's ids (all 0)
    assert 0 <= ids.min() and ids.max() < VOCAB and ids.unique().numel() > 20
    assert not torch.equal(inputs[0][0], inputs[1][0])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(inputs, held_out_inputs(converted)))  # fixed seed
    assert not torch.equal(ids, torch.stack([x for (x,) in held_out_inputs(converted, seed=1)]))


def test_bad_input_is_refused_with_the_fix(good, tmp_path):
    converted, export = good
    x = tokens()
    cases = [
        (dict(inputs=[(x.float(),)]), ValueError, "input 0 is int64 of shape (2, 8), verify was given float32 of shape (2, 8)"),
        (dict(inputs=[(tokens(batch=3),)]), ValueError, "refused the inputs int64[3, 8]"),
        (dict(inputs=[(x, x)]), ValueError, "takes 1 inputs, verify was given 2"),
        (dict(inputs=[]), ValueError, "at least one input"),
        (dict(inputs=[(x,)], min_next_token_agreement=1.5), ValueError, "must be a fraction in [0, 1]"),
        (dict(inputs=[(x,)], max_relative_error=-0.1), ValueError, "must be >= 0"),
    ]
    for kwargs, error, message in cases:
        inputs = kwargs.pop("inputs")
        with pytest.raises(error) as raised:
            verify_pte(export.path, converted, inputs, **kwargs)
        assert message in str(raised.value), str(raised.value)
    with pytest.raises(FileNotFoundError, match="no such .pte file"):
        verify_pte(tmp_path / "missing.pte", converted, [(x,)])
    (tmp_path / "text.pte").write_text("not a program")
    with pytest.raises(ExportError, match="is not an ExecuTorch program"):
        verify_pte(tmp_path / "text.pte", converted, [(x,)])
    with pytest.raises(ValueError, match="cannot find logits"):
        verify_pte(export.path, lambda t: {"scores": converted(t)}, [(x,)])


def test_bad_threshold_is_refused_before_lowering(good, tmp_path):
    converted, _ = good
    with pytest.raises(ValueError, match="min_next_token_agreement=-1"):
        executorch(converted, tmp_path / "never.pte", min_next_token_agreement=-1)
    assert not (tmp_path / "never.pte").exists()


def test_without_executorch_the_error_says_how_to_install_it(good, monkeypatch, tmp_path):
    converted, export = good
    for name in [n for n in sys.modules if n == "executorch" or n.startswith("executorch.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import executorch...` now raises ImportError
    monkeypatch.setitem(sys.modules, "executorch", None)
    with pytest.raises(ExportError, match=r"pip install -e \"\.\[executorch\]\""):
        verify_pte(export.path, converted, [(tokens(),)])
    with pytest.raises(ExportError, match=r"pip install -e \"\.\[executorch\]\""):
        executorch(converted, tmp_path / "x.pte")


@pytest.mark.long
def test_hf_region_capture_with_use_cache_kwarg(tmp_path):
    """An HF Llama region capture (use_cache=True, so generate() works) exported whole with
    example_kwargs={"use_cache": False}: the .pte takes the bool too, verify passes it."""
    from tests.model_zoo import _hf

    model, vocab = _hf("LlamaConfig", "LlamaForCausalLM", use_cache=True)()
    x = tokens(vocab=vocab)
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(32), (x,), regions="auto"))
    export = executorch(converted, tmp_path / "llama.pte", example_inputs=(x,), example_kwargs={"use_cache": False})
    assert export.verification.passed and export.verification.positions == HELD_OUT_BATCHES * 2 * 8
    assert len(pytree.tree_leaves(converted(x, use_cache=False))) == 1  # logits only: past_key_values is None
