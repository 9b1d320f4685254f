"""qatfx.export.executorch: a converted model -> an XNNPACK `.pte` that runs in ExecuTorch's
runtime, with every quantized linear (8da4w, 8da8w) delegated and convert's weight grid."""

from __future__ import annotations

import builtins

import pytest
import torch

import qatfx
import qatfx.export
from qatfx import reference
from qatfx.export.executorch import rewritten_copy
from qatfx.graph.linear_sites import get_attr_value
from qatfx.graph.regions import graph_regions
from tests.export.decisions import assert_same_logits_and_tokens
from tests.export.training import qat_steps
from qatfx.recipes.model import CausalLM, LMConfig
from tests.model_zoo import DEPLOY_FAMILIES, _hf, deploy_family
from tests.models import TinyLM, tokens

runtime = pytest.importorskip("executorch.runtime", reason="the executorch extra: pip install -e '.[executorch]'")

GROUP = 32


def run_pte(path, *args) -> torch.Tensor:
    method = runtime.Runtime.get().load_program(str(path)).load_method("forward")
    return method.execute(list(args))[0]


@pytest.fixture(scope="module")
def tied_toy(tmp_path_factory):
    """A tied-embedding Llama-style model, trained a few QAT steps with 8da4w in XNNPACK's
    scale dtype (bfloat16), converted and exported (eager steps: a compile here cost a minute
    and the export reads only the trained grid; compiled QAT: tests/test_compile.py)."""
    torch.manual_seed(0)
    prepared = qatfx.prepare_pt2e(
        TinyLM(tie=True).train(), qatfx.Int8DynActInt4WeightQuantizer(GROUP, scales_precision=torch.bfloat16), (tokens(),)
    )
    qat_steps(prepared, 96, steps=3)
    converted = qatfx.convert_pt2e(prepared.eval())
    report = qatfx.export.executorch(converted, tmp_path_factory.mktemp("pte") / "toy.pte")
    return converted, report


def test_every_int4_linear_is_delegated(tied_toy):
    converted, report = tied_toy
    assert report.quantized_layers == len(qatfx.summary(converted).quantized) == 15
    assert report.delegated == 15 and report.not_delegated == {} and report.float_layers == []
    assert report.path.stat().st_size == report.bytes


def test_the_pte_carries_converts_grid(tied_toy):
    """The codes handed to the lowering are convert's packed codes unpacked (not requantized),
    and the scales are bfloat16 values, which XNNPACK stores without rounding."""
    converted, _ = tied_toy
    rewritten, weights, _ = rewritten_copy(converted)
    assert len(weights) == 15
    for weight in weights:
        packed = get_attr_value(converted, weight + "_packed")
        codes = get_attr_value(rewritten, weight + "_codes")
        assert torch.equal(codes, reference.unpack_int4(packed, GROUP))
        assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7
        scales = get_attr_value(rewritten, weight + "_scales_fp32")
        assert torch.equal(scales, get_attr_value(converted, weight + "_scales").float())
        assert torch.equal(scales.to(torch.bfloat16).float(), scales)


def test_runtime_matches_the_converted_model(tied_toy):
    converted, report = tied_toy
    ids = tokens(2, 8, 96, 7)  # the exported program takes the capture shape
    with torch.no_grad():
        expected = converted(ids)
    got = run_pte(report.path, ids)
    assert_same_logits_and_tokens(got, expected)  # tests/export/decisions.py: bound and why


def int4_weight(region, weight_name) -> torch.Tensor:
    return reference.dequantize(
        reference.unpack_int4(get_attr_value(region, weight_name + "_packed"), GROUP),
        get_attr_value(region, weight_name + "_scales"), None, GROUP, torch.float32,
    )


def within_one_activation_code(got, expected, x, weight) -> bool:
    """The runtime's activation codes may differ from ours by at most one step (its own
    scale/zero-point rounding), so per output |dy[t, n]| <= s_x[t] * sum_k |W[n, k]| (W
    dequantized: identical in both) + fp32 accumulation slack (K * eps * sum_k |x W|)."""
    scale, _ = reference.choose_qparams(x, -128, 127, -1, False, torch.finfo(torch.float32).eps, None)
    one_code = scale * weight.abs().sum(-1)  # (tokens, 1) * (N,)
    slack = x.shape[-1] * torch.finfo(torch.float32).eps * (x.abs() @ weight.abs().T)
    return bool(((got - expected).abs() <= one_code + slack).all())


