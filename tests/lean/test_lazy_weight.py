"""FakeQuantizedWeight through the ops a prepared graph runs on a weight, and what autograd
keeps for backward."""

import pytest
import torch

from qatfx import lean, reference
from qatfx.lean.lazy_weight import FakeQuantizedWeight
from tests.lean.test_values import INT4_G32

aten = torch.ops.aten


def _weight_uses(fq, w, x, b, idx):
    """Every way an exported graph reads a fake-quantized weight or table."""
    return (
        aten.linear.default(x, fq(w), b),  # nn.Linear
        aten.linear.default(x, fq(w), None),
        torch.mm(x.flatten(0, 1), fq(w).t()),
        torch.addmm(b, x.flatten(0, 1), aten.t.default(fq(w))),
        torch.matmul(x, fq(w).transpose(0, 1)),  # GPT-2's Conv1D reads t(fq(W^T))
        torch.mm(x.flatten(0, 1), fq(w).permute(1, 0)),
        aten.embedding.default(fq(w), idx),  # a quantized embedding table
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_weight_use_matches_the_reference(dtype):
    torch.manual_seed(0)
    w0, x0, b0 = (3 * torch.randn(64, 96)).to(dtype), torch.randn(2, 5, 96).to(dtype), torch.randn(64).to(dtype)
    idx = torch.tensor([[0, 5, 63]])
    results = {}
    for name, fq in (("reference", lambda t: reference.fake_quantize(t, *INT4_G32)), ("lean", lambda t: lean.fake_quantize(t, *INT4_G32))):
        w, x, b = (t.clone().requires_grad_() for t in (w0, x0, b0))
        outs = _weight_uses(fq, w, x, b, idx)
        sum((o.float() ** 2).sum() for o in outs).backward()
        results[name] = [o.detach() for o in outs] + [w.grad, x.grad, b.grad]
    for ref, got in zip(results["reference"], results["lean"]):
        assert type(got) is torch.Tensor  # the wrapper never escapes an op
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def _saved_tensors(fn):
    """The tensors autograd keeps for backward while `fn` runs."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_a_linear_keeps_the_weight_not_its_fake_quant():
    w = torch.nn.Parameter(torch.randn(64, 96))
    x = torch.randn(2, 5, 96, requires_grad=True)
    out, saved = _saved_tensors(lambda: aten.linear.default(lean.fake_quantize(x, -128, 127, -1, False, None, None, "torchao"), lean.fake_quantize(w, *INT4_G32), None))
    weight_sized = [t for t in saved if t.shape in ((64, 96), (96, 64))]
    # W itself (for the mask) and the lazy wrapper the matmul keeps; neither holds fq(W)
    assert {type(t) for t in weight_sized} == {torch.nn.Parameter, FakeQuantizedWeight}
    assert all(t is w or t.source is not None for t in weight_sized)
    activation_sized = [t for t in saved if t.shape[-1] == 96 and t.dim() >= 2 and t.shape not in ((64, 96), (96, 64))]
    # fq(x) for the weight gradient and the activation's bool mask (1 byte per element)
    assert sorted(str(t.dtype) for t in activation_sized) == ["torch.bool", "torch.float32"]
    out.sum().backward()
    assert w.grad is not None and x.grad is not None


def test_a_weight_changed_before_backward_is_refused():
    w = torch.nn.Parameter(torch.randn(64, 96))
    out = torch.mm(torch.randn(3, 96), lean.fake_quantize(w, *INT4_G32).t())
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step before backward
    with pytest.raises(RuntimeError, match="modified (by an|in place)"):
        out.sum().backward()
