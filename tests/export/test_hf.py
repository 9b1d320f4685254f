"""qatfx.export.hf: a converted model -> a compressed-tensors directory that transformers loads,
holding convert's codes and scales bit for bit: "pack-quantized" W4A16 / W8A16 for weight-only
layers, "int-quantized" W8A8 for 8da8w ones, one config group per scheme."""

from __future__ import annotations

import builtins
import json
import shutil

import pytest
import torch

import qatfx
from qatfx.export import ExportError, VerificationError
from qatfx.export.hf import float_error_bound, hf, verify_hf
from qatfx.export.llama_layout import hf_name, llama_hparams
from qatfx.export.weights import converted_tensors
from qatfx.recipes.model import CausalLM, LMConfig
from qatfx.spec import PerChannel, PerGroup, QuantSpec, int4_per_group_weight
from tests.export.training import qat_steps
from tests.export.vllm_rules import vllm_rule_violations
from tests.model_zoo import BY_NAME, DEPLOY_FAMILIES, deploy_family
from tests.models import TinyLM, tokens

pytest.importorskip("compressed_tensors", reason="the hf extra: pip install -e '.[hf]'")
transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

GROUP = 32
VOCAB = 96
CONFIG = LMConfig(vocab_size=VOCAB, dim=64, layers=2, heads=4, hidden=128, tie_embeddings=True)


def weight_only(scales=torch.bfloat16, **kwargs) -> qatfx.Quantizer:
    return qatfx.Quantizer(None, int4_per_group_weight(GROUP, scales), **kwargs)


def _converted(model, quantizer, vocab=VOCAB, steps=2, **prepare):
    torch.manual_seed(0)
    prepared = qatfx.prepare_pt2e(model.train(), quantizer, (tokens(2, 8, vocab, 0),), **prepare)
    qat_steps(prepared, vocab, steps)
    return qatfx.convert_pt2e(prepared.eval())


def _tokenizer_dir(path):
    """A word-level transformers tokenizer over the toy vocabulary, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """qatfx's Llama (RoPE, RMSNorm, SwiGLU) with tied embeddings, weight-only int4 g32 with
    bfloat16 scales, two QAT steps, converted (a whole-model capture), lm_head packed too."""
    torch.manual_seed(0)
    converted = _converted(CausalLM(CONFIG), weight_only())
    tokenizer = _tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))
    report = hf(converted, tmp_path_factory.mktemp("hf") / "toy", config=CONFIG, tokenizer_dir=tokenizer, quantize_lm_head=True)
    return converted, report


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """transformers' LlamaForCausalLM (random, from a config: 2 layers, GQA), region capture."""
    model, vocab = BY_NAME["hf_llama"].build()
    converted = _converted(model, qatfx.Int4WeightOnlyQuantizer(GROUP, scales_precision=torch.bfloat16), vocab, regions="auto")
    return converted, vocab, hf(converted, tmp_path_factory.mktemp("hf") / "llama")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def test_tied_llama_loads_in_transformers_and_computes_the_converted_model(tied_llama):
    converted, report = tied_llama
    assert report.quantized_layers == 15 and report.group_size == GROUP and report.dtype == torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(str(report.path)).eval()
    ids = tokens(2, 8, VOCAB, 7)  # not the verifier's held-out inputs
    with torch.no_grad():
        got, expected = model(input_ids=ids).logits, converted(ids)
    # Same weights (checked bit for bit below), two float implementations of one Llama: the
    # relative logit error is at most (9 L + 2) * K_max * u (qatfx/export/hf.py derives it):
    # 20 * 128 * 2^-24 = 1.5e-4 here (measured: 0, bit-identical). A wrong code or scale
    # moves logits by ~1e-1.
    bound = float_error_bound(llama_hparams(CONFIG), torch.float32, ids.shape[1])
    assert bound == pytest.approx(20 * 128 * 2**-24)
    assert relative_error(got, expected) <= bound
    assert report.verification.logits.relative_error <= bound and report.verification.logits.passed
    assert report.verification.weights == report.verification.decompressed == 15