def test_single_linear_error_is_within_one_activation_code(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64))
    x = torch.randn(4, 16, 128)
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(GROUP, scales_precision=torch.bfloat16)
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, quantizer, (x,)).eval())
    report = qatfx.export.executorch(converted, tmp_path / "linear.pte")
    assert report.delegated == 1
    with torch.no_grad():
        expected = converted(x)
    ((_, region),) = graph_regions(converted)
    assert within_one_activation_code(run_pte(report.path, x), expected, x, int4_weight(region, "0.weight"))


class EmbedThenLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(96, 64)
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, ids):
        h = self.embed(ids)
        return h, self.proj(h)


def test_a_quantized_embeddings_grid_values_meet_rounding_ties(tmp_path):
    """Why logits after an int4 embedding differ more than after a float one: the lookup is
    exact, but its rows take 16 values per group, so the next linear's activation
    quantization often meets an exact .5 tie (continuous inputs essentially never do): x / s_x
    itself, or the zero point of a token whose range is symmetric (max == -min; XNNPACK and
    quantized_decomposed pick a "nudged" zero point in float32 where training computes
    qmin - round(min / s)). The runtime breaks such ties its own way; the linear's error stays
    within one activation code."""
    from qatfx.spec import int4_per_group_embedding

    torch.manual_seed(0)
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(
        GROUP, scales_precision=torch.bfloat16, embedding_spec=int4_per_group_embedding(GROUP, torch.bfloat16)
    )
    ids = tokens(2, 8, 96, 0)
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(EmbedThenLinear(), quantizer, (ids,)).eval())
    report = qatfx.export.executorch(converted, tmp_path / "embed.pte")
    with torch.no_grad():
        rows, expected = converted(ids)
    got_rows, got = runtime.Runtime.get().load_program(str(report.path)).load_method("forward").execute([ids])
    assert torch.equal(got_rows, rows)
    scale, _ = reference.choose_qparams(rows, -128, 127, -1, False, torch.finfo(torch.float32).eps, None)
    scaled = rows * (1.0 / scale)
    ties = int((scaled - scaled.floor() == 0.5).sum())
    assert ties > 0  # 27 of 1024 values here: IEEE float32 arithmetic, the same on every CPU
    ((_, region),) = graph_regions(converted)
    assert within_one_activation_code(got, expected, rows, int4_weight(region, "proj.weight"))


def test_hf_llama_forward_exports_with_all_linears_delegated(tmp_path):
    """With transformers' default config (use_cache=True): the program is exported with the
    cache off, as the converted model is verified."""
    model, vocab = _hf("LlamaConfig", "LlamaForCausalLM", use_cache=True)()
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(GROUP, scales_precision=torch.bfloat16)
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, quantizer, (tokens(2, 8, vocab, 0),), regions="auto").eval())
    report = qatfx.export.executorch(converted, tmp_path / "llama.pte")
    assert report.delegated == report.quantized_layers == 15
    ids = tokens(2, 8, vocab, 3)
    with torch.no_grad():
        expected = converted(ids).logits
    assert_same_logits_and_tokens(run_pte(report.path, ids), expected)


def test_float32_trained_scales_are_reported(tied_toy):
    """XNNPACK stores per-group scales in bfloat16: a model trained with float32 scales is
    told its grid will be rounded, and how to train on the runtime's grid."""
    from qatfx.export.executorch import _differences

    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(TinyLM(), qatfx.Int8DynActInt4WeightQuantizer(GROUP), (tokens(),)).eval())
    assert any("bfloat16" in d and "scales_precision=torch.bfloat16" in d for d in _differences(converted))
    assert not any("bfloat16" in d for d in _differences(tied_toy[0]))  # trained in bf16: nothing to say


def pte_operators(path) -> set:
    """The operators the program's top-level plan calls (outside its delegates)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    (plan,) = deserialize_pte_binary(path.read_bytes()).program.execution_plan
    return {f"{op.name}.{op.overload}" for op in plan.operators}


@pytest.fixture(
    scope="module",
    params=["tied", pytest.param("untied", marks=pytest.mark.long)],  # long: a second export of the same recipe (11-19 s on 2 cores); the default run keeps one .pte
)
def executorch_preset(request, tmp_path_factory):
    """ExecuTorch's Llama recipe (qatfx.presets.executorch_llama: 8da4w g32 bf16-scale body,
    8da8w lm_head with float32 per-channel scales, int8 per-row embeddings; tied: the
    lm_head shares the embedding's int8 grid) on a one-block CausalLM, two eager QAT steps,
    converted and exported with the export's own verification."""
    torch.manual_seed(0)
    config = LMConfig(vocab_size=96, dim=64, layers=1, heads=4, hidden=128, tie_embeddings=request.param == "tied")
    prepared = qatfx.prepare_pt2e(CausalLM(config).train(), qatfx.presets.executorch_llama(), (tokens(),))
    qat_steps(prepared, 96, steps=2)
    converted = qatfx.convert_pt2e(prepared.eval())
    report = qatfx.export.executorch(converted, tmp_path_factory.mktemp("pte") / "preset.pte")
    return converted, report, config.tie_embeddings


