"""Embedding quantization (`Quantizer(embedding_spec=...)`): prepare, QAT, convert, summary,
save/load and the ExecuTorch export of the toy Llama's embedding table, untied and tied to
lm_head."""

from __future__ import annotations

import json

import pytest
import torch

import qatfx
import qatfx.export
from qatfx.ops import fake_quantize
from qatfx.quantizer import Int8DynActInt4WeightQuantizer, Int4WeightOnlyQuantizer
from qatfx.spec import int4_per_group_embedding, int8_per_row_embedding
from tests.export.decisions import assert_same_logits_and_tokens
from tests.models import TinyLM, tokens

aten = torch.ops.aten
EMB_INT4 = int4_per_group_embedding(32, torch.bfloat16)  # the linears' grid: tying needs one


def _quantizer(embedding_spec=EMB_INT4):
    return Int8DynActInt4WeightQuantizer(32, scales_precision=torch.bfloat16, embedding_spec=embedding_spec)


def _trained(tie: bool, embedding_spec=EMB_INT4, steps: int = 2):
    """A prepared TinyLM after `steps` eager QAT steps (dropout on), then put in eval."""
    torch.manual_seed(0)
    prepared = qatfx.prepare_pt2e(TinyLM(tie=tie), _quantizer(embedding_spec), (tokens(),))
    prepared.train()
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    for step in range(steps):
        x = tokens(seed=10 + step)
        loss = torch.nn.functional.cross_entropy(prepared(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return prepared.eval()


def _fq_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fake_quantize]


def _embedding_node(gm):
    return next(n for n in gm.graph.nodes if n.target in (aten.embedding.default,))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def trained(request):
    tie = request.param
    prepared = _trained(tie)
    x = tokens(seed=3)
    expected = prepared(x)
    converted = qatfx.convert_pt2e(prepared)
    return tie, prepared, converted, x, expected


def test_qat_trains_the_table_and_converted_equals_prepared(trained):
    tie, prepared, converted, x, expected = trained
    # convert dequantizes the packed codes with the same reference math fake_quantize used
    assert torch.equal(converted(x), expected)
    # the fake-quant is in the training graph: gradients reached the table (it moved)
    torch.manual_seed(0)
    initial = TinyLM(tie=tie).embed.weight
    table = prepared.lm_head.weight if tie else prepared.embed.weight
    assert not torch.equal(table, initial)


def test_prepared_graph_fake_quantizes_the_table_once(trained):
    tie, prepared, *_ = trained
    emb = _embedding_node(prepared)
    fq = emb.args[0]
    assert fq.target is fake_quantize and fq.kwargs["group_size"] == 32 and fq.kwargs["qmin"] == -8
    table_fqs = [n for n in _fq_nodes(prepared) if n.args[0].op == "get_attr" and n.args[0] is fq.args[0]]
    assert table_fqs == [fq]
    linear_users = [u for u in fq.users if u.target is aten.linear.default]
    assert len(linear_users) == (1 if tie else 0)  # tied: lm_head reads the same fake-quant


def test_converted_stores_the_table_once(trained):
    tie, _, converted, *_ = trained
    state = converted.state_dict()
    tables = sorted(k for k in state if k.startswith(("embed.", "lm_head.")))
    if tie:
        # one set of packed buffers, read by both; no float copy under either name
        assert tables == ["lm_head.weight_group_sums", "lm_head.weight_packed", "lm_head.weight_scales"]
        dq = _embedding_node(converted).args[0]
        assert {u.target for u in dq.users} == {aten.embedding.default, aten.linear.default}
    else:
        assert tables == [
            "embed.weight_group_sums", "embed.weight_packed", "embed.weight_scales",
            "lm_head.weight_group_sums", "lm_head.weight_packed", "lm_head.weight_scales",
        ]
    assert state[tables[1]].shape == (96, 32) and state[tables[1]].dtype == torch.uint8  # (V, D / 2)


def test_summary_lists_the_embedding(trained):
    tie, prepared, converted, *_ = trained
    for module in (prepared, converted):
        (row,) = [r for r in qatfx.summary(module).layers if r.op == "embedding"]
        assert row.layer == "embed" and row.quantized and row.shape == (96, 64)
        assert row.weight_spec == EMB_INT4 and row.weight_format.name == "int4_packed"
        if tie:  # stored once, counted at lm_head
            assert row.tied_to == "lm_head" and (row.float_bytes, row.quantized_bytes) == (0, 0)
            assert "tied to lm_head" in str(qatfx.summary(module))
        else:
            # 96 x 64 fp32 -> 96 x 32 nibble bytes + 96 x 2 bf16 scales + 96 x 2 int16 group sums
            assert (row.float_bytes, row.quantized_bytes) == (96 * 64 * 4, 96 * 32 + 96 * 2 * 2 + 96 * 2 * 2)


def test_save_load_round_trip(trained, tmp_path):
    tie, _, converted, x, expected = trained
    qatfx.save(converted, tmp_path)
    loaded = qatfx.load(tmp_path)
    assert torch.equal(loaded(x), expected)
    assert [r for r in qatfx.summary(loaded).layers] == [r for r in qatfx.summary(converted).layers]
    manifest = json.loads((tmp_path / "qatfx_manifest.json").read_text())
    assert manifest["scheme"] == "8da4w"  # the linears' scheme; the embedding carries its own spec
    (entry,) = [layer for layer in manifest["layers"] if layer["op"] == "embedding"]
    owner = "lm_head" if tie else "embed"
    assert entry["tensors"]["packed"] == f"{owner}.weight_packed"


def test_int8_per_row_embedding():
    prepared = _trained(tie=False, embedding_spec=int8_per_row_embedding(), steps=1)
    x = tokens(seed=4)
    expected = prepared(x)
    converted = qatfx.convert_pt2e(prepared)
    assert torch.equal(converted(x), expected)
    (row,) = [r for r in qatfx.summary(converted).layers if r.op == "embedding"]
    assert row.weight_format.name == "int_codes" and row.quantized_bytes == 96 * 64 + 96 * 4
    assert converted.state_dict()["embed.weight_packed"].dtype == torch.int8


def test_off_by_default():
    prepared = qatfx.prepare_pt2e(TinyLM(tie=False), Int4WeightOnlyQuantizer(32), (tokens(),))
    assert all(r.op != "embedding" for r in qatfx.summary(prepared).layers)
    assert _embedding_node(prepared).args[0].op == "get_attr"  # reads the float table


def test_indivisible_dim_is_skipped_with_reason():
    quantizer = _quantizer(int4_per_group_embedding(128, torch.bfloat16))  # D = 64
    prepared = qatfx.prepare_pt2e(TinyLM(tie=False), quantizer, (tokens(),))
    (row,) = [r for r in qatfx.summary(prepared).layers if r.op == "embedding"]
    assert not row.quantized and "embedding dim 64 is not divisible by group size 128" in row.skip_reason
    assert _embedding_node(prepared).args[0].op == "get_attr"


def test_tied_table_with_a_different_spec_is_refused():
    with pytest.raises(ValueError, match=r"embed is tied to linear lm_head.*bits=8.*bits=4"):
        qatfx.prepare_pt2e(TinyLM(tie=True), _quantizer(int8_per_row_embedding()), (tokens(),))


def test_tied_table_with_lm_head_skipped_quantizes_the_embedding_alone():
    quantizer = Int8DynActInt4WeightQuantizer(32, scales_precision=torch.bfloat16, skip=["lm_head"], embedding_spec=EMB_INT4)
    prepared = qatfx.prepare_pt2e(TinyLM(tie=True), quantizer, (tokens(),))
    assert _embedding_node(prepared).args[0].target is fake_quantize
    (row,) = [r for r in qatfx.summary(prepared).layers if r.op == "embedding"]
    assert row.quantized and row.tied_to is None  # lm_head reads the float table: stored twice


def test_executorch_op_reproduces_the_converted_lookup(trained):
    """The rewrite's table, run by ExecuTorch's reference kernel, gives the converted
    lookup exactly: same codes, scales bf16 -> fp32 (exact), product rounded once."""
    pytest.importorskip("executorch")
    from qatfx.export.xnnpack_patterns import rewrite_for_xnnpack
    from qatfx.module import copy_sharing_tensors

    tie, _, converted, x, _ = trained
    owner = "lm_head" if tie else "embed"
    dq = _embedding_node(converted).args[0]
    parts = [getattr(converted, owner).get_buffer(f"weight_{p}") for p in ("packed", "scales", "group_sums")]
    expected = torch.nn.functional.embedding(x, dq.target(*parts, 32, torch.float32))
    copy = copy_sharing_tensors(converted)
    report = rewrite_for_xnnpack(copy)
    assert report.embeddings == ["lm_head.weight" if tie else "embed.weight"]
    (node,) = [n for n in copy.graph.nodes if "embedding_4bit" in str(n.target)]
    table, scales = (getattr(copy, owner).get_buffer(a.target.rpartition(".")[2]) for a in node.args[:2])
    out = node.target(table, scales, None, -8, 7, x, dtype=torch.float32)
    assert torch.equal(out, expected)
    # tied: the linear keeps XNNPACK's int8 codes beside the 4-bit table (two layouts)
    assert len(report.weights) == 15


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def exported(request, tmp_path_factory):
    pytest.importorskip("executorch")
    prepared = _trained(request.param)
    converted = qatfx.convert_pt2e(prepared)
    path = tmp_path_factory.mktemp("pte") / "model.pte"
    return converted, qatfx.export.executorch(converted, path)


@pytest.mark.long
def test_pte_runs_the_quantized_embedding(exported):
    from executorch.runtime import Runtime

    from qatfx.export.xnnpack_patterns import load_quantized_kernels

    converted, report = exported
    assert report.delegated == report.quantized_layers == 15
    load_quantized_kernels()  # the Python runtime does not link embedding_4bit otherwise
    method = Runtime.get().load_program(str(report.path)).load_method("forward")
    x = tokens(seed=5)
    out = method.execute([x])[0]
    with torch.no_grad():
        ref = converted(x)
    # the embedding op dequantizes the same codes and bf16-exact scales (exact, tested above);
    # the linears differ only as tests/export/decisions.py bounds
    assert_same_logits_and_tokens(out, ref)
