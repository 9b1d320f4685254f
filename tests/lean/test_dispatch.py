"""Which fake-quant runs where: the lean one eagerly, the reference math under tracing."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import qatfx
from qatfx import lean
from qatfx.lean.lazy_weight import FakeQuantizedWeight
from tests.lean.test_values import INT4_G32


def test_plain_eager_tensors_take_the_lean_path():
    assert lean.applies(torch.randn(4, 64))
    assert lean.applies(torch.nn.Parameter(torch.randn(4, 64)))


def test_traced_or_wrapped_tensors_take_the_reference_math():
    with FakeTensorMode() as mode:
        assert not lean.applies(mode.from_tensor(torch.randn(4, 64)))
    assert not lean.applies(torch.randn(4, 64).to_sparse())
    weight = FakeQuantizedWeight(torch.randn(4, 64), lean.values.grid_of(torch.randn(4, 64), *INT4_G32[:4], None, None, "torchao"), 32)
    assert not lean.applies(weight)


def test_without_grad_a_weight_is_a_plain_tensor():
    w = torch.nn.Parameter(torch.randn(8, 64))
    with torch.no_grad():
        assert type(lean.fake_quantize(w, *INT4_G32)) is torch.Tensor
    assert isinstance(lean.fake_quantize(w, *INT4_G32), FakeQuantizedWeight)
    assert type(lean.fake_quantize(w.detach(), *INT4_G32)) is torch.Tensor  # needs no gradient


def test_the_op_under_export_records_one_node():
    # torch.export traces the op as one qatfx.fake_quantize node (FakeTensors take the
    # reference math for shape propagation), as before the lean path existed
    class M(torch.nn.Module):
        def forward(self, x):
            return qatfx.ops.fake_quantize(x, qmin=-8, qmax=7, group_size=32, symmetric=True, eps=None, scale_dtype=None)

    ep = torch.export.export(M(), (torch.randn(4, 64),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == [qatfx.ops.fake_quantize]
