"""Bad inputs not covered by tests/test_api.py or tests/test_capture.py; the table of all of
them, with what qatfx does, is docs/bad_input.md."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import qatfx
from qatfx.passes.finite_check import NonFiniteWarning
from tests.models import TinyLM, tokens

Q = qatfx.Int8DynActInt4WeightQuantizer
NAN, INF = float("nan"), float("inf")


class OneLinear(nn.Module):
    def __init__(self, k: int = 64, n: int = 32) -> None:
        super().__init__()
        self.fc = nn.Linear(k, n)

    def forward(self, x):
        return self.fc(x)


def prepared_lm():
    return qatfx.prepare_pt2e(TinyLM(), Q(32), (tokens(),))


def assert_same_with_nan(a, b):
    torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


# ---- dtypes -------------------------------------------------------------------------------


def test_float64_layer_in_float32_model_is_skipped_with_reason():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64)
            self.b = nn.Linear(64, 32).double()

        def forward(self, x):
            return self.b(self.a(x).double()).float()

    prepared = qatfx.prepare_pt2e(Mixed(), Q(32), (torch.randn(2, 64),))
    (skipped,) = qatfx.summary(prepared).skipped
    assert skipped.layer == "b" and "torch.float64 is not supported" in skipped.skip_reason
    x = torch.randn(3, 64)
    assert torch.equal(qatfx.convert_pt2e(prepared)(x), prepared(x))


def test_integer_weights_are_skipped_and_nothing_left_raises():
    class IntWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randint(-3, 3, (64, 64)), requires_grad=False)

        def forward(self, x):
            return nn.functional.linear(x, self.w)

    with pytest.raises(ValueError, match=r"every linear layer was skipped \(w: weight dtype torch.int64 is not supported"):
        qatfx.prepare_pt2e(IntWeight(), Q(32), (torch.randint(0, 5, (2, 64)),))


# ---- empty batch --------------------------------------------------------------------------


@pytest.mark.parametrize("batch, seq", [(0, 8), (2, 0)], ids=["batch0", "seq0"])
def test_empty_batch_returns_empty_output(batch, seq):
    prepared = prepared_lm().eval()
    converted = qatfx.convert_pt2e(prepared)
    t = tokens(batch, seq)
    with torch.no_grad():
        out = prepared(t)
        assert out.shape == (batch, seq, 96)
        assert torch.equal(converted(t), out)


# ---- quantizers that quantize nothing -----------------------------------------------------


def test_quantizer_that_annotates_nothing_raises_with_reasons():
    with pytest.raises(ValueError, match=r"found nothing to quantize: every linear layer was skipped \(fc: excluded by the quantizer's skip pattern '\*'"):
        qatfx.prepare_pt2e(OneLinear(), Q(32, skip=["*"]), (torch.randn(2, 64),))


def test_foreign_quantizer_is_refused():
    class NotOurs:  # e.g. a torchao quantizer object
        pass

    with pytest.raises(TypeError, match="quantizer must be a qatfx Quantizer, got NotOurs"):
        qatfx.prepare_pt2e(OneLinear(), NotOurs(), (torch.randn(2, 64),))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Q(33), "weight group size must be even, got 33"),
        (lambda: qatfx.PerGroup(1), "PerGroup group_size must be >= 2, got 1"),
        (lambda: qatfx.QuantSpec(9, qatfx.PerToken(), symmetric=True), r"QuantSpec.bits must be in \[2, 8\], got 9"),
        (lambda: qatfx.QuantSpec(4, qatfx.PerToken(), symmetric=True, signed=False), "a symmetric spec needs a signed integer grid"),
        (lambda: qatfx.QuantSpec(8, qatfx.PerToken(), symmetric=False, eps=0.0), "QuantSpec.eps must be positive, got 0.0"),
    ],
    ids=["odd_group", "group_1", "bits_9", "unsigned_symmetric", "eps_0"],
)
def test_invalid_quantizer_settings_raise_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---- inputs at call time that differ from the example -------------------------------------


def test_call_with_wrong_number_of_inputs():
    for module in (prepared_lm(), qatfx.convert_pt2e(prepared_lm())):
        with pytest.raises(TypeError, match="takes 2 positional arguments but 3 were given"):
            module(tokens(), tokens())
        with pytest.raises(TypeError, match="missing 1 required positional argument: 'tokens'"):
            module()


def test_call_with_other_dtype_or_rank_fails_in_the_first_op_that_cannot_take_it():
    """The exported module checks neither dtype nor rank (torch 2.13's ep.module() neither):
    the error is the float model's own, from the op that refuses the input."""
    prepared = prepared_lm().eval()
    converted = qatfx.convert_pt2e(prepared)
    for module in (prepared, converted):
        with pytest.raises(RuntimeError, match="Expected tensor for argument #1 'indices' to have one of the following scalar types"):
            module(tokens().float())
        with pytest.raises(RuntimeError, match="is invalid for input of size"):
            module(tokens().unsqueeze(0))
    t = tokens(seed=5)
    assert torch.equal(prepared(t.int()), prepared(t))  # int32 ids work, as in the float model


def test_converted_model_forward_with_grad_enabled_backward_refused():
    converted = qatfx.convert_pt2e(prepared_lm().eval())
    t = tokens(seed=7)
    out = converted(t)  # grad mode on: forward still runs (it is the inference graph)
    with torch.no_grad():
        assert torch.equal(converted(t), out)
    with pytest.raises(RuntimeError, match="backward through qatfx.dequantize.default but no autograd formula"):
        out.sum().backward()


# ---- NaN / inf ----------------------------------------------------------------------------


def _x_with_bad_rows():
    """Rows 1-3 hold a NaN, a +inf, a -inf; rows 0 and 4 are finite."""
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    x[1, 2], x[2, 9], x[3, 63] = NAN, INF, -INF
    return x


def test_non_finite_activation_makes_its_token_row_nan_and_nothing_else():
    prepared = qatfx.prepare_pt2e(OneLinear(), Q(32), (torch.randn(2, 64),)).eval()
    converted = qatfx.convert_pt2e(prepared)
    x = _x_with_bad_rows()
    clean = x.clone()
    clean[1:4] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no check by default: silent
        out = prepared(x)
    # one NaN/inf in a token makes its scale (and zero point) NaN/inf: the whole row of the
    # fake-quantized activation is NaN, hence every output of that token
    assert torch.isnan(out[1:4]).all()
    # per-token quantization and a row-wise matmul: other tokens are bit-identical
    assert torch.equal(out[[0, 4]], prepared(clean)[[0, 4]])
    assert_same_with_nan(converted(x), out)


def test_non_finite_weight_warns_at_prepare_and_convert_and_nans_its_channels():
    model = OneLinear()
    with torch.no_grad():
        model.fc.weight[3, 5] = NAN  # group 0 of channel 3
        model.fc.weight[7, 40] = INF  # group 1 of channel 7
    with pytest.warns(NonFiniteWarning, match=r"prepare_pt2e: the weight of layer fc holds 2 non-finite value\(s\) \(NaN/inf\) in output channel\(s\) \[3, 7\]"):
        prepared = qatfx.prepare_pt2e(model, Q(32), (torch.randn(2, 64),)).eval()
    with pytest.warns(NonFiniteWarning, match=r"convert_pt2e: the weight of layer fc holds 2"):
        converted = qatfx.convert_pt2e(prepared)
    x = torch.randn(4, 64)
    out = prepared(x)
    nan_columns = torch.isnan(out).all(0).nonzero().flatten().tolist()
    assert nan_columns == [3, 7] and not torch.isnan(out[:, [c for c in range(32) if c not in (3, 7)]]).any()
    assert_same_with_nan(converted(x), out)
    # the bad groups store defined codes (0), not whatever casting NaN to int8 gives
    packed = converted.fc.weight_packed  # (32, 64 / 2): group g of a row is bytes [16g, 16g + 16)
    assert not packed[3, :16].any() and not packed[7, 16:].any()


def test_non_finite_weight_of_a_k_by_n_weight_names_the_output_channel():
    """GPT-2 style (K, N) weight used by addmm: channel indices are columns of the storage."""

    class KByN(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(64, 32))
            self.bias = nn.Parameter(torch.zeros(32))

        def forward(self, x):
            return torch.addmm(self.bias, x, self.weight)

    model = KByN()
    with torch.no_grad():
        model.weight[10, 6] = NAN  # K index 10, output channel 6
    with pytest.warns(NonFiniteWarning, match=r"layer weight holds 1 .* output channel\(s\) \[6\]"):
        qatfx.prepare_pt2e(model, Q(32), (torch.randn(2, 64),))


def test_opt_in_activation_check_names_the_layers(monkeypatch):
    model = TinyLM()
    monkeypatch.setenv("QATFX_CHECK_FINITE", "1")
    checked = qatfx.prepare_pt2e(copy.deepcopy(model), Q(32), (tokens(),)).eval()
    monkeypatch.delenv("QATFX_CHECK_FINITE")
    plain = qatfx.prepare_pt2e(model, Q(32), (tokens(),)).eval()
    t = tokens(seed=3)
    assert torch.equal(checked(t), plain(t))  # the check is an exact identity
    with torch.no_grad():
        checked.get_submodule("blocks.1").mlp_norm.weight[0] = NAN  # NaN into gate/up inputs
    # the NaN reaches gate/up first, then everything downstream; one warning per input
    expected = [
        "qatfx: the input of blocks.1.gate_proj, blocks.1.up_proj holds NaN/inf in 16 of 16 token(s); their output rows are NaN",
        "qatfx: the input of blocks.1.down_proj holds NaN/inf in 16 of 16 token(s); their output rows are NaN",
        "qatfx: the input of lm_head holds NaN/inf in 16 of 16 token(s); their output rows are NaN",
    ]
    converted = qatfx.convert_pt2e(checked)  # the checks survive convert
    for module in (checked, converted):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module(t)
        assert [str(w.message) for w in caught if w.category is NonFiniteWarning] == expected


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.long)])
def test_opt_in_activation_check_under_compile_and_backward(backend):
    """torch.compile keeps the check (an opaque op): it warns at run time, and its gradient
    is the identity (finite rows get the same gradient as without the check). aot_eager
    covers Dynamo + AOTAutograd in the default run (Inductor costs ~15 s to compile)."""
    model = OneLinear()
    plain = qatfx.prepare_pt2e(model, Q(32), (torch.randn(2, 64),))
    checked = qatfx.prepare_pt2e(copy.deepcopy(model), Q(32), (torch.randn(2, 64),), check_finite=True)
    x = _x_with_bad_rows().requires_grad_()
    with pytest.warns(NonFiniteWarning, match=r"input of fc holds NaN/inf in 3 of 5 token"):
        out = torch.compile(checked, backend=backend)(x)
    assert torch.isnan(out[1:4]).all() and not torch.isnan(out[[0, 4]]).any()
    out[[0, 4]].sum().backward()
    x_plain = x.detach().clone().requires_grad_()
    plain(x_plain)[[0, 4]].sum().backward()
    if backend == "aot_eager":  # the same aten ops as eager, op for op: exact
        assert torch.equal(x.grad[[0, 4]], x_plain.grad[[0, 4]])
        return
    # Inductor's backward is not eager's op for op. A finite row's gradient is
    # ((1 @ fq(W)) * s) * mask * (1 / s): an N-term fp32 dot of ones with the fake-quantized
    # weight (|fl - exact| <= N u sum_n |fq(W)[n, k]|, u = 2^-24), then 3 roundings; two
    # evaluations differ by at most twice (N + 3) u sum_n |fq(W)[n, k]|. A lost or doubled
    # gradient is off by a whole row of fq(W), far above.
    w_fq = qatfx.ops.fake_quantize(model.fc.weight.detach(), **qatfx.spec.int4_per_group_weight(32).op_kwargs())
    u, n = 2.0**-24, w_fq.shape[0]
    bound = 2 * (n + 3) * u * w_fq.double().abs().sum(0)
    diff = (x.grad[[0, 4]].double() - x_plain.grad[[0, 4]].double()).abs()
    assert bool((diff <= bound).all()), (diff.max(), bound.min())


# ---- models exported in training mode -----------------------------------------------------


class AttentionWithDropout(nn.Module):
    """HF-style attention: dropout_p is chosen in Python from self.training."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(64, 192)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (h.view(b, t, 4, 16).transpose(1, 2) for h in self.qkv(x).chunk(3, -1))
        return nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.5 if self.training else 0.0)


def test_attention_dropout_of_a_train_mode_export_switches_with_the_mode():
    prepared = qatfx.prepare_pt2e(AttentionWithDropout().train(), Q(32), (torch.randn(2, 8, 64),))
    x = torch.randn(2, 8, 64)
    assert not torch.equal(prepared(x), prepared(x)), "train mode: attention dropout on"
    prepared.eval()
    assert torch.equal(prepared(x), prepared(x)), "eval mode: attention dropout off"
    with torch.no_grad():
        assert torch.equal(qatfx.convert_pt2e(prepared)(x), prepared(x))
    prepared.train()  # the exported p comes back
    (sdpa,) = [n for n in prepared.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert sdpa.args[4] == 0.5
    assert not torch.equal(prepared(x), prepared(x))