def test_tied_embeddings_with_an_int4_head_are_untied_and_reported(tied_llama):
    _, report = tied_llama
    config = json.loads((report.path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and not report.tied
    assert any(d.startswith("tied embeddings:") and "untied" in d for d in report.differences)
    names = load_file(str(report.path / "model.safetensors"))
    assert "model.embed_tokens.weight" in names and "lm_head.weight_packed" in names and "lm_head.weight" not in names


def test_weight_packed_unpacks_to_converts_codes_bit_for_bit(tied_llama):
    converted, report = tied_llama
    file = load_file(str(report.path / "model.safetensors"))
    quantized = converted_tensors(converted).quantized
    assert len(quantized) == 15
    for name, qw in quantized.items():
        module = hf_name(name).removesuffix(".weight")
        packed, scale, shape = (file[f"{module}.weight_{part}"] for part in ("packed", "scale", "shape"))
        n, k = qw.codes.shape
        assert packed.dtype == torch.int32 and packed.shape == (n, k // 8)
        assert shape.tolist() == [n, k]
        assert torch.equal(unpack_from_int32(packed, 4, torch.Size(shape.tolist())), qw.codes)
        # compressed-tensors' layout, checked without it: element i of a row is code + 8 at
        # bits 4 * (i % 8) of word i // 8
        word = sum(int(qw.codes[0, i] + 8) << (4 * i) for i in range(8))
        assert int(packed[0, 0]) & 0xFFFFFFFF == word
        # scales: float32 (the checkpoint dtype) holding the trained bfloat16 values exactly
        assert scale.dtype == torch.float32 and scale.shape == (n, k // GROUP)
        assert qw.scales.dtype == torch.bfloat16 and torch.equal(scale, qw.scales.float())
    assert file["model.embed_tokens.weight"].dtype == torch.float32


def test_config_json_has_what_vllms_compressed_tensors_loader_reads(tied_llama):
    """Only the fields that differ from compressed-tensors' defaults (an older compressed-tensors,
    as a vLLM release pins, forbids fields it does not know), parsed back to the intended
    scheme; the packed lm_head (quantize_lm_head=True) is the one rule older vLLMs break."""
    _, report = tied_llama
    config = json.loads((report.path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32" and config["vocab_size"] == VOCAB and config["head_dim"] == 16
    q = config["quantization_config"]
    assert q == {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["lm_head", "Linear"], "format": "pack-quantized",
            "weights": {"num_bits": 4, "strategy": "group", "group_size": GROUP},
        }},
    }
    (group,) = QuantizationConfig.model_validate(q).config_groups.values()  # what vLLM and transformers parse it with
    weights = group.weights
    assert (weights.num_bits, weights.type, weights.symmetric, weights.dynamic) == (4, "int", True, False)
    assert (weights.strategy, weights.group_size, group.input_activations) == ("group", GROUP, None)
    linears = [f"model.layers.{i}.{p}" for i in range(2) for p in (*(f"self_attn.{x}_proj" for x in "qkvo"), "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert vllm_rule_violations(config, linears + ["lm_head"]) == [
        "group_0: targets lm_head, which vLLM before 0.20 cannot load packed"
    ]


def test_the_default_checkpoint_breaks_no_vllm_rule(hf_llama):
    """By default a quantized lm_head is written as its dequantized grid in float and ignored."""
    converted, _, report = hf_llama
    config = json.loads((report.path / "config.json").read_text())
    linears = [r.layer for r in qatfx.summary(converted).layers if r.op != "embedding"]
    assert vllm_rule_violations(config, linears) == []
    assert config["quantization_config"]["ignore"] == ["lm_head"] and report.quantized_layers == 14
    assert report.verification.float_grids == 1 and report.verification.logits.passed


def test_a_fused_group_with_mixed_schemes_is_refused_before_writing(tmp_path):
    """k_proj skipped, q/v int4: transformers would load it, vLLM refuses one qkv_proj with two
    schemes; the export refuses first, naming the group and the fix."""
    converted = _converted(CausalLM(CONFIG), weight_only(skip=["*.k_proj"]), steps=1)
    with pytest.raises(ExportError, match=r"(?s)model\.layers\.0\.self_attn\.qkv_proj: q_proj, v_proj int4 group 32 \(W4A16\) but k_proj float.*skip them all"):
        hf(converted, tmp_path / "mixed", config=CONFIG)
    assert not (tmp_path / "mixed").exists()


def test_tokenizer_files_are_copied_and_load(tied_llama):
    _, report = tied_llama
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(report.files)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(report.path))
    assert tokenizer("w3 w5")["input_ids"][-2:] == [3, 5]


def test_hf_llama_exports_with_its_own_config(hf_llama):
    converted, vocab, report = hf_llama
    config = json.loads((report.path / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["quantization_config"]["ignore"] == ["lm_head"]
    assert "generation_config.json" in report.files and report.differences == []
    assert report.verification.weights == 14 and report.verification.logits.passed
    model = transformers.AutoModelForCausalLM.from_pretrained(str(report.path)).eval()
    ids = tokens(2, 8, vocab, 5)
    with torch.no_grad():
        got, expected = model(input_ids=ids).logits, converted(ids).logits
    assert relative_error(got, expected) <= float_error_bound(llama_hparams(converted.config), torch.float32, 8)


HF_DEFAULT_FAMILIES = ("llama3_2", "qwen2_5", "phi3")  # the others in the long run


@pytest.mark.parametrize(
    "family", [pytest.param(name, marks=() if name in HF_DEFAULT_FAMILIES else pytest.mark.long) for name in DEPLOY_FAMILIES]
)
def test_a_family_is_written_in_its_own_layout_and_config(family, tmp_path):
    """The model's own save_pretrained layout and config (RoPE scaling, biases, norms, head_dim,
    fused Phi-3 projections kept as they are), only the quantized linears packed; transformers
    loads it and computes the converted model's logits (weight-only: the float bound)."""
    model, vocab = deploy_family(family)
    float_state = set(model.state_dict())
    converted = _converted(model, qatfx.Int4WeightOnlyQuantizer(GROUP, scales_precision=torch.bfloat16), vocab, steps=1, regions="auto")
    report = hf(converted, tmp_path / family)
    written = json.loads((report.path / "config.json").read_text())
    original = model.config.to_dict()
    for key in ("model_type", "head_dim", "rope_scaling", "rope_parameters", "attention_bias", "sliding_window"):
        assert written.get(key) == original.get(key), key
    assert written["architectures"] == [DEPLOY_FAMILIES[family][1]]  # what vLLM picks the model class by
    names = set(load_file(str(report.path / "model.safetensors")))
    packed = {n.removesuffix(".weight_packed") for n in names if n.endswith(".weight_packed")}
    assert len(packed) == report.quantized_layers == len(qatfx.summary(converted).quantized) - 1  # lm_head in float
    # every tensor of the model's own state dict under its own name (a tied head once, as the embedding)
    untied = float_state | {"lm_head.weight"}
    assert {n for n in names if not n.endswith(("_packed", "_scale", "_shape"))} | {p + ".weight" for p in packed} == (
        untied - {"lm_head.weight"} if written["tie_word_embeddings"] else untied
    )
    linears = [r.layer for r in qatfx.summary(converted).layers if r.op != "embedding"]
    assert vllm_rule_violations(written, linears) == []
    assert report.verification.logits.passed and report.verification.weights == report.quantized_layers


def test_8da4w_exports_as_w4a16_with_the_activation_drop_measured(tmp_path):
    """The format has no activation quantization: the file holds the 8da4w weights exactly,
    runs with float activations, and the report measures the difference."""
    converted = _converted(CausalLM(CONFIG), qatfx.Int8DynActInt4WeightQuantizer(GROUP, scales_precision=torch.bfloat16))
    report = hf(converted, tmp_path / "8da4w", config=CONFIG)
    drop = report.verification.activation_drop
    assert report.differences[0].startswith("activations:") and "measured on 64 positions" in report.differences[0]
    # measured here (CPU): relative logit error 7.6e-3, next-token agreement 100% (reported,
    # not judged: it is the model's change, not the file's error)
    assert drop.positions == 64 and 0 < drop.relative_error < 0.1
    # the file itself is exact: transformers computes the converted model without its
    # activation quantization, within the float bound
    assert "activation quantization removed" in report.verification.reference
    assert report.verification.logits.relative_error <= float_error_bound(llama_hparams(CONFIG), torch.float32, 8)
    with pytest.raises(ExportError, match="allow_activation_drop=True"):
        hf(converted, tmp_path / "refused", config=CONFIG, allow_activation_drop=False)


def test_per_channel_int4_is_written_with_the_channel_strategy(tmp_path):
    converted = qatfx.convert_pt2e(
        qatfx.prepare_pt2e(CausalLM(CONFIG).eval(), qatfx.Quantizer(None, QuantSpec(4, PerChannel(), symmetric=True)), (tokens(),)).eval()
    )
    report = hf(converted, tmp_path / "channel", config=CONFIG)
    (group,) = json.loads((report.path / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert group["weights"] == {"num_bits": 4, "strategy": "channel"}  # group_size None: the default, left out
    assert report.group_size is None and report.verification.weights == 14 and report.verification.logits.passed


def test_a_saved_finetune_style_model_exports_with_the_checkpoints_config(tmp_path):
    """`qatfx finetune` saves a whole-model capture of LogitsOnly(hf_model) (names `lm.model.…`);
    qatfx.load gives it back without a config: the HF config is passed."""
    from qatfx.recipes.finetune import LogitsOnly

    model, vocab = BY_NAME["hf_llama"].build()
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(LogitsOnly(model), weight_only(), (tokens(2, 8, vocab, 0),)).eval())
    qatfx.save(converted, tmp_path / "saved")
    report = hf(qatfx.load(tmp_path / "saved"), tmp_path / "hf", config=model.config)
    assert report.quantized_layers == 14 and report.verification.logits.passed  # lm_head written in float


def test_an_int4_embedding_tied_to_the_head_is_written_as_its_grid(tmp_path):
    """One int4 table read by the lookup and by lm_head: convert stores it once, under the
    linear. By default the file holds it once, as its grid in float, tied; with
    quantize_lm_head=True it packs lm_head and writes the embedding as the same grid in float."""
    from qatfx.spec import int4_per_group_embedding

    quantizer = qatfx.Int4WeightOnlyQuantizer(GROUP, scales_precision=torch.bfloat16,
                                              embedding_spec=int4_per_group_embedding(GROUP, torch.bfloat16))
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(CausalLM(CONFIG).eval(), quantizer, (tokens(),)).eval())
    report = hf(converted, tmp_path / "embedding", config=CONFIG)
    assert report.tied and report.quantized_layers == 14 and report.verification.logits.passed
    report = hf(converted, tmp_path / "packed_head", config=CONFIG, quantize_lm_head=True)
    assert not report.tied and any(d.startswith("embedding: quantized in training (int4/group32/sym)") for d in report.differences)
    assert report.verification.float_grids == 1 and report.verification.logits.passed


def test_a_skipped_lm_head_stays_tied(tmp_path):
    converted = _converted(CausalLM(CONFIG), weight_only(skip=["lm_head"]), steps=1)
    report = hf(converted, tmp_path / "skipped", config=CONFIG)
    assert report.tied and report.quantized_layers == 14 and "skip pattern" in report.ignored["lm_head"]
    config = json.loads((report.path / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["quantization_config"]["ignore"] == ["lm_head"]
    assert "lm_head.weight" not in load_file(str(report.path / "model.safetensors"))
    assert report.verification.logits.passed


def test_verify_hf_catches_a_changed_code(tied_llama, tmp_path):
    converted, report = tied_llama
    copy = tmp_path / "tampered"
    shutil.copytree(report.path, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight_packed"][0, 0] ^= 1  # one code moves by one step
    from safetensors.torch import save_file

    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VerificationError, match="up_proj: weight_packed does not unpack to convert's codes"):
        verify_hf(copy, converted)


def test_float32_scales_a_bfloat16_checkpoint_would_round_are_refused(tmp_path):
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(CausalLM(CONFIG).eval(), weight_only(torch.float32), (tokens(),)).eval())
    with pytest.raises(ExportError, match=r"bfloat16 .* cannot hold exactly.*scales_precision=torch.bfloat16"):
        hf(converted, tmp_path / "bf16", config=CONFIG, dtype=torch.bfloat16)
    # a float32 checkpoint holds them exactly (transformers in float32); vLLM's half-precision
    # kernels would round them, which the report says
    report = hf(converted, tmp_path / "fp32", config=CONFIG, verify=False)
    assert any(d.startswith("serving:") and "scales_precision=torch.bfloat16" in d for d in report.differences)


@pytest.mark.parametrize(
    "quantizer, message",
    [
        (qatfx.Quantizer(None, QuantSpec(3, PerGroup(GROUP), symmetric=True)), "int3 weights"),
        (qatfx.Quantizer(None, QuantSpec(4, PerGroup(GROUP), symmetric=False)), "asymmetric"),
        (qatfx.Quantizer(None, QuantSpec(8, PerChannel(), symmetric=False)), "asymmetric"),
    ],
    ids=["int3", "asymmetric-int4", "asymmetric-int8"],
)
def test_weights_no_served_scheme_holds_are_refused(quantizer, message, tmp_path):
    """Every quantized layer is written exactly or refused by name, with the fix."""
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(CausalLM(CONFIG).eval(), quantizer, (tokens(),)).eval())
    with pytest.raises(ExportError, match=f"(?s)model.layers.0.self_attn.q_proj.weight: .*{message}.*Train those layers with"):
        hf(converted, tmp_path / "refused", config=CONFIG)
    assert not (tmp_path / "refused").exists()


LINEARS = [  # the test model's linears under their HF names, lm_head apart
    f"model.layers.{i}.{p}" for i in range(2) for p in (*(f"self_attn.{x}_proj" for x in "qkvo"), "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
]


def test_the_vllm_w4a16_preset_writes_one_group_and_a_float_lm_head(tmp_path):
    """qatfx.presets.vllm_w4a16 (group 32 here: the toy model's K is 64): the one config group
    targets "Linear" as before per-layer schemes, lm_head stays float, tied and ignored."""
    converted = _converted(CausalLM(CONFIG), qatfx.presets.vllm_w4a16(GROUP), steps=1)
    report = hf(converted, tmp_path / "w4a16", config=CONFIG)
    config = json.loads((report.path / "config.json").read_text())
    q = config["quantization_config"]
    assert q["format"] == "pack-quantized" and q["ignore"] == ["lm_head"] and config["tie_word_embeddings"] is True
    assert q["config_groups"] == {"group_0": {
        "targets": ["Linear"], "format": "pack-quantized", "weights": {"num_bits": 4, "strategy": "group", "group_size": GROUP},
    }}
    assert report.format == "pack-quantized" and report.quantized_layers == 14 and report.group_size == GROUP
    assert "skip" in report.ignored["lm_head"] or "float" in report.ignored["lm_head"]
    assert vllm_rule_violations(config, LINEARS + ["lm_head"]) == []
    assert report.verification.weights == report.verification.decompressed == 14 and report.verification.logits.passed


@pytest.fixture(scope="module")
def executorch_llama(tmp_path_factory):
    """qatfx.presets.executorch_llama() on the tied test model: 8da4w int4 g32 bf16-scale body,
    8da8w lm_head (float32 per-channel scales), int8 per-row embedding tied to it; 2 QAT steps."""
    converted = _converted(CausalLM(CONFIG), qatfx.presets.executorch_llama())
    return converted, hf(converted, tmp_path_factory.mktemp("hf") / "executorch", config=CONFIG, quantize_lm_head=True)


def test_the_executorch_preset_writes_a_group_per_scheme(executorch_llama):
    """Two config groups, each naming exactly its modules: the 8da4w body as W4A16
    (pack-quantized, activations dropped and measured) and the 8da8w lm_head as W8A8
    (int-quantized, int8 dynamic per-token asymmetric activations, as trained)."""
    converted, report = executorch_llama
    config = json.loads((report.path / "config.json").read_text())
    q = config["quantization_config"]
    assert q["format"] == "mixed-precision" and report.format == "mixed-precision" and "ignore" not in q
    assert q["config_groups"] == {
        "group_0": {"targets": LINEARS, "format": "pack-quantized", "weights": {"num_bits": 4, "strategy": "group", "group_size": GROUP}},
        "group_1": {
            "targets": ["lm_head"], "format": "int-quantized", "weights": {"strategy": "channel"},
            "input_activations": {"strategy": "token", "dynamic": True, "symmetric": False},
        },
    }
    body, head = QuantizationConfig.model_validate(q).config_groups.values()  # what vLLM and transformers parse
    assert (body.weights.num_bits, body.weights.symmetric, body.input_activations) == (4, True, None)
    assert (head.weights.num_bits, head.weights.type, head.weights.symmetric, head.weights.strategy) == (8, "int", True, "channel")
    acts = head.input_activations
    assert (acts.num_bits, acts.type, acts.symmetric, acts.strategy, acts.dynamic) == (8, "int", False, "token", True)
    assert [len(modules) for modules in report.schemes.values()] == [14, 1] and report.group_size is None
    # the file: int4 packed, lm_head int8 codes as they are (IntQuantizationCompressor), the
    # int8 embedding as its dequantized grid in float (untied: the head is quantized)
    file = load_file(str(report.path / "model.safetensors"))
    qw = converted_tensors(converted).quantized["lm_head.weight"]
    assert file["lm_head.weight"].dtype == torch.int8 and torch.equal(file["lm_head.weight"], qw.codes)
    assert file["lm_head.weight_scale"].shape == (VOCAB, 1) and torch.equal(file["lm_head.weight_scale"], qw.scales)
    assert "lm_head.weight_packed" not in file and config["tie_word_embeddings"] is False
    assert torch.equal(file["model.embed_tokens.weight"], qw.dequantized(torch.float32))
    assert any(d.startswith("embedding: quantized in training (int8/PerChannel/sym)") for d in report.differences)
    assert report.differences[0].startswith("activations:") and "8da4w" in report.differences[0] and "keep theirs" in report.differences[0]
    # vLLM: every rule but the quantized lm_head (vLLM 0.20+)
    assert vllm_rule_violations(config, LINEARS + ["lm_head"]) == ["group_1: targets lm_head, which vLLM before 0.20 cannot load quantized"]


def test_the_executorch_preset_loads_in_transformers_with_its_w8a8_head(executorch_llama, tmp_path):
    """transformers (compressed-tensors) decompresses both groups and quantizes lm_head's inputs
    per token itself: its logits equal the converted model's with only the body's activation
    quantization removed (measured: 0, bit-identical), and differ from the all-float-activation
    model, so the W8A8 activations are really applied."""
    from qatfx.export.hf import float_activation_copy

    converted, report = executorch_llama
    verification = report.verification
    assert verification.weights == verification.decompressed == 15 and verification.float_grids == 1
    assert "the W8A8 layers keep theirs" in verification.reference and verification.logits.passed
    assert verification.logits.relative_error <= float_error_bound(llama_hparams(CONFIG), torch.float32, 8)
    assert verification.activation_drop is not None and verification.dropped == "8da4w"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(report.path)).eval()
    ids = tokens(2, 8, VOCAB, 7)
    body_only, removed = float_activation_copy(converted, {"lm_head.weight"})
    all_float, removed_all = float_activation_copy(converted)
    assert removed == removed_all - 1  # the body's 10 activation quantizations (q/k/v and gate/up share one), not the head's
    with torch.no_grad():
        got = model(input_ids=ids).logits
        assert relative_error(got, body_only(ids)) <= float_error_bound(llama_hparams(CONFIG), torch.float32, 8)
        assert relative_error(got, all_float(ids)) > 1e-4  # lm_head's int8 activations: a quantization step away
    copy = tmp_path / "tampered"
    shutil.copytree(report.path, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    tensors["lm_head.weight"][0, 0] += 1 if tensors["lm_head.weight"][0, 0] < 127 else -1
    from safetensors.torch import save_file

    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VerificationError, match="lm_head: the int8 weight differs from convert's codes"):
        verify_hf(copy, converted)


def test_the_executorch_preset_by_default_keeps_lm_head_float_and_tied(executorch_llama, tmp_path):
    """quantize_lm_head=False: one W4A16 group; lm_head (8da8w in training) written as its int8
    grid in float, equal to the tied embedding's, so the checkpoint stays tied; both activation
    quantizations dropped, measured."""
    converted, _ = executorch_llama
    report = hf(converted, tmp_path / "default", config=CONFIG)
    config = json.loads((report.path / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["quantization_config"]["ignore"] == ["lm_head"]
    assert [scheme.name for scheme in report.schemes] == ["W4A16"] and report.quantized_layers == 14
    assert "int8/PerChannel/sym grid in float" in report.ignored["lm_head"]
    assert "8da4w, 8da8w" in report.differences[0] and report.verification.dropped == "8da4w, 8da8w"
    assert vllm_rule_violations(config, LINEARS + ["lm_head"]) == []
    assert report.verification.float_grids == 2 and report.verification.logits.passed


def test_the_llama_cpp_preset_writes_q8_0_as_int8_groups_of_32(tmp_path):
    """Q4_0 body and Q8_0 lm_head (quantize_lm_head=True): both grids hold exactly in
    pack-quantized groups of 32 (Q8_0's narrow codes are inside int8, its fp16 scales exact in a
    float32 file), so one format and two groups, W4A16 and W8A16; the Q8_0 activations have no
    served form with these weights and are dropped, measured."""
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(CausalLM(CONFIG).eval(), qatfx.presets.llama_cpp_q4_0(), (tokens(),)).eval())
    report = hf(converted, tmp_path / "q4_0", config=CONFIG, quantize_lm_head=True)
    q = json.loads((report.path / "config.json").read_text())["quantization_config"]
    assert q["format"] == "pack-quantized" and [g["weights"] for g in q["config_groups"].values()] == [
        {"num_bits": 4, "strategy": "group", "group_size": 32}, {"strategy": "group", "group_size": 32},
    ]
    file = load_file(str(report.path / "model.safetensors"))
    head = converted_tensors(converted).quantized["lm_head.weight"]
    assert int(head.codes.min()) >= -127 and head.scales.dtype == torch.float16
    assert file["lm_head.weight_packed"].shape == (VOCAB, 64 // 4)  # 4 int8 codes a word
    assert torch.equal(unpack_from_int32(file["lm_head.weight_packed"], 8, torch.Size([VOCAB, 64])), head.codes)
    assert report.differences[0].startswith("activations:") and "ggml-8da4w" in report.differences[0]
    assert report.verification.weights == 15 and report.verification.logits.passed
    assert vllm_rule_violations(json.loads((report.path / "config.json").read_text()), LINEARS + ["lm_head"]) == [
        "group_1: targets lm_head, which vLLM before 0.20 cannot load packed"
    ]


def test_int8_weight_only_is_written_as_w8a16(tmp_path):
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(CausalLM(CONFIG).eval(), qatfx.Int8WeightOnlyQuantizer(), (tokens(),)).eval())
    report = hf(converted, tmp_path / "w8a16", config=CONFIG)
    config = json.loads((report.path / "config.json").read_text())
    (group,) = config["quantization_config"]["config_groups"].values()
    assert group == {"targets": ["Linear"], "format": "pack-quantized", "weights": {"strategy": "channel"}}  # 8 bits: the default
    assert str(report).splitlines()[0].endswith("compressed-tensors pack-quantized W8A16, 14 int8 linears (per channel), float32")
    assert vllm_rule_violations(config, LINEARS + ["lm_head"]) == []
    assert report.verification.weights == 14 and report.verification.logits.passed


def test_several_group_sizes_get_a_group_each(tmp_path):
    """int4 g32 attention and g64 MLP: two pack-quantized groups naming their modules."""
    quantizer = qatfx.MixedQuantizer(
        [(("*.gate_proj", "*.up_proj", "*.down_proj"), weight_only_group(64)), ("lm_head", None)], default=weight_only_group(GROUP),
    )
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(CausalLM(CONFIG).eval(), quantizer, (tokens(),)).eval())
    report = hf(converted, tmp_path / "sizes", config=CONFIG)
    config = json.loads((report.path / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert [(g["weights"]["group_size"], len(g["targets"])) for g in groups.values()] == [(GROUP, 8), (64, 6)]
    assert groups["group_1"]["targets"][0] == "model.layers.0.mlp.gate_proj"
    assert vllm_rule_violations(config, LINEARS + ["lm_head"]) == [] and report.verification.logits.passed


def weight_only_group(group_size: int) -> qatfx.Quantizer:
    return qatfx.Quantizer(None, int4_per_group_weight(group_size, torch.bfloat16))


def test_a_fused_group_with_two_quantized_schemes_is_refused(tmp_path):
    quantizer = qatfx.MixedQuantizer([("*.k_proj", qatfx.Int8WeightOnlyQuantizer())], default=weight_only())
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(CausalLM(CONFIG).eval(), quantizer, (tokens(),)).eval())
    with pytest.raises(ExportError, match=r"qkv_proj: q_proj, v_proj int4 group 32 \(W4A16\) but k_proj int8 per channel \(W8A16\)"):
        hf(converted, tmp_path / "fused", config=CONFIG)
    assert not (tmp_path / "fused").exists()


def test_the_vllm_rules_catch_configs_vllm_would_misread():
    """The restated rules themselves (no model): a weight-only int-quantized group, a global
    mixed-precision format a group relies on, and a "Linear" group beside a by-name group,
    which vLLM resolves for a fused qkv_proj by class name where transformers uses the name."""
    w4 = {"num_bits": 4, "strategy": "group", "group_size": GROUP}
    q = {"quant_method": "compressed-tensors", "format": "mixed-precision", "config_groups": {
        "group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": w4},
        "group_1": {"targets": ["model.layers.0.self_attn.k_proj"], "format": "int-quantized", "weights": {"strategy": "channel"}},
        "group_2": {"targets": ["model.layers.1.mlp.down_proj"], "weights": w4},
    }}
    assert vllm_rule_violations({"quantization_config": q}, LINEARS) == [
        "group_1: int-quantized without input_activations matches no vLLM scheme (weight-only int8 is pack-quantized W8A16)",
        "group_2: format 'mixed-precision' is neither pack-quantized (W4A16/W8A16) nor int-quantized (W8A8)",
        "model.layers.0.self_attn.k_proj: vLLM reads it (model.layers.0.self_attn.qkv_proj) with group_0, transformers with group_1",
    ]


def test_refuses_a_model_that_is_not_converted(tmp_path):
    prepared = qatfx.prepare_pt2e(CausalLM(CONFIG), weight_only(), (tokens(),))
    with pytest.raises(ExportError, match="needs a module returned by qatfx.convert_pt2e.*stage 'prepared'"):
        hf(prepared, tmp_path / "unused", config=CONFIG)


def test_refuses_a_model_that_is_not_a_llama(tmp_path):
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(TinyLM(), weight_only(), (tokens(),)).eval())
    with pytest.raises(ExportError, match="not a Llama: it needs rope=True"):
        hf(converted, tmp_path / "unused")  # the config a whole capture keeps
    with pytest.raises(ExportError, match="cannot read decoder hyperparameters from a dict"):
        hf(converted, tmp_path / "unused", config={"layers": 2})


def test_missing_compressed_tensors_names_the_extra(monkeypatch, tied_llama, tmp_path):
    real_import = builtins.__import__

    def no_compressed_tensors(name, *args, **kwargs):
        if name.startswith("compressed_tensors"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_compressed_tensors)
    with pytest.raises(ExportError, match=r"pip install -e '\.\[hf\]'"):
        hf(tied_llama[0], tmp_path / "unused", config=CONFIG)


def test_learned_scales_are_written_as_trained(tmp_path):
    """learnable_scales with bfloat16 scales: the checkpoint's weight_scale is the trained
    parameter rounded to bfloat16 (the value the forward used), and transformers computes
    the converted model within the float bound."""
    torch.manual_seed(0)
    prepared = qatfx.prepare_pt2e(CausalLM(CONFIG).train(), weight_only(learnable_scales=True), (tokens(2, 8, VOCAB, 0),))
    qat_steps(prepared, VOCAB, 2)
    trained = qatfx.learned_qparams(prepared)["blocks.0.up_proj.weight_learned_scale"].detach()
    converted = qatfx.convert_pt2e(prepared.eval())
    report = hf(converted, tmp_path / "learned", config=CONFIG)
    assert report.verification.logits.passed
    written = load_file(str(report.path / "model.safetensors"))[hf_name("blocks.0.up_proj.weight").removesuffix(".weight") + ".weight_scale"]
    assert torch.equal(written, trained.to(torch.bfloat16))
