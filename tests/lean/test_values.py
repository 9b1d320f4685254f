"""The eager fake-quant (qatfx.lean) against the reference: values and gradients bit for bit.

Both run the same aten ops in the same dtypes (in place or fused into one kernel with the
dtype of every eager op spelled out), so the comparisons are exact (atol=0)."""

import pytest
import torch

from qatfx import lean, reference
from qatfx.lean import kernels
from qatfx.lean.lazy_weight import FakeQuantizedWeight
from qatfx.spec import FP32_EPS, ROW, TENSOR

# (qmin, qmax, group_size, symmetric, eps, scale_dtype, scale_rule)
INT4_G32 = (-8, 7, 32, True, None, torch.float32, "torchao")  # 8da4w's weights
SPECS = {
    "int4 g32 fp32 scales": INT4_G32,
    "int4 g32 scales in x dtype": (-8, 7, 32, True, None, None, "torchao"),
    "int4 g32 bf16 scales": (-8, 7, 32, True, None, torch.bfloat16, "torchao"),
    "int8 per token asym (8da4w activations)": (-128, 127, ROW, False, FP32_EPS, torch.float32, "torchao"),
    "int8 per token asym, x dtype": (-128, 127, ROW, False, None, None, "torchao"),
    "uint4 g32 asym": (0, 15, 32, False, None, None, "torchao"),
    "int3 per tensor": (-4, 3, TENSOR, True, None, None, "torchao"),
    "ggml q8_0": (-127, 127, 32, True, None, torch.float16, "ggml"),
}


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _values(out):
    return out.materialize() if isinstance(out, FakeQuantizedWeight) else out


def _check(x, grad, spec):
    ref_x = x.clone().requires_grad_()
    expected = reference.fake_quantize(ref_x, *spec)
    expected.backward(grad)
    lean_x = x.clone().requires_grad_()
    out = lean.fake_quantize(lean_x, *spec)
    _same(_values(out), expected.detach())
    out.backward(grad)
    _same(lean_x.grad, ref_x.grad)
    with torch.no_grad():
        _same(lean.fake_quantize(x, *spec), expected.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
@pytest.mark.parametrize("shape", [(64, 96), (2, 8, 96)], ids=["weight 2-D", "activation 3-D"])
def test_aten_chain_equals_reference(shape, spec, dtype):
    torch.manual_seed(0)
    # x3 so that some int4 codes land outside the grid and the clamp's mask matters
    x = (3 * torch.randn(shape)).to(dtype)
    _check(x, torch.randn(shape).to(dtype), spec)


def _kernel_cases(dtypes, specs):
    return [pytest.param(d, s, id=f"{str(d)[6:]}-{name}") for d in dtypes for name, s in specs.items()]


def _check_kernels(monkeypatch, dtype, spec):
    # Exact on any CPU: each kernel op is a single IEEE mul, round, add, sub, clamp or
    # compare in the dtype eager uses (16-bit results rounded once, as eager does), with
    # no sum whose order could change and no a * b + c a compiler could fuse into an FMA.
    monkeypatch.setattr(kernels, "MIN_ELEMENTS", 0)
    torch.manual_seed(0)
    w = (3 * torch.randn(64, 96)).to(dtype)
    _check(w, torch.randn(64, 96).to(dtype), spec)


@pytest.mark.parametrize("dtype, spec", _kernel_cases([torch.float32], {"int4 g32": INT4_G32}))
def test_fused_kernels_equal_reference(monkeypatch, dtype, spec):
    _check_kernels(monkeypatch, dtype, spec)


@pytest.mark.long
@pytest.mark.parametrize("dtype, spec", _kernel_cases([torch.float32, torch.bfloat16, torch.float16], SPECS))
def test_fused_kernels_equal_reference_every_spec(monkeypatch, dtype, spec):
    _check_kernels(monkeypatch, dtype, spec)


def test_nan_gets_no_gradient_like_the_reference():
    x = torch.randn(4, 64)
    x[1, 3] = float("nan")
    _check(x, torch.ones(4, 64), INT4_G32)
