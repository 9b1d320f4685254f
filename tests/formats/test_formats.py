"""Weight formats: the registry picks one format per spec; convert stores exactly the parts
the format names; the summary's bytes are the bytes the converted model holds; every format
dequantizes to what training saw, eagerly and through the lowering's decomposition."""

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import qatfx
from qatfx.formats import FORMATS, format_for, format_named
from qatfx.graph.meta import FORMAT_META_KEY, ROLE_META_KEY, WEIGHT
from qatfx.spec import PerChannel, PerGroup, QuantSpec, int4_per_group_weight, int8_per_token_activation
from tests.lowering.test_graph_pass import assert_matches_eager, compile_and_run

ACT = int8_per_token_activation()

SPECS = {
    "int4 g32": int4_per_group_weight(32),
    "int4 g256": int4_per_group_weight(256),
    "int4 per-channel": QuantSpec(4, PerChannel(), symmetric=True),
    "int4 asymmetric g32": QuantSpec(4, PerGroup(32), symmetric=False, signed=False),
    "int4 asymmetric signed g64": QuantSpec(4, PerGroup(64), symmetric=False),
    "int4 g32 fp16 scales": int4_per_group_weight(32, scale_dtype=torch.float16),
    "int8 per-channel": QuantSpec(8, PerChannel(), symmetric=True),
    "int3 per-channel": QuantSpec(3, PerChannel(), symmetric=True),
    "int3 asymmetric g32": QuantSpec(3, PerGroup(32), symmetric=False),
}
EXPECTED_FORMAT = {
    "int4 g32": "int4_packed", "int4 g256": "int4_packed", "int4 per-channel": "int4_packed",
    "int4 g32 fp16 scales": "int4_packed",
    "int4 asymmetric g32": "int4_zp_packed", "int4 asymmetric signed g64": "int4_zp_packed",
    "int8 per-channel": "int_codes", "int3 per-channel": "int_codes", "int3 asymmetric g32": "int_codes",
}


class LinearsOnly(nn.Module):
    """Every tensor of the converted model is a quantized weight's part, or the float
    weight of a layer the spec cannot take (K = 96 has no group of 256)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(256, 96, bias=False)
        self.down = nn.Linear(96, 256, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def converted_pair(spec):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 256)
    prepared = qatfx.prepare_pt2e(LinearsOnly(), qatfx.Quantizer(ACT, spec), (x,)).eval()
    return prepared, qatfx.convert_pt2e(prepared), x


@pytest.mark.parametrize("name", SPECS)
def test_registry_picks_one_format_per_spec(name):
    fmt = format_for(SPECS[name])
    assert fmt.name == EXPECTED_FORMAT[name]
    assert format_named(fmt.name) is fmt


def test_unknown_format_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown qatfx weight format 'nf4'.*int4_packed"):
        format_named("nf4")


@pytest.mark.parametrize("name", SPECS)
def test_summary_bytes_are_the_converted_models_bytes(name):
    prepared, converted, x = converted_pair(SPECS[name])
    summary = qatfx.summary(converted)
    stored = sum(t.nbytes for t in converted.state_dict().values())
    assert summary.quantized_bytes == stored
    assert qatfx.summary(prepared).quantized_bytes == stored  # known before convert runs
    with torch.no_grad():
        assert torch.equal(converted(x), prepared(x))  # the same reference math op for op


@pytest.mark.parametrize("name", SPECS)
def test_convert_stores_the_formats_parts_and_names_the_format(name):
    spec = SPECS[name]
    _, converted, _ = converted_pair(spec)
    fmt = format_for(spec)
    weights = [n for n in converted.graph.nodes if n.meta.get(ROLE_META_KEY) == WEIGHT]
    assert weights and all(n.target is fmt.dequantize_op and n.meta[FORMAT_META_KEY] == fmt.name for n in weights)
    buffers = {name for name, _ in converted.named_buffers()}
    stored_parts = {b.rsplit("weight_", 1)[1] for b in buffers}
    optional = set() if spec.symmetric else {"zeros"}
    assert stored_parts <= set(fmt.parts) and (set(fmt.parts) - {"zeros"}) | optional <= stored_parts


@pytest.mark.parametrize("spec", [SPECS["int4 asymmetric g32"], SPECS["int4 asymmetric signed g64"]], ids=["uint4", "int4"])
def test_asymmetric_int4_is_packed_two_per_byte_and_keeps_the_trained_grid(spec):
    prepared, converted, x = converted_pair(spec)
    packed = converted.up.weight_packed
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (96, 128)
    # The stored nibbles and zero points are the spec's codes and zero points shifted by
    # -qmin. Exact on any CPU: (u - z') and (q - z) are the same small integer, computed
    # exactly in fp32, then the same multiply by the same scale.
    fmt = format_for(spec)
    parts = [converted.up.weight_packed, converted.up.weight_scales, converted.up.weight_zeros]
    fake_quantized = torch.ops.qatfx.fake_quantize(prepared.up.weight, **spec.op_kwargs())
    assert torch.equal(fmt.dequantize(parts, spec.group_size, torch.float32), fake_quantized)


@pytest.mark.parametrize("name", ["int4 asymmetric g32", "int3 per-channel", "int4 g32 fp16 scales"])
def test_lowering_decomposes_each_formats_dequantize(name):
    """CPU: the fused kernel takes only int4_packed with fp32 scales; every other format is
    decomposed by its own rule into aten math Inductor compiles."""
    spec = SPECS[name]
    _, converted, x = converted_pair(spec)
    eager, compiled, _ = compile_and_run(converted, x, backend="qatfx")
    assert counters["qatfx"][f"decompose_{format_for(spec).name}"] >= 1
    # Not op for op (Inductor's generated code): the bound derived for compiled vs eager.
    assert_matches_eager(compiled, eager)


def test_every_format_traces_its_decomposition_pattern():
    """The pattern and the replacement take the same tensors, named after the parts."""
    import inspect

    for fmt in FORMATS:
        pattern = list(inspect.signature(fmt.decompose_pattern).parameters)
        math = list(inspect.signature(fmt.decompose_math).parameters)
        assert len(pattern) == len(fmt.parts) and math[: len(pattern)] == pattern
        out = fmt.decompose_pattern(*fmt.example_parts())
        assert out.shape[-1] == 64 and out.dtype == torch.float32


def test_the_format_says_which_shapes_it_cannot_store():
    """Two codes per byte need an even K; one code per byte takes any K. The quantizer skips
    the layer with the format's reason instead of failing in convert."""
    model = nn.Sequential(nn.Linear(63, 64, bias=False), nn.ReLU(), nn.Linear(64, 64, bias=False))
    x = torch.randn(3, 63)
    int4 = qatfx.summary(qatfx.prepare_pt2e(model, qatfx.Quantizer(ACT, SPECS["int4 per-channel"]), (x,)))
    assert [r.layer for r in int4.skipped] == ["0"]
    assert "in_features 63 is odd; the int4_packed format stores two int4 codes per byte" in int4.skipped[0].skip_reason
    int8 = qatfx.summary(qatfx.prepare_pt2e(model, qatfx.Quantizer(ACT, SPECS["int8 per-channel"]), (x,)))
    assert not int8.skipped
