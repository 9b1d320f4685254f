"""qatfx.debug.compare: per-linear SQNR of the fake-quant and converted models vs float."""

import copy
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qatfx
from qatfx import reference
from qatfx.debug.compare import compare
from qatfx.debug.compare_report import OUTLIER_DB, ErrorAccumulator, sqnr_db
from tests.models import TinyLM, tokens

Q = qatfx.Int8DynActInt4WeightQuantizer
BAD = "blocks.0.v_proj"


def plant_outliers(weight: torch.Tensor, group_size: int = 32, factor: float = 8.0) -> None:
    """One weight per group (random position) set to `factor` x the tensor's absmax: the
    group's scale grows ~factor-fold and its other values round to zero or one step."""
    g = torch.Generator().manual_seed(1)
    n, k = weight.shape
    idx = torch.randint(0, group_size, (n, k // group_size), generator=g) + torch.arange(0, k, group_size)
    with torch.no_grad():
        weight.scatter_(1, idx, weight.gather(1, idx).sign() * weight.abs().max() * factor)


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    model = TinyLM().eval()
    plant_outliers(model.get_submodule(BAD).weight)
    prepared = qatfx.prepare_pt2e(model, Q(32), (tokens(),))
    report = compare(model, prepared, [tokens(seed=1), tokens(3, 12, seed=2)])
    return model, prepared, report


def test_sqnr_matches_hand_computation():
    ref, test = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])
    # signal 3^2 + 4^2 = 25, noise (4 - 3)^2 = 1
    assert sqnr_db(ref, test) == pytest.approx(10 * math.log10(25.0), abs=1e-12)
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(torch.zeros(2), torch.ones(2)) == -math.inf
    # Over batches the powers add up: (25 + 100) / (1 + 4)
    acc = ErrorAccumulator()
    acc.update(ref, test)
    acc.update(torch.tensor([6.0, 8.0]), torch.tensor([6.0, 10.0]))
    result = acc.result()
    assert result.sqnr_db == pytest.approx(10 * math.log10(125.0 / 5.0), abs=1e-12)
    assert result.max_abs_error == 2.0


def test_planted_layer_ranks_worst(planted):
    _, _, report = planted
    worst = report.worst()
    assert worst.layer == BAD
    runner_up = report.rows[1].fake_quant.local.sqnr_db
    # Measured: 13.5 dB vs 22.3 dB for the runner-up; one bit (6.02 dB) of margin required.
    assert worst.fake_quant.local.sqnr_db < runner_up - OUTLIER_DB
    assert "outlier" in worst.note
    assert not any("outlier" in r.note for r in report.rows[1:])


def test_weight_and_activation_split_names_the_cause(planted):
    """Weight outliers show in the weights-only column; per-token int8 activations alone
    stay far better (measured ~45 dB vs ~23 dB for int4 weights on TinyLM)."""
    _, _, report = planted
    bad = report.worst().fake_quant
    assert bad.limited_by == "weights"
    # int8 codes against int4: 4 bits x 6.02 dB apart on like data; require 3 of those bits.
    assert bad.weights_only.sqnr_db < bad.activations_only.sqnr_db - 3 * 6.02
    # The local error is x.e_w + e_a.w + e_a.e_w. The first two powers add when uncorrelated;
    # at any correlation (Cauchy-Schwarz) their cross term moves the sum by at most
    # 2 sqrt(r) / (1 + r) of it, r the ratio of the two powers; e_a.e_w is below the larger
    # term by the better SQNR (amplitude c), adding at most 2c + c^2.
    w, a = bad.weights_only.sqnr_db, bad.activations_only.sqnr_db
    r = 10 ** (-abs(w - a) / 10)
    c = 10 ** (-max(w, a) / 20)
    slack_db = -10 * math.log10(1 - 2 * math.sqrt(r) / (1 + r) - 2 * c - c * c)
    assert bad.local.sqnr_db == pytest.approx(-10 * math.log10(10 ** (-w / 10) + 10 ** (-a / 10)), abs=slack_db)


def test_activation_outlier_is_limited_by_activations():
    """A massive activation channel (up_proj row scaled up, down_proj column scaled down:
    the float function is unchanged) crushes the other channels of the int8 tokens."""
    torch.manual_seed(0)
    model = TinyLM().eval()
    block = model.blocks[1]
    with torch.no_grad():
        block.up_proj.weight[5] *= 1000.0
        block.down_proj.weight[:, 5] /= 1000.0
    prepared = qatfx.prepare_pt2e(model, Q(32), (tokens(),))
    report = compare(model, prepared, (tokens(seed=1),))
    worst = report.worst()
    assert worst.layer == "blocks.1.down_proj"
    assert worst.fake_quant.limited_by == "activations"
    assert "limited by its activations" in worst.note


