"""The lowering pass under a real Inductor compile on CPU: which rewrites fire (counters),
what Inductor generates (run_and_get_code + FileCheck), and that outputs match the
converted model run eagerly."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache, run_and_get_code
from torch.testing import FileCheck

import qatfx
from qatfx.lowering import LoweringConfig, inductor_options
from tests.models import TinyLM, tokens


def converted(model, example, group_size=32):
    prepared = qatfx.prepare_pt2e(model.eval(), qatfx.Int8DynActInt4WeightQuantizer(group_size), (example,))
    return qatfx.convert_pt2e(prepared).eval()


def compile_and_run(module, x, **compile_kwargs):
    counters.clear()
    # A fresh Inductor cache: a cached graph would skip the pass and leave the counters empty.
    with torch.no_grad(), fresh_cache():
        expected = module(x)
        out, code = run_and_get_code(torch.compile(module, **compile_kwargs), x)
    return expected, out, "\n".join(code)


def assert_matches_eager(out, expected, rtol=1e-3):
    # The CPU implementation of qatfx::w4a8_linear is the eager formula (dequantize, then
    # F.linear), so the only differences are Inductor's C++ code for the activation
    # quantization: a rounding tie resolved differently moves one int8 code of one token by
    # one step, i.e. one term of that token's K-term dot products by s_t * w (~1/K of the
    # output's RMS). 1e-3 relative RMS allows a few such flips and fails on any real error
    # (a wrong scale, zero point or epilogue moves the output by > 1e-1). Measured: ~2e-7.
    rel = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
    assert rel < rtol, f"compiled output differs from eager by {rel:.2e} relative RMS"


class Mlp2d(nn.Module):
    """2-D activations through every epilogue: bias, gelu, gelu(tanh), relu, residual, cast."""

    def __init__(self, dim=64):
        super().__init__()
        self.l1 = nn.Linear(dim, dim, bias=True)
        self.l2, self.l3, self.l4, self.l5 = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x):
        h = F.gelu(self.l1(x))
        h = F.gelu(self.l2(h), approximate="tanh")
        h = torch.relu(self.l3(h))
        y = self.l4(h) + x
        return self.l5(y).to(torch.bfloat16)


def test_llama_style_lm_every_linear_fused_with_its_epilogue():
    x = tokens(2, 8)
    expected, out, code = compile_and_run(converted(TinyLM(), x), x, backend="qatfx")
    # 2 blocks x (q, k, v, gate, up, down) + lm_head without bias; o_proj has a bias.
    # silu(gate) in each block; o_proj and down_proj each feed a residual add (x + linear).
    assert dict(counters["qatfx"]) == {
        "w4a8_linear": 13,
        "w4a8_linear_bias": 2,
        "epilogue_silu": 2,
        "epilogue_residual_first": 4,
        "decompose_quantize_dynamic": 9,
    }
    assert_matches_eager(out, expected)
    # The first RMSNorm (pow, mean, rsqrt) and the per-token quantization (amax, round)
    # are one generated kernel, and the linears are the fused op, nothing left unfused.
    FileCheck().check_regex(r"cpp_fused_\w*amax\w*mean\w*round\w*rsqrt\w* = ").run(code)
    FileCheck().check("torch.ops.qatfx.w4a8_linear.default(").check("'silu'").run(code)
    for leftover in (".quantize_dynamic.default(", ".dequantize.default(", ".dequantize_int4.default("):
        assert leftover not in code


def test_two_dimensional_linears_and_every_epilogue():
    x = torch.randn(12, 64)
    expected, out, code = compile_and_run(converted(Mlp2d(), x), x, backend="qatfx")
    assert dict(counters["qatfx"]) == {
        "w4a8_linear_2d": 4,
        "w4a8_linear_2d_bias": 1,
        "epilogue_gelu": 1,
        "epilogue_gelu_tanh": 1,
        "epilogue_relu": 1,
        "epilogue_residual": 1,
        "epilogue_cast": 1,
        "decompose_quantize_dynamic": 5,
    }
    assert out.dtype == torch.bfloat16
    assert_matches_eager(out, expected)
    FileCheck().check("'gelu'").check("'gelu_tanh'").check("'relu'").check("torch.bfloat16)").run(code)


def test_group_size_the_kernel_cannot_take_is_skipped_and_decomposed():
    # G=48 divides K=96 but is not a power of two: the fused op is refused with a reason,
    # and the opaque dequantize ops become aten math so Inductor still fuses them.
    model = nn.Sequential(nn.Linear(96, 32), nn.ReLU())
    x = torch.randn(5, 96)
    expected, out, code = compile_and_run(converted(model, x, group_size=48), x, backend="qatfx")
    assert counters["qatfx"]["w4a8_linear_2d_bias"] == 0
    assert counters["qatfx"]["skipped:w4a8_linear_2d_bias"] >= 1
    assert counters["qatfx"]["decompose_int4_packed"] == 1
    assert counters["qatfx"]["decompose_int_codes"] == 1
    assert "w4a8_linear" not in code
    assert_matches_eager(out, expected)


def test_ggml_rule_activations_are_left_to_their_own_op():
    # LlamaCppQuantizer: Q8_0 activations (groups of 32, scale_rule="ggml"). The kernel
    # needs per-token activations, so the linears are refused; the decomposition is the
    # torchao rule, so the ggml quantize_dynamic is not rewritten and runs its reference
    # math. Without biases or epilogues every other step is exact too (products of codes
    # and scales, the same mm), so the compiled output is the eager one bit for bit.
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 32, bias=False))
    x = torch.randn(5, 64)
    prepared = qatfx.prepare_pt2e(model.eval(), qatfx.quantizer.LlamaCppQuantizer(), (x,))
    expected, out, code = compile_and_run(qatfx.convert_pt2e(prepared).eval(), x, backend="qatfx")
    assert counters["qatfx"]["skipped:w4a8_linear_2d"] == 2
    assert counters["qatfx"]["decompose_quantize_dynamic"] == 0
    assert counters["qatfx"]["skipped:decompose_quantize_dynamic"] == 0  # not even matched
    assert counters["qatfx"]["decompose_int4_packed"] == 2
    assert "qatfx.quantize_dynamic" in code and "w4a8_linear" not in code
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    "config, fired, not_fired",
    [
        (LoweringConfig(fuse_epilogue=False), "w4a8_linear_2d_bias", "epilogue_gelu"),
        (LoweringConfig(fuse_linear=False, fuse_epilogue=False), "decompose_int4_packed", "w4a8_linear_2d_bias"),
    ],
)
def test_config_turns_stages_off(config, fired, not_fired):
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU())
    x = torch.randn(4, 64)
    expected, out, _ = compile_and_run(converted(model, x), x, options=inductor_options(config=config))
    assert counters["qatfx"][fired] >= 1 and counters["qatfx"][not_fired] == 0
    assert_matches_eager(out, expected)


def test_bfloat16_model():
    model = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64)).to(torch.bfloat16)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    expected, out, _ = compile_and_run(converted(model, x), x, backend="qatfx")
    assert counters["qatfx"]["w4a8_linear_2d_bias"] == 2 and counters["qatfx"]["epilogue_silu"] == 1
    assert out.dtype == torch.bfloat16
    # One bf16 ulp is 2^-8 = 3.9e-3 relative. Inductor evaluates the activation
    # quantization in fp32 registers (rounding where eager rounds, through the backend's
    # emulate_precision_casts), so outputs differ by about one ulp in places (measured
    # 3.2e-3 relative RMS); 1e-2 is 2.5 ulps and fails on any real error.
    rel = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
    assert rel < 1e-2, f"compiled bf16 output differs from eager by {rel:.2e} relative RMS"


def test_mixed_schemes_lower_each_layer_by_its_own_format():
    """executorch_llama: the 8da4w body takes the fused kernel, the 8da8w lm_head (int8
    per-channel codes, no kernel) is decomposed into aten math; tied, the embedding reads
    the lm_head's int8 table through the same decomposition."""
    x = tokens(2, 8)
    torch.manual_seed(0)
    prepared = qatfx.prepare_pt2e(TinyLM(tie=False).eval(), qatfx.presets.executorch_llama(), (x,))
    expected, out, code = compile_and_run(qatfx.convert_pt2e(prepared).eval(), x, backend="qatfx")
    fused = counters["qatfx"]["w4a8_linear"] + counters["qatfx"]["w4a8_linear_bias"]
    assert fused == 14  # 2 blocks x 7 linears; lm_head is not int4
    # qatfx::dequantize decomposed three times: the lm_head's and the embedding's int8 tables,
    # and the lm_head's activation (its int8 x int8 linear has no fused kernel)
    assert counters["qatfx"]["decompose_int_codes"] == 3
    # Plain Inductor gives the same difference as backend="qatfx" here: it is the decomposed
    # attention and norms, not the lowering. On an AVX2 CPU Inductor's reductions round
    # differently, flipped int8 activation codes in block 1 change block 2's and the 8da8w
    # head's per-token codes too, and positions 2-7 differ (measured 3.7e-3 relative RMS on
    # an AVX2 EPYC; 2e-7 on AVX-512). 2e-2 keeps 5x headroom; a wrong scale, zero point or
    # table layout moves the logits by > 1e-1.
    assert_matches_eager(out, expected, rtol=2e-2)
    for leftover in (".dequantize.default(", ".dequantize_int4.default("):
        assert leftover not in code
