import expecttest
import torch

import qatfx
from qatfx.ops import fake_quantize
from tests.models import Block
from tests.passes.graph_text import qatfx_graph_text


def prepared_block(**kw):
    torch.manual_seed(0)
    return qatfx.prepare_pt2e(Block(dim=64, hidden=64).eval(), qatfx.Int8DynActInt4WeightQuantizer(32, **kw), (torch.randn(2, 8, 64),))


class TestInsertFakeQuant(expecttest.TestCase):
    def test_golden_prepared_block(self):
        self.assertExpectedInline(qatfx_graph_text(prepared_block()), """\
fq_q_proj_weight = qatfx::fake_quantize(q_proj_weight, qmin=-8, qmax=7, group_size=32, symmetric=True, eps=None, scale_dtype=float32)
fq_k_proj_weight = qatfx::fake_quantize(k_proj_weight, qmin=-8, qmax=7, group_size=32, symmetric=True, eps=None, scale_dtype=float32)
fq_v_proj_weight = qatfx::fake_quantize(v_proj_weight, qmin=-8, qmax=7, group_size=32, symmetric=True, eps=None, scale_dtype=float32)
fq_o_proj_weight = qatfx::fake_quantize(o_proj_weight, qmin=-8, qmax=7, group_size=32, symmetric=True, eps=None, scale_dtype=float32)
fq_gate_proj_weight = qatfx::fake_quantize(gate_proj_weight, qmin=-8, qmax=7, group_size=32, symmetric=True, eps=None, scale_dtype=float32)
fq_up_proj_weight = qatfx::fake_quantize(up_proj_weight, qmin=-8, qmax=7, group_size=32, symmetric=True, eps=None, scale_dtype=float32)
fq_down_proj_weight = qatfx::fake_quantize(down_proj_weight, qmin=-8, qmax=7, group_size=32, symmetric=True, eps=None, scale_dtype=float32)
fq_mul_1 = qatfx::fake_quantize(mul_1, qmin=-128, qmax=127, group_size=-1, symmetric=False, eps=1.19209e-07, scale_dtype=float32)
linear = linear(fq_mul_1, fq_q_proj_weight)
linear_1 = linear(fq_mul_1, fq_k_proj_weight)
linear_2 = linear(fq_mul_1, fq_v_proj_weight)
fq_reshape = qatfx::fake_quantize(reshape, qmin=-128, qmax=127, group_size=-1, symmetric=False, eps=1.19209e-07, scale_dtype=float32)
linear_3 = linear(fq_reshape, fq_o_proj_weight, o_proj_bias)
fq_mul_3 = qatfx::fake_quantize(mul_3, qmin=-128, qmax=127, group_size=-1, symmetric=False, eps=1.19209e-07, scale_dtype=float32)
linear_4 = linear(fq_mul_3, fq_gate_proj_weight)
linear_5 = linear(fq_mul_3, fq_up_proj_weight)
fq_mul_4 = qatfx::fake_quantize(mul_4, qmin=-128, qmax=127, group_size=-1, symmetric=False, eps=1.19209e-07, scale_dtype=float32)
linear_6 = linear(fq_mul_4, fq_down_proj_weight)""")

    def test_node_counts(self):
        nodes = [n for n in prepared_block().graph.nodes if n.target is fake_quantize]
        weights = [n for n in nodes if n.kwargs["symmetric"]]
        activations = [n for n in nodes if not n.kwargs["symmetric"]]
        # 7 linears -> 7 weight fake-quants; q/k/v share one input, gate/up share one: 4
        self.assertEqual((len(weights), len(activations)), (7, 4))
        self.assertTrue(all(n.meta["qatfx_pass"] == "insert_fake_quant" for n in nodes))

    def test_gpt2_style_k_by_n_weight_is_grouped_along_k(self):
        class Conv1D(torch.nn.Module):  # GPT-2's layout: weight (K, N), y = addmm(b, x, W)
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.randn(64, 16))
                self.bias = torch.nn.Parameter(torch.zeros(16))

            def forward(self, x):
                return torch.addmm(self.bias, x.view(-1, 64), self.weight)

        m = Conv1D()
        prepared = qatfx.prepare_pt2e(m, qatfx.Int8DynActInt4WeightQuantizer(32), (torch.randn(4, 64),))
        x = torch.randn(5, 64)
        spec = qatfx.spec.int4_per_group_weight(32)
        w_fq = fake_quantize(m.weight.t(), **spec.op_kwargs()).t()
        a_fq = fake_quantize(x, **qatfx.spec.int8_per_token_activation().op_kwargs())
        # The fake-quantized operands are bit-identical (elementwise ops and amax), but the
        # graph's addmm gets the weight in another memory layout (clone -> fake_quantize -> t)
        # than this reference, and the GEMM may sum in another order for it (it does with AVX2
        # MKL). Each result is a length-K fp32 dot product plus the bias: |fl - exact| <=
        # (K + 1) u sum_i |a_i w_i| + u |b| (Higham 3.5, u = 2^-24), so two orders differ by at
        # most twice that. A wrong grouping moves outputs by a quantization step (~1e-1), far above.
        u, k = 2.0**-24, a_fq.shape[-1]
        bound = 2 * (k + 1) * u * (a_fq.double().abs() @ w_fq.double().abs() + m.bias.double().abs())
        diff = (prepared(x).double() - torch.addmm(m.bias, a_fq, w_fq).double()).abs()
        self.assertTrue(bool((diff <= bound).all()), f"max diff {diff.max():.3g}, bound {bound.min():.3g}..{bound.max():.3g}")
        converted = qatfx.convert_pt2e(prepared)
        torch.testing.assert_close(converted(x), prepared(x), atol=0, rtol=0)
        self.assertEqual(tuple(converted.weight_packed.shape), (16, 32))  # (N, K/2)
