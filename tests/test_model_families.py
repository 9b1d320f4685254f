"""Real model families (tests/model_zoo.py: random weights, no downloads) through the whole
flow; docs/models.md is the table of results.

Default run, per family (export dominates, a few seconds on 2 cores):
    export -> prepare (model untouched, summary counts and reasons) -> 1 eager AdamW step
    -> convert (weights quantized along K) -> prepared == converted exactly
    -> state_dict round trip into an untrained twin.
`pytest -m long`: 3 torch.compile'd AdamW steps at varying sequence lengths, then the same
checks, and save / load into a freshly exported model.
"""

import copy
import io

import pytest
import torch

import qatfx
from qatfx import reference
from qatfx.passes.convert import _weight_param
from qatfx.passes.insert_fake_quant import ROLE_META_KEY, fake_quant_nodes
from qatfx.graph.linear_sites import get_attr_value
from tests.model_zoo import FAMILIES, ModelSnapshot, logits
from tests.models import tokens

GROUP = 32
Q = qatfx.Int8DynActInt4WeightQuantizer


def _prepare_checked(family):
    """Build, prepare, and check what prepare promises: the model untouched, the summary."""
    model, vocab = family.build()
    before = ModelSnapshot.of(model)
    prepared = qatfx.prepare_pt2e(model, Q(GROUP), (tokens(2, 8, vocab, 0),))
    before.assert_unchanged(model)

    summary = qatfx.summary(prepared)
    assert len(summary.quantized) == family.quantized, str(summary)
    assert {r.layer: r.skip_reason for r in summary.skipped}.keys() == family.skipped.keys(), str(summary)
    for report in summary.skipped:
        assert family.skipped[report.layer] in report.skip_reason
    assert all(r.shape[1] % GROUP == 0 for r in summary.quantized)
    if family.tied:  # the tied lm_head is quantized; the embedding keeps reading the float weight
        assert any(r.shape[0] == vocab for r in summary.quantized)
    return model, vocab, prepared


def _train_step(module, vocab, ids, opt):
    out = logits(module(ids))
    loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def _assert_weights_quantized_along_k(prepared, converted, family):
    """Each converted weight is the reference int4 quantization of the trained (N, K) weight
    in groups along K. A (K, N) Conv1D weight is transposed first: quantizing its storage
    as is would group along N and give scales of shape (K, N / G)."""
    k_by_n = 0
    for fq in fake_quant_nodes(prepared):
        if fq.meta[ROLE_META_KEY] != "weight":
            continue
        param_node, transposed = _weight_param(fq)
        k_by_n += transposed
        weight = get_attr_value(prepared, param_node.target).detach()
        n_by_k = weight.t() if transposed else weight
        scale, _ = reference.choose_qparams(n_by_k, -8, 7, GROUP, True, None, torch.float32)
        q = reference.quantize(n_by_k, scale, None, -8, 7, GROUP)
        stored_scales = get_attr_value(converted, f"{param_node.target}_scales")
        assert stored_scales.shape == (n_by_k.shape[0], n_by_k.shape[1] // GROUP)
        assert torch.equal(stored_scales, scale)
        assert torch.equal(get_attr_value(converted, f"{param_node.target}_packed"), reference.pack_int4(q, GROUP))
    assert k_by_n == family.k_by_n


def _assert_prepared_equals_converted(prepared, converted, vocab):
    prepared.eval()
    with torch.no_grad():
        for batch, seq in [(3, 10), (1, 5)]:  # other sizes than the example: shapes stayed dynamic
            ids = tokens(batch, seq, vocab, 100 + seq)
            expected = logits(prepared(ids))
            assert expected.shape == (batch, seq, vocab) and torch.isfinite(expected).all()
            assert torch.equal(logits(converted(ids)), expected)


def _state_dict_round_trip(converted, target, vocab):
    """torch.save(converted.state_dict()) -> load into `target` (converted, other weights)."""
    ids = tokens(2, 9, vocab, 7)
    with torch.no_grad():
        expected = logits(converted(ids))
        assert not torch.equal(logits(target(ids)), expected)  # the load below does the work
        buffer = io.BytesIO()
        torch.save(converted.state_dict(), buffer)
        buffer.seek(0)
        target.load_state_dict(torch.load(buffer, weights_only=True))
        assert torch.equal(logits(target(ids)), expected)


DEFAULT = [pytest.param(f, id=f.name) for f in FAMILIES if not f.long_only]
ALL = [pytest.param(f, id=f.name) for f in FAMILIES]


@pytest.mark.parametrize("family", DEFAULT)
def test_family(family):
    model, vocab, prepared = _prepare_checked(family)
    twin = copy.deepcopy(prepared)  # untrained, owns its parameters: the round-trip target

    prepared.train()
    opt = torch.optim.AdamW(prepared.parameters(), lr=1e-3)
    assert torch.isfinite(torch.tensor(_train_step(prepared, vocab, tokens(2, 8, vocab, 1), opt)))

    prepared.eval()
    converted = qatfx.convert_pt2e(prepared)
    _assert_weights_quantized_along_k(prepared, converted, family)
    _assert_prepared_equals_converted(prepared, converted, vocab)
    _state_dict_round_trip(converted, qatfx.convert_pt2e(twin.eval()), vocab)


@pytest.mark.parametrize("family", DEFAULT)
def test_float_and_prepared_checkpoints_load_into_each_other_strictly(family):
    """The prepared state_dict has exactly the float model's keys: a buffer the model keeps
    out of its state_dict (persistent=False: RoPE tables, HF's inv_freq, torchtune's RoPE
    cache) stays out, so checkpoints move both ways with strict=True."""
    model, vocab = family.build()
    prepared = qatfx.prepare_pt2e(model, Q(GROUP), (tokens(2, 8, vocab, 0),))
    assert prepared.state_dict().keys() == model.state_dict().keys()
    twin, _ = family.build()  # other random weights
    twin.load_state_dict(prepared.state_dict(), strict=True)
    prepared.load_state_dict(twin.state_dict(), strict=True)
    for name, value in prepared.state_dict().items():
        assert torch.equal(value, model.state_dict()[name])


@pytest.mark.long
@pytest.mark.parametrize("family", ALL)
def test_family_compiled_training_and_save_load(family, tmp_path):
    model, vocab, prepared = _prepare_checked(family)

    prepared.train()
    compiled = torch.compile(prepared)
    opt = torch.optim.AdamW(prepared.parameters(), lr=1e-3)
    losses = [_train_step(compiled, vocab, tokens(2, seq, vocab, step), opt) for step, seq in enumerate([8, 12, 8])]
    assert torch.isfinite(torch.tensor(losses)).all()

    prepared.eval()
    converted = qatfx.convert_pt2e(prepared)
    _assert_weights_quantized_along_k(prepared, converted, family)
    _assert_prepared_equals_converted(prepared, converted, vocab)

    # the state_dict loads into a model prepared and converted from a fresh export
    torch.manual_seed(1)
    fresh_model, _ = family.build()
    fresh = qatfx.convert_pt2e(qatfx.prepare_pt2e(fresh_model, Q(GROUP), (tokens(2, 8, vocab, 0),)).eval())
    _state_dict_round_trip(converted, fresh, vocab)

    qatfx.save(converted, tmp_path / "model")
    loaded = qatfx.load(tmp_path / "model")
    ids = tokens(3, 11, vocab, 8)
    with torch.no_grad():
        assert torch.equal(logits(loaded(ids)), logits(converted(ids)))
