"""The int8 x int4 grouped GEMM: exact group dots, kernel vs torch reference, kernel vs the
fake-quant float model, the pack layout, argument checks.

On a machine without a GPU these run the Triton kernels in the interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1 before qatfx is imported); shapes stay small
because the interpreter executes every program in numpy.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qatfx import reference
from qatfx.lowering.kernels import w4a8_gemm as gemm_module
from qatfx.lowering.kernels.w4a8_gemm import (
    SUPPORTED_ACTIVATIONS,
    is_supported_group_size,
    launch_plan,
    w4a8_gemm,
    w4a8_gemm_reference,
)
from qatfx.spec import ROW

EPS = torch.finfo(torch.float32).eps
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Largest |activation'(y)| over y: gelu 1.129 (at y ~ 2.4), gelu_tanh ~1.13, silu 1.0998, relu 1.
ACTIVATION_LIPSCHITZ = 1.13
# Spacing between neighbouring values relative to |y|: 2^-(mantissa bits).
OUT_DTYPE_ULP = {torch.float32: EPS, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}

# The interpreter's numpy exp overflows to inf for very negative sigmoid arguments (large
# negative gelu_tanh inputs); 1 / (1 + inf) = 0 is the correct limit, as on a GPU.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


class Problem:
    """Quantized operands built with qatfx.reference from random float x (M, K), w (N, K)."""

    def __init__(self, m: int, n: int, k: int, g: int, scale_dtype=torch.float32):
        w = torch.randn(n, k, device=DEVICE)
        w_scales, _ = reference.choose_qparams(w, -8, 7, g, True, EPS, torch.float32)
        self.q_w = reference.quantize(w, w_scales, None, -8, 7, g)
        self.w_scales = w_scales.to(scale_dtype)
        x = torch.randn(m, k, device=DEVICE)
        self.x_scale, self.x_zero = reference.choose_qparams(x, -128, 127, ROW, False, EPS, torch.float32)
        self.x_q = reference.quantize(x, self.x_scale, self.x_zero, -128, 127, ROW)
        self.g = g
        self.w_packed = reference.pack_int4(self.q_w, g)
        self.w_group_sums = reference.int4_group_sums(self.q_w, g)  # int16, as convert stores them

    def args(self) -> tuple:
        return (self.x_q, self.x_scale, self.x_zero, self.w_packed, self.w_scales, self.w_group_sums)

    def group_dots_and_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(groups, M, N) dot_g and (groups, N) wsum, float64 from independent int64 math."""
        m, k = self.x_q.shape
        n, groups = self.q_w.shape[0], k // self.g
        w = self.q_w.long().view(n, groups, self.g)
        dots = torch.einsum("mgk,ngk->gmn", self.x_q.long().view(m, groups, self.g), w)
        return dots.double(), w.sum(-1).t().double()