def test_rows_sorted_worst_local_sqnr_first(planted):
    _, _, report = planted
    local = [r.fake_quant.local.sqnr_db for r in report.rows]
    assert local == sorted(local)
    assert {r.layer for r in report.rows} == {r.layer for r in qatfx.summary(planted[1]).layers}


def test_local_error_is_the_layer_alone_on_the_float_input(planted):
    """lm_head's local row, recomputed by hand: fake-quantize the float model's input of
    lm_head and its weight with qatfx.reference, apply the linear, compare with float."""
    model, prepared, report = planted
    captured = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: captured.append((args[0], out)))
    with torch.no_grad():
        for batch in (tokens(seed=1), tokens(3, 12, seed=2)):
            model(batch)
    handle.remove()
    head = qatfx.summary(prepared).layers[-1]
    act, wt = head.input_spec, head.weight_spec
    w_fq = reference.fake_quantize(model.lm_head.weight.detach(), wt.qmin, wt.qmax, wt.group_size, wt.symmetric, wt.eps, wt.scale_dtype)
    acc = ErrorAccumulator()
    for x, y in captured:
        x_fq = reference.fake_quantize(x, act.qmin, act.qmax, act.group_size, act.symmetric, act.eps, act.scale_dtype)
        acc.update(y, F.linear(x_fq, w_fq))
    row = report.row("lm_head")
    # The same ops on the same tensors in the same order: equal, not merely close.
    assert row.fake_quant.local == acc.result()


def test_converted_equals_fake_quant_exactly(planted):
    _, _, report = planted
    assert report.has_fake_quant and report.has_converted
    for r in report.rows:
        assert r.converted_vs_fake_quant.sqnr_db == math.inf, r.layer
        assert r.converted_vs_fake_quant.max_abs_error == 0.0, r.layer
        # against float, too: local, weights-only and end-to-end (the converted model has
        # no float weight left, so no activations-only replay)
        fq, conv = r.fake_quant, r.converted
        assert (conv.local, conv.end_to_end, conv.weights_only) == (fq.local, fq.end_to_end, fq.weights_only), r.layer
        assert conv.activations_only is None and fq.activations_only is not None
    assert "| exact |" in report.to_markdown()


def test_end_to_end_error_compounds(planted):
    _, _, report = planted
    first = report.row("blocks.0.q_proj").fake_quant  # the first linear: nothing before it
    assert first.end_to_end == first.local
    head = report.row("lm_head").fake_quant
    assert head.end_to_end.sqnr_db < head.local.sqnr_db


def test_converted_only_and_skipped_layer():
    torch.manual_seed(0)
    model = TinyLM().eval()
    prepared = qatfx.prepare_pt2e(model, Q(32, skip=["lm_head"]), (tokens(),))
    converted = qatfx.convert_pt2e(prepared)
    report = compare(model, converted, (tokens(seed=1),))
    assert not report.has_fake_quant and report.has_converted
    assert all(r.fake_quant is None and r.converted_vs_fake_quant is None for r in report.rows)
    head = report.row("lm_head")
    assert head.scheme == "float" and not head.quantized and "skipped" in head.note
    assert head.converted.local.sqnr_db == math.inf  # a float layer on the float input
    assert report.rows[-1] is head  # inf sorts last
    assert "converted vs fake-quant" not in report.to_markdown()


def test_each_layer_is_compared_under_its_own_scheme():
    torch.manual_seed(0)
    model = TinyLM(tie=False).eval()
    prepared = qatfx.prepare_pt2e(model, qatfx.presets.executorch_llama(), (tokens(),))
    report = compare(model, prepared, (tokens(seed=1),))
    assert report.row("lm_head").scheme.startswith("8da8w (") and report.row("blocks.0.q_proj").scheme.startswith("8da4w (")
    # int8 per channel loses far less than int4 per group: the head's local SQNR is the higher
    assert report.row("lm_head").fake_quant.local.sqnr_db > report.row("blocks.0.q_proj").fake_quant.local.sqnr_db


def _snapshot(module):
    return (
        module.training,
        [m.training for m in module.modules()],
        {k: v.clone() for k, v in module.state_dict().items()},
        module.code if isinstance(module, torch.fx.GraphModule) else None,
        getattr(module, "qatfx_stage", None),
    )


def _same(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3] and a[4] == b[4]
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        assert torch.equal(a[2][k], b[2][k]), k