def test_executorch_preset_delegates_every_linear_and_uses_embedding_byte(executorch_preset):
    converted, report, _ = executorch_preset
    linears = [r for r in qatfx.summary(converted).quantized if r.op == "linear"]
    assert sorted(r.scheme for r in linears) == ["8da4w"] * 7 + ["8da8w"]
    assert report.quantized_layers == report.delegated == 8 and report.not_delegated == {} and report.float_layers == []
    assert report.weight_kinds == {"int4": 7, "int8": 1}
    assert "8/8 quantized linears (7 int4, 1 int8) delegated to XNNPACK" in str(report)
    # int4 scales trained in bf16, int8 per-channel scales kept in float32: no scale is rounded
    assert not any("scales are rounded" in d for d in report.differences)
    operators = pte_operators(report.path)
    assert "quantized_decomposed::embedding_byte.dtype_out" in operators
    assert not operators & {"aten::linear.out", "aten::mm.out", "aten::addmm.out", "aten::embedding.out"}
    assert not any("dequantize" in op for op in operators)
    # the runtime against the converted model: the export's check, then fresh tokens
    assert report.verification.passed
    ids = tokens(2, 8, 96, 7)  # the exported program takes the capture shape
    with torch.no_grad():
        expected = converted(ids)
    assert_same_logits_and_tokens(run_pte(report.path, ids), expected)  # tests/export/decisions.py: bound and why


def test_executorch_preset_pte_carries_converts_int8_codes(executorch_preset):
    """The 8da8w lm_head's codes and float32 scales handed to the lowering are convert's,
    unchanged (no requantization), and the program holds those bytes as they are: in the
    XNNPACK delegate's data for the linear and in embedding_byte's table."""
    converted, report, tied = executorch_preset
    rewritten, weights, _ = rewritten_copy(converted)
    assert len(weights) == 8
    codes = get_attr_value(converted, "lm_head.weight_packed")
    scales = get_attr_value(converted, "lm_head.weight_scales")
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (96, 1)
    assert torch.equal(get_attr_value(rewritten, "lm_head.weight_codes"), codes)
    assert torch.equal(get_attr_value(rewritten, "lm_head.weight_scales_fp32"), scales.flatten())
    table = "lm_head.weight" if tied else "embed.weight"
    assert torch.equal(get_attr_value(rewritten, table + "_embedding_table"), get_attr_value(converted, table + "_packed"))
    program = report.path.read_bytes()
    assert codes.numpy().tobytes() in program and scales.numpy().tobytes() in program
    assert get_attr_value(converted, table + "_packed").numpy().tobytes() in program


def test_single_8da8w_linear_error_is_within_one_activation_code(tmp_path):
    """8da8w alone (float32 per-channel scales, codes in [-128, 127] with -128 used): XNNPACK's
    dynamically quantized linear with per-channel int8 weights computes the converted linear."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64))
    x = torch.randn(4, 16, 128)
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, qatfx.Int8DynActInt8WeightQuantizer(), (x,)).eval())
    report = qatfx.export.executorch(converted, tmp_path / "linear8.pte")
    assert report.delegated == report.quantized_layers == 1 and report.weight_kinds == {"int8": 1}
    assert not any("scales are rounded" in d for d in report.differences)
    ((_, region),) = graph_regions(converted)
    codes, scales = get_attr_value(region, "0.weight_packed"), get_attr_value(region, "0.weight_scales")
    assert int(codes.min()) == -128  # the full int8 grid reaches the runtime
    with torch.no_grad():
        expected = converted(x)
    weight = reference.dequantize(codes, scales, None, -1, torch.float32)
    assert within_one_activation_code(run_pte(report.path, x), expected, x, weight)


@pytest.mark.long
@pytest.mark.parametrize("family", list(DEPLOY_FAMILIES))
def test_every_family_exports_with_every_linear_delegated(family, tmp_path):
    """Each family of docs/deploy.md's matrix, region-captured with its default config, 8da4w
    in XNNPACK's scale dtype: every quantized linear delegated, the .pte verified."""
    model, vocab = deploy_family(family)
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(GROUP, scales_precision=torch.bfloat16)
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, quantizer, (tokens(2, 8, vocab, 0),), regions="auto").eval())
    report = qatfx.export.executorch(converted, tmp_path / f"{family}.pte")
    assert report.delegated == report.quantized_layers == len(qatfx.summary(converted).quantized)
    assert report.verification.passed