def report_worst(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> str:
    excess = (actual.double() - expected.double()).abs() - bound
    t, n = divmod(int(excess.argmax()), excess.shape[1])
    return (f"{int((excess > 0).sum())} elements outside the bound; worst at [{t}, {n}]: "
            f"actual {actual[t, n].item()!r}, expected {expected[t, n].item()!r}, "
            f"bound {bound[t, n].item():.3g}")


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    ok = (actual.double() - expected.double()).abs() <= bound
    assert bool(ok.all()), report_worst(actual, expected, bound)


# ---- exact integer group dots ---------------------------------------------------------------


@pytest.mark.parametrize("m, n, k, g", [(1, 40, 64, 32), (3, 72, 512, 256), (20, 40, 192, 64)])
@pytest.mark.parametrize("with_zero_points", [False, True])
def test_integer_dots_are_exact(m, n, k, g, with_zero_points):
    """int32 group sums here; the other tests use convert's int16 (reference.int4_group_sums)."""
    # Extreme integers: int8 over its whole range, int4 over [-8, 7].
    q_x = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=DEVICE)
    q_w = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEVICE)
    ones = torch.ones(m, 1, device=DEVICE)
    z = torch.randint(-128, 128, (m, 1), device=DEVICE).float() if with_zero_points else 0 * ones
    y = w4a8_gemm(q_x, ones, z, reference.pack_int4(q_w, g), torch.ones(n, k // g, device=DEVICE),
                  q_w.view(n, k // g, g).sum(-1, dtype=torch.int32), group_size=g)
    expected = (q_x.long() - z.long()) @ q_w.long().t()
    # Every partial sum is an integer of magnitude < 2 * 128 * 8 * K < 2^24: exact in fp32.
    torch.testing.assert_close(y, expected.float(), atol=0, rtol=0)


# ---- kernel vs torch reference --------------------------------------------------------------

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (M, N, K, G, bias, activation, residual, out_dtype): awkward M, N not a multiple of any
# tile, K = 1..3 groups, every group size path (G = 32 joins the nibble halves; G = 256 takes
# two chunks per half).
REFERENCE_CASES = [
    (1, 40, 64, 32, True, "none", False, F32),
    (1, 72, 256, 64, False, "relu", True, BF16),
    (1, 40, 128, 128, True, "gelu", True, F32),  # one group: small-M path without split
    (3, 40, 384, 128, True, "gelu_tanh", True, F32),
    (3, 72, 512, 256, True, "silu", False, BF16),
    (3, 40, 96, 32, False, "none", True, F16),
    (17, 72, 64, 32, True, "gelu", False, BF16),
    (17, 40, 128, 64, True, "silu", True, F32),
    (64, 72, 256, 128, False, "none", True, F32),
    (64, 40, 768, 256, True, "relu", False, BF16),
    (64, 72, 96, 32, True, "gelu_tanh", True, BF16),
]
# Every activation on the split-K path (M = 3) and the fused path (M = 17).
REFERENCE_CASES += [(m, 40, 128, 32, True, act, True, F32)
                    for m in (3, 17) for act in SUPPORTED_ACTIVATIONS]


def reference_bound(p: Problem, bias, residual, activation, out_dtype, y_fp32) -> torch.Tensor:
    """Elementwise |kernel - reference| bound, derived:

    Both sum the same fp32 products fl(dot_g * s_ng) (dot_g an exact integer < 2^24; the
    kernel's 16 * dot_g and its final * 1/16 are exact power-of-two scalings) and the same
    column terms fl(s_ng * wsum_ng), in different orders (split-K) or with FMA contraction,
    then subtract z_t * c_n once. Two summation orders of n terms differ by at most
    2 * gamma_{n-1} * sum |terms| <= (n - 1) * eps * sum |terms|; contraction skips one product
    rounding per term on one side (eps / 2 each). The subtraction, the products with z_t and
    s_t and the bias add one rounding per side each. The error is relative to the terms before
    the zero-point cancellation, so with
    S = |s_t| * (sum_g |s_ng * dot_g| + |z_t| * sum_g |s_ng * wsum_ng|), mag = S + |bias|:
        pre-activation:  (n_groups + 3) * eps * mag, doubled for second-order terms;
        activation:      Lipschitz 1.13 times that, plus a few ulps of each side's activation
                         formula (erf, sigmoid-form tanh): 8 * eps * mag;
        residual add:    one rounding per side of the sum;
        out dtype:       values d apart round to at most d + 1 ulp apart (bf16: 2^-7 |y|);
                         this also covers the interpreter, whose fp32 -> bf16 cast truncates
                         where a GPU and torch round to nearest even.
    """
    dots, sums = p.group_dots_and_sums()
    scales = p.w_scales.double().t()  # (groups, N)
    terms = (dots * scales.unsqueeze(1)).abs().sum(0)  # (M, N)
    column = (sums * scales).abs().sum(0)  # (N,)
    mag = p.x_scale.double().abs() * (terms + p.x_zero.double().abs() * column)
    if bias is not None:
        mag = mag + bias.double().abs()
    bound = 2 * (dots.shape[0] + 3) * EPS * mag
    if activation != "none":
        bound = ACTIVATION_LIPSCHITZ * bound + 8 * EPS * mag
    res = 0 if residual is None else residual.double().abs()
    bound = bound + EPS * (ACTIVATION_LIPSCHITZ * mag + res)
    if out_dtype != torch.float32:
        bound = bound + OUT_DTYPE_ULP[out_dtype] * (y_fp32.double().abs() + bound)
    return bound


@pytest.mark.parametrize("m, n, k, g, with_bias, activation, with_residual, out_dtype", REFERENCE_CASES)
def test_kernel_matches_reference(m, n, k, g, with_bias, activation, with_residual, out_dtype):
    p = Problem(m, n, k, g)
    bias = torch.randn(n, device=DEVICE) if with_bias else None
    residual = torch.randn(m, n, device=DEVICE) if with_residual else None
    kwargs = dict(group_size=g, activation=activation)
    y = w4a8_gemm(*p.args(), bias, residual, out_dtype=out_dtype, **kwargs)
    expected = w4a8_gemm_reference(*p.args(), bias, residual, out_dtype=out_dtype, **kwargs)
    y_fp32 = w4a8_gemm_reference(*p.args(), bias, residual, out_dtype=torch.float32, **kwargs)
    assert y.dtype == out_dtype and y.shape == (m, n)
    assert_within(y, expected, reference_bound(p, bias, residual, activation, out_dtype, y_fp32))


def test_reference_cases_cover_every_path():
    plans = {launch_plan(m, n, k, g, DEVICE) for m, n, k, g, *_ in REFERENCE_CASES}
    assert any(p.small_m and p.split_k > 1 for p in plans), "no split-K decode case"
    assert any(p.small_m and p.split_k == 1 for p in plans), "no unsplit decode case"
    assert any(not p.small_m for p in plans), "no large-M case"
    assert any(not p.small_m and p.split_k > 1 for p in plans), "no split-K case with M > 16"


def test_split_k_reaches_m_128_and_stops_above():
    assert launch_plan(128, 40, 1024, 128, DEVICE).split_k > 1
    assert launch_plan(129, 40, 1024, 128, DEVICE).split_k == 1


@pytest.mark.parametrize("m, n, k, g", [(1, 72, 256, 32), (3, 40, 512, 128)])
def test_single_row_tiles_match_reference(monkeypatch, m, n, k, g):
    """The GPU's BLOCK_M = 1 decode configs (tl.dot pads the row tile to the MMA's 16 rows).
    At M = 3 each row is its own tile, and split-K keeps one ticket counter per tile."""
    single_row = gemm_module._autotuned([gemm_module._config(1, 32, 1, 4, 1)])
    monkeypatch.setattr(gemm_module, "_small_m_gemm", single_row)
    p = Problem(m, n, k, g)
    bias = torch.randn(n, device=DEVICE)
    y = w4a8_gemm(*p.args(), bias, group_size=g, activation="silu")
    expected = w4a8_gemm_reference(*p.args(), bias, group_size=g, activation="silu")
    assert launch_plan(m, n, k, g, DEVICE).split_k > 1
    assert_within(y, expected, reference_bound(p, bias, None, "silu", torch.float32, expected))


def test_pruning_keeps_single_row_tiles_for_one_row_only():
    configs = [gemm_module._config(bm, 128, 1, 4, 3) for bm in (1, 16, 64)]
    kept = lambda m_bucket: [c.kwargs["BLOCK_M"] for c in gemm_module._prune_configs(  # noqa: E731
        configs, {"M_BUCKET": m_bucket, "N": 4096})]
    assert kept(1) == [1, 16]
    assert kept(8) == [16]  # a 1-row tile would read the weight 8 times
    assert kept(64) == [16, 64]


def _at_odd_offset(t: torch.Tensor) -> torch.Tensor:
    storage = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
    shifted = storage[1:].view_as(t)
    shifted.copy_(t)
    return shifted


@pytest.mark.parametrize("g", [32, 64])
def test_misaligned_operands_are_read_correctly(g):
    """The kernel reads the packed weight (and at G = 32 the activations) as int32 words;
    buffers starting at an odd byte offset cannot be viewed that way and are copied first."""
    p = Problem(3, 40, 128, g)
    args = (_at_odd_offset(p.x_q), *p.args()[1:3], _at_odd_offset(p.w_packed), *p.args()[4:])
    y = w4a8_gemm(*args, group_size=g)
    expected = w4a8_gemm_reference(*p.args(), group_size=g)
    assert_within(y, expected, reference_bound(p, None, None, "none", torch.float32, expected))


def test_bf16_scales_and_non_contiguous_inputs():
    p = Problem(5, 40, 128, 64, scale_dtype=torch.bfloat16)
    x_q = p.x_q.t().contiguous().t()  # same values, column-major
    residual = torch.randn(40, 5, device=DEVICE).t()
    args = (x_q, *p.args()[1:], None, residual)
    y = w4a8_gemm(*args, group_size=64, activation="silu")
    expected = w4a8_gemm_reference(*args, group_size=64, activation="silu")
    assert_within(y, expected, reference_bound(p, None, residual, "silu", torch.float32, expected))


def test_empty_batch():
    p = Problem(1, 40, 64, 32)
    args = (p.x_q[:0], p.x_scale[:0], p.x_zero[:0], *p.args()[3:])
    assert w4a8_gemm(*args, group_size=32, out_dtype=torch.bfloat16).shape == (0, 40)


# ---- kernel vs the fake-quant float model ---------------------------------------------------


@pytest.mark.parametrize("m, n, k, g", [(1, 40, 256, 32), (3, 72, 256, 128), (33, 40, 512, 256)])
def test_kernel_matches_fake_quant_linear(m, n, k, g):
    p = Problem(m, n, k, g)
    bias = torch.randn(n, device=DEVICE)
    x_fq = reference.dequantize(p.x_q, p.x_scale, p.x_zero, ROW, torch.float32)
    w_fq = reference.dequantize(p.q_w, p.w_scales, None, g, torch.float32)
    expected = F.linear(x_fq, w_fq, bias)
    y = w4a8_gemm(*p.args(), bias, group_size=g)
    # Rigorous first-order bound. The float model rounds x_fq and w_fq (one rounding each),
    # every product, and a K-term sum in any order: gamma_{K+2} * sum_k |x_fq w_fq|; the kernel
    # is exact up to the group sum: fl(corr_g * s_ng), n_groups terms, * s_t:
    # gamma_{n_groups+1} * the same sum; the bias add is one rounding per side. Together
    # (K + n_groups + 3) * eps / 2 <= (K + G) * eps.
    bound = (k + g) * EPS * (x_fq.abs().double() @ w_fq.abs().double().t() + bias.abs().double())
    assert_within(y, expected, bound)


# ---- pack layout ----------------------------------------------------------------------------


@pytest.mark.parametrize("n, k, tile", [(1, 32, 32), (7, 96, 32), (5, 256, 64), (3, 512, 256), (4, 64, 2)])
def test_pack_unpack_round_trip(n, k, tile):
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    packed = reference.pack_int4(q, tile)
    assert packed.dtype == torch.uint8 and packed.shape == (n, k // 2)
    assert torch.equal(reference.unpack_int4(packed, tile), q)


def test_pack_layout_is_the_one_the_kernel_reads():
    g = 32
    q = torch.randint(-8, 8, (3, 2 * g), dtype=torch.int8)
    b = reference.pack_int4(q, g).to(torch.int32).view(3, 2, g // 2)  # (N, groups, bytes)
    lo, hi = ((b & 0xF) ^ 8) - 8, ((b >> 4) ^ 8) - 8
    groups = q.view(3, 2, g).int()
    assert torch.equal(lo, groups[..., : g // 2]) and torch.equal(hi, groups[..., g // 2:])


# ---- argument checks ------------------------------------------------------------------------


def _replace(args: tuple, index: int, value) -> tuple:
    return args[:index] + (value,) + args[index + 1:]


def test_group_size_support():
    assert [g for g in (16, 32, 48, 64, 96, 128, 256, 4096) if is_supported_group_size(g)] == [
        32, 64, 128, 256, 4096]


@pytest.mark.parametrize("mutate, group_size, message", [
    (lambda a: _replace(a, 0, a[0].float()), 32, "x_q must be a 2-D int8"),
    (lambda a: _replace(a, 4, a[4].half()), 32, "w_scales must be"),
    (lambda a: _replace(a, 5, a[5].long()), 32, "w_group_sums must be"),
    (lambda a: _replace(a, 5, a[5].float()), 32, "w_group_sums must be"),
    (lambda a: a, 48, "power of two"),
    (lambda a: a, 128, "not a positive multiple of group_size"),
    (lambda a: _replace(a, 3, a[3][:, :-1]), 32, r"w_packed must be \(N, K // 2\)"),
    (lambda a: _replace(a, 1, a[1][:1]), 32, "x_scale must be"),
    (lambda a: _replace(a, 4, a[4][:-1]), 32, "w_scales must be"),
])
def test_bad_arguments_raise(mutate, group_size, message):
    p = Problem(2, 40, 64, 32)
    with pytest.raises(ValueError, match=message):
        w4a8_gemm(*mutate(p.args()), group_size=group_size)


def test_bad_epilogue_arguments_raise():
    args = Problem(2, 40, 64, 32).args()
    with pytest.raises(ValueError, match="bias must be"):
        w4a8_gemm(*args, torch.randn(41, device=DEVICE), group_size=32)
    with pytest.raises(ValueError, match="residual must be"):
        w4a8_gemm(*args, None, torch.randn(40, 2, device=DEVICE), group_size=32)
    with pytest.raises(ValueError, match="activation must be one of"):
        w4a8_gemm(*args, group_size=32, activation="tanh")
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        w4a8_gemm(*args, group_size=32, out_dtype=torch.int32)


def test_cpu_without_interpreter_points_to_the_reference(monkeypatch):
    monkeypatch.setattr(gemm_module, "_INTERPRETING", False)
    cpu_args = tuple(t.cpu() for t in Problem(2, 40, 64, 32).args())
    with pytest.raises(RuntimeError, match="w4a8_gemm_reference"):
        w4a8_gemm(*cpu_args, group_size=32)


def test_direct_calls_launch_the_autotuned_kernel_and_only_a_trace_wraps_it(monkeypatch):
    """Called eagerly on a GPU, the launcher is the autotuner itself (Triton caches its
    choice per shape); torch.library.wrap_triton would re-prune the configs into a new
    autotuner on every call. Only while torch traces (fake tensors) does the call go
    through wrap_triton, so the traced graph holds the kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    wrapped = []
    monkeypatch.setattr(torch.library, "wrap_triton", lambda k: wrapped.append(k) or ("wrapped", k))
    kernel, cuda = gemm_module._small_m_gemm, torch.device("cuda")
    real = torch.zeros(2, 2)
    assert not gemm_module.is_tracing(real)
    assert gemm_module._launcher(kernel, cuda, gemm_module.is_tracing(real)) is kernel
    assert gemm_module._launcher(kernel, cuda, gemm_module.is_tracing(real)) is kernel
    assert wrapped == []
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(real)
        assert gemm_module.is_tracing(fake)
        assert gemm_module._launcher(kernel, cuda, gemm_module.is_tracing(fake)) == ("wrapped", kernel)
    assert wrapped == [kernel]