def test_models_are_not_modified_and_train_mode_runs_as_eval():
    torch.manual_seed(0)
    model = TinyLM().train()  # dropout 0.1 in every block
    prepared = qatfx.prepare_pt2e(model, Q(32), (tokens(),))
    converted = qatfx.convert_pt2e(copy.deepcopy(prepared))
    before = [_snapshot(m) for m in (model, prepared, converted)]
    first = compare(model, prepared, (tokens(seed=1),))
    second = compare(model, prepared, (tokens(seed=1),))
    compare(model, converted, (tokens(seed=1),))
    for m, snap in zip((model, prepared, converted), before):
        _same(_snapshot(m), snap)
    # Dropout off (eval) in every run: the two reports are identical, and converted == fake-quant.
    assert first.rows == second.rows
    assert all(r.converted_vs_fake_quant.max_abs_error == 0.0 for r in first.rows)


class Conv1D(nn.Module):
    """GPT-2's linear: a (K, N) weight used by addmm on the flattened input."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, n) * 0.1)
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


def test_repeated_module_call_conv1d_and_non_module_linear():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64)
            self.c = Conv1D(64, 64)
            self.w = nn.Parameter(torch.randn(32, 64) * 0.1)

        def forward(self, x):
            return F.linear(self.c(self.a(self.a(x))), self.w)  # `a` called twice; `w` has no module

    torch.manual_seed(0)
    net = Net().eval()
    prepared = qatfx.prepare_pt2e(net, Q(32), (torch.randn(2, 3, 64),))
    report = compare(net, prepared, (torch.randn(2, 5, 64),))
    assert {r.layer for r in report.rows} == {"a", "a@1", "c", "w"}
    assert report.row("a@1").fake_quant is not None
    conv1d = report.row("c")  # addmm on the 2-D view: reshaped to the module's shapes
    assert conv1d.op == "addmm" and conv1d.shape == (64, 64)
    assert conv1d.fake_quant.activations_only is not None  # the weight path was replayed in float
    assert conv1d.converted.local == conv1d.fake_quant.local
    w = report.row("w")
    assert w.fake_quant is None and "no float activations" in w.note
    assert report.rows[-1] is w
    assert w.converted_vs_fake_quant.max_abs_error == 0.0


def test_html_written_to_dump_dir_and_self_contained(planted, tmp_path, monkeypatch):
    model, prepared, _ = planted
    monkeypatch.delenv("QATFX_DUMP_DIR", raising=False)
    report = compare(model, prepared, (tokens(seed=1),), dump_dir=tmp_path)
    page = (tmp_path / "compare.html").read_text()
    assert page == report.to_html()
    assert page.startswith("<!doctype html>") and BAD in page
    assert 'class="outlier"' in page
    for external in ("http:", "https:", "//", "src=", "<link", "<script", "@import", "url("):
        assert external not in page.replace("<!doctype", ""), external
    # the environment variable works too
    env_dir = tmp_path / "env"
    monkeypatch.setenv("QATFX_DUMP_DIR", str(env_dir))
    compare(model, prepared, (tokens(seed=1),))
    (run,) = env_dir.glob("run-*")  # QATFX_DUMP_DIR gets one run-<time>-<pid>/ folder per process
    assert (run / "compare.html").exists()
    assert not list(run.glob("*convert*")), "compare's private conversion is not a pass the user ran"


def test_markdown_table_shape(planted):
    text = str(planted[2])
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(planted[2].rows)
    assert len({line.count("|") for line in table}) == 1
    assert re.search(rf"\| {re.escape(BAD)} \| 8da4w \(int8/PerToken/asym x int4/group32/sym\) \| 1\d\.\d \|", text)


def test_warns_when_float_model_does_not_match(planted, caplog):
    _, prepared, _ = planted
    with caplog.at_level("WARNING", logger="qatfx.debug"):
        report = compare(nn.Linear(64, 64), prepared, (tokens(seed=1),))
    assert "no linear layer of the quantized model" in caplog.text
    assert all(r.fake_quant is None and "no float activations" in r.note for r in report.rows)
    assert all(r.converted_vs_fake_quant.max_abs_error == 0.0 for r in report.rows)


def test_rejects_float_module_and_bad_inputs():
    model = TinyLM()
    with pytest.raises(TypeError, match="prepare_pt2e or convert_pt2e"):
        compare(model, model, (tokens(),))
    prepared = qatfx.prepare_pt2e(model, Q(32), (tokens(),))
    with pytest.raises(TypeError, match="list of batches"):
        compare(model, prepared, [])