@pytest.mark.parametrize("quantizer", [qatfx.Int8WeightOnlyQuantizer(), qatfx.Int4WeightOnlyQuantizer(GROUP)], ids=["int8wo", "int4wo"])
def test_weight_only_models_are_refused_before_lowering(tmp_path, quantizer):
    """XNNPACK delegates linears with int8 dynamic activations only; a weight-only model is
    refused before any lowering, naming its scheme and the ones that deploy there."""
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(TinyLM().eval(), quantizer, (tokens(),)))
    with pytest.raises(qatfx.export.ExportError, match=r"(?s)weight-only quantized.*Int8DynActInt4WeightQuantizer.*qatfx\.export\.gguf"):
        qatfx.export.executorch(converted, tmp_path / "wo.pte")
    assert not (tmp_path / "wo.pte").exists()


def test_weights_without_an_xnnpack_pattern_are_refused_before_lowering(tmp_path):
    """int8 per-group weights under per-token activations: XNNPACK's grouped weights are 4-bit
    only, so the weight stays a qatfx dequantize (no ExecuTorch kernel); refused by name
    before lowering, not as `Missing out variants` after it."""
    from qatfx.quantizer import Quantizer
    from qatfx.spec import PerGroup, QuantSpec, int8_per_token_activation

    quantizer = Quantizer(int8_per_token_activation(), QuantSpec(8, PerGroup(GROUP), symmetric=True))
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(TinyLM().eval(), quantizer, (tokens(),)))
    with pytest.raises(qatfx.export.ExportError, match=r"(?s)15 quantized layer\(s\) use a scheme .* does not run.*blocks\.0\.q_proj \(8da8w\): weights int8/group32/sym.*and 7 more"):
        qatfx.export.executorch(converted, tmp_path / "g8.pte")
    assert not (tmp_path / "g8.pte").exists()


def test_the_llama_cpp_preset_is_refused_naming_each_layer(tmp_path):
    """Q8_0 activations (symmetric blocks of 32) are not XNNPACK's per-token ones: every layer
    is named with its scheme, and GGUF is named as the target."""
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(TinyLM(tie=False).eval(), qatfx.presets.llama_cpp_q4_0(), (tokens(),)))
    with pytest.raises(qatfx.export.ExportError, match=r"(?s)blocks\.0\.q_proj \(ggml-8da4w\): activations int8/group32/sym/narrow/ggml.*qatfx\.export\.gguf"):
        qatfx.export.executorch(converted, tmp_path / "q4_0.pte")
    assert not (tmp_path / "q4_0.pte").exists()


def test_refuses_a_model_that_is_not_converted():
    prepared = qatfx.prepare_pt2e(TinyLM(), qatfx.Int8DynActInt4WeightQuantizer(GROUP), (tokens(),))
    with pytest.raises(qatfx.export.ExportError, match="needs a module returned by qatfx.convert_pt2e.*stage 'prepared'"):
        qatfx.export.executorch(prepared, "unused.pte")


def test_missing_executorch_names_the_extra(monkeypatch, tied_toy):
    real_import = builtins.__import__

    def no_executorch(name, *args, **kwargs):
        if name.startswith("executorch"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_executorch)
    with pytest.raises(qatfx.export.ExportError, match=r"pip install -e \"\.\[executorch\]\""):
        qatfx.export.executorch(tied_toy[0], "unused.pte")


@pytest.mark.long  # ~1 min on 2 cores: one more XNNPACK lowering
def test_learned_scales_are_the_pte_grid(tmp_path):
    """learnable_scales with bfloat16 scales: the `.pte` is lowered with the trained scales
    (as the forward rounded them) and runs as the converted model does."""
    torch.manual_seed(0)
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(GROUP, scales_precision=torch.bfloat16, learnable_scales=True)
    prepared = qatfx.prepare_pt2e(TinyLM(tie=True).train(), quantizer, (tokens(),))
    qat_steps(prepared, 96, steps=3)
    trained = qatfx.learned_qparams(prepared)["blocks.0.q_proj.weight_learned_scale"].detach()
    converted = qatfx.convert_pt2e(prepared.eval())
    rewritten, _, _ = rewritten_copy(converted)
    lowered = get_attr_value(rewritten, "blocks.0.q_proj.weight_scales_fp32")
    assert torch.equal(lowered, trained.to(torch.bfloat16).float())
    report = qatfx.export.executorch(converted, tmp_path / "learned.pte")
    assert report.delegated == report.quantized_layers == 15
    ids = tokens(2, 8, 96, 3)
    assert_same_logits_and_tokens(run_pte(report.path, ids), converted(ids))
