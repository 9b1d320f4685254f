import expecttest
import torch

import qatfx
from qatfx.formats import format_named
from qatfx.ops import dequantize, quantize_dynamic
from tests.passes.graph_text import qatfx_graph_text
from tests.passes.test_insert_fake_quant import prepared_block

dequantize_int4 = format_named("int4_packed").dequantize_op


class TestConvert(expecttest.TestCase):
    def test_golden_converted_block(self):
        self.assertExpectedInline(qatfx_graph_text(qatfx.convert_pt2e(prepared_block())), """\
dq_q_proj_weight = qatfx::dequantize_int4(q_proj_weight_packed, q_proj_weight_scales, q_proj_weight_group_sums, 32, float32)
dq_k_proj_weight = qatfx::dequantize_int4(k_proj_weight_packed, k_proj_weight_scales, k_proj_weight_group_sums, 32, float32)
dq_v_proj_weight = qatfx::dequantize_int4(v_proj_weight_packed, v_proj_weight_scales, v_proj_weight_group_sums, 32, float32)
dq_o_proj_weight = qatfx::dequantize_int4(o_proj_weight_packed, o_proj_weight_scales, o_proj_weight_group_sums, 32, float32)
dq_gate_proj_weight = qatfx::dequantize_int4(gate_proj_weight_packed, gate_proj_weight_scales, gate_proj_weight_group_sums, 32, float32)
dq_up_proj_weight = qatfx::dequantize_int4(up_proj_weight_packed, up_proj_weight_scales, up_proj_weight_group_sums, 32, float32)
dq_down_proj_weight = qatfx::dequantize_int4(down_proj_weight_packed, down_proj_weight_scales, down_proj_weight_group_sums, 32, float32)
quant_mul_1 = qatfx::quantize_dynamic(mul_1, -128, 127, -1, False, 1.19209e-07, float32)
q_mul_1 = getitem(quant_mul_1, 0)
scale_mul_1 = getitem(quant_mul_1, 1)
zero_mul_1 = getitem(quant_mul_1, 2)
dq_mul_1 = qatfx::dequantize(q_mul_1, scale_mul_1, zero_mul_1, -1, float32)
linear = linear(dq_mul_1, dq_q_proj_weight)
linear_1 = linear(dq_mul_1, dq_k_proj_weight)
linear_2 = linear(dq_mul_1, dq_v_proj_weight)
quant_reshape = qatfx::quantize_dynamic(reshape, -128, 127, -1, False, 1.19209e-07, float32)
q_reshape = getitem(quant_reshape, 0)
scale_reshape = getitem(quant_reshape, 1)
zero_reshape = getitem(quant_reshape, 2)
dq_reshape = qatfx::dequantize(q_reshape, scale_reshape, zero_reshape, -1, float32)
linear_3 = linear(dq_reshape, dq_o_proj_weight, o_proj_bias)
quant_mul_3 = qatfx::quantize_dynamic(mul_3, -128, 127, -1, False, 1.19209e-07, float32)
q_mul_3 = getitem(quant_mul_3, 0)
scale_mul_3 = getitem(quant_mul_3, 1)
zero_mul_3 = getitem(quant_mul_3, 2)
dq_mul_3 = qatfx::dequantize(q_mul_3, scale_mul_3, zero_mul_3, -1, float32)
linear_4 = linear(dq_mul_3, dq_gate_proj_weight)
linear_5 = linear(dq_mul_3, dq_up_proj_weight)
quant_mul_4 = qatfx::quantize_dynamic(mul_4, -128, 127, -1, False, 1.19209e-07, float32)
q_mul_4 = getitem(quant_mul_4, 0)
scale_mul_4 = getitem(quant_mul_4, 1)
zero_mul_4 = getitem(quant_mul_4, 2)
dq_mul_4 = qatfx::dequantize(q_mul_4, scale_mul_4, zero_mul_4, -1, float32)
linear_6 = linear(dq_mul_4, dq_down_proj_weight)""")

    def test_node_counts_and_buffers(self):
        converted = qatfx.convert_pt2e(prepared_block())
        count = lambda op: sum(n.target is op for n in converted.graph.nodes)  # noqa: E731
        self.assertEqual((count(dequantize_int4), count(quantize_dynamic), count(dequantize)), (7, 4, 4))
        q = converted.get_submodule("q_proj")
        self.assertFalse(hasattr(q, "weight"))  # the float weight is gone
        self.assertEqual((q.weight_packed.dtype, tuple(q.weight_packed.shape)), (torch.uint8, (64, 32)))
        self.assertEqual((q.weight_scales.dtype, tuple(q.weight_scales.shape)), (torch.float32, (64, 2)))
        self.assertEqual((q.weight_group_sums.dtype, tuple(q.weight_group_sums.shape)), (torch.int16, (64, 2)))
        unpacked = qatfx.reference.unpack_int4(q.weight_packed, 32).reshape(64, 2, 32)
        self.assertTrue(torch.equal(q.weight_group_sums, unpacked.sum(-1, dtype=torch.int16)))

    def test_prepared_is_left_unchanged(self):
        prepared = prepared_block()
        before = prepared.code
        qatfx.convert_pt2e(prepared)
        self.assertEqual(prepared.code, before)
        self.assertEqual(prepared.qatfx_stage, "prepared")
