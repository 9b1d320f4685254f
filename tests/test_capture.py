"""Export failures surface as qatfx.CaptureError with the exporter's reason, the model line
it points at, and a hint for the failure class (not a trace from inside a pass)."""

import pytest
import torch
import torch.nn as nn
from torch.export import Dim

import qatfx

Q = qatfx.Int8DynActInt4WeightQuantizer


def prepare(model, *inputs, **kw):
    return qatfx.prepare_pt2e(model, Q(32), inputs, **kw)


class DataDependentBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        if x.sum() > 0:  # branches on a tensor value
            return self.fc(x)
        return -self.fc(x)


class ItemSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(x)[:, : int(x.max().item())]


class Box:
    def __init__(self, t):
        self.t = t


class ReturnsObject(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return Box(self.fc(x))


class FixedLength(nn.Module):
    """A learned position table of length 8 pins the sequence dim to 8."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(8, 64))
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(x + self.pos)


X = torch.randn(2, 8, 64)


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_data_dependent_branch(strict):
    with pytest.raises(qatfx.CaptureError) as info:
        prepare(DataDependentBranch(), X, strict=strict)
    msg = str(info.value)
    assert msg.startswith("torch.export could not capture DataDependentBranch:")
    assert "data-dependent" in msg.lower() and "torch.cond" in msg
    assert "test_capture.py" in msg and "if x.sum() > 0" in msg  # the model line
    assert "TORCHDYNAMO_EXTENDED_DEBUG" not in msg  # the exporter's boilerplate is cut
    assert isinstance(info.value.__cause__, Exception)  # full message kept, chained


def test_item_sized_tensor():
    with pytest.raises(qatfx.CaptureError, match=r"(?s)data-dependent.*\.item\(\)"):
        prepare(ItemSlice(), X)


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_unsupported_output_type(strict):
    with pytest.raises(qatfx.CaptureError, match=r"(?s)(in|at) output.*forward returns [\w.]*Box,.*use_cache=False"):
        prepare(ReturnsObject(), X, strict=strict)


def _default_hf_llama():
    """An HF Llama with transformers' default config: use_cache=True."""
    import transformers
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )
    assert config.use_cache
    return transformers.LlamaForCausalLM(config).eval()


def test_whole_capture_of_a_default_hf_model_keeps_its_config():
    """A default HF config (use_cache=True) captures whole: the cache is off during the export
    only, and the prepared and converted modules carry the model's config and
    generation_config, which every export reads."""
    model = _default_hf_llama()
    ids = torch.randint(0, 128, (2, 8))
    prepared = prepare(model, ids)
    assert model.config.use_cache  # restored
    assert prepared.config is model.config and prepared.generation_config is model.generation_config
    converted = qatfx.convert_pt2e(prepared)
    assert converted.config.to_dict() == model.config.to_dict()
    assert converted.generation_config.to_dict() == model.generation_config.to_dict()
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, prepared(ids).logits)


def test_hf_model_asked_for_its_kv_cache():
    """An explicit use_cache=True still returns the cache object: the hint names the fix."""
    with pytest.raises(qatfx.CaptureError, match=r"(?s)DynamicCache.*use_cache=False.*\.logits"):
        prepare(_default_hf_llama(), torch.randint(0, 128, (2, 8)), example_kwargs={"use_cache": True})


def test_qatfx_export_is_reachable_after_import_qatfx_without_loading_a_runtime():
    import subprocess
    import sys
    code = (
        "import sys, qatfx\n"
        "loaded = [m for m in ('gguf', 'executorch', 'transformers', 'compressed_tensors') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "assert callable(qatfx.export.gguf) and callable(qatfx.export.hf) and callable(qatfx.export.executorch)\n"
        "assert 'gguf' not in sys.modules  # imported when gguf() runs\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "dynamic_shapes, dim",
    [({"x": {0: Dim("batch"), 1: Dim("seq")}}, "seq"), ({"x": {1: Dim.DYNAMIC}}, "x dim 1")],
    ids=["named_dim", "dim_dynamic"],
)
def test_constraint_violation_names_the_dim(dynamic_shapes, dim):
    with pytest.raises(qatfx.CaptureError) as info:
        prepare(FixedLength(), X, dynamic_shapes=dynamic_shapes)
    msg = str(info.value)
    assert "Constraints violated" in msg and "specialized it to be a constant (8)" in msg
    assert f"{dim} cannot take every size" in msg and "Dim.STATIC" in msg and "dynamic_shapes=" in msg


def test_default_dynamic_shapes_specialize_a_pinned_dim():
    """qatfx's default Dim.AUTO does not fail on a pinned dim: it specializes it, and a
    call with another size is refused by the exported guard."""
    prepared = prepare(FixedLength(), X)
    assert prepared(torch.randn(5, 8, 64)).shape == (5, 8, 64)  # batch stays dynamic
    with pytest.raises(AssertionError, match=r"Guard failed: x.size\(\)\[1\] == 8"):
        prepared(torch.randn(2, 9, 64))


def test_example_outside_dim_range():
    with pytest.raises(qatfx.CaptureError, match=r"(?s)not in range.*widen the Dim's range"):
        prepare(FixedLength(), X, dynamic_shapes={"x": {0: Dim("batch", min=5)}})


def test_wrong_number_of_example_inputs_shows_forward_signature():
    with pytest.raises(qatfx.CaptureError, match=r"(?s)TypeError.*must match FixedLength.forward\(x\)"):
        prepare(FixedLength(), X, X)


def test_unsupported_input_type():
    with pytest.raises(qatfx.CaptureError, match=r"(?s)Unsupported input type.*register_dataclass"):
        prepare(FixedLength(), Box(X))


def test_integer_input_into_float_linear():
    """torch.export accepts it (fake kernels skip the dtype check); eager would fail."""
    with pytest.raises(qatfx.CaptureError, match=r"(?s)Linear does not run: the model .*torch.int64 operand by a torch.float32"):
        qatfx.prepare_pt2e(nn.Linear(64, 64), Q(32), (torch.randint(0, 5, (2, 64)),))


class WithKeywordInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, x, residual=None):
        return self.proj(x) + (0 if residual is None else residual)


def test_keyword_and_view_inputs_keep_every_dim_dynamic():
    x, residual = torch.randn(2, 9, 64)[:, :-1], torch.randn(2, 8, 64)  # x is a view
    prepared = qatfx.prepare_pt2e(
        WithKeywordInput(), qatfx.Int8DynActInt4WeightQuantizer(32), (x,), example_kwargs={"residual": residual}
    )
    other = torch.randn(3, 5, 64)
    assert prepared(other, residual=other).shape == (3, 5, 64)
