"""qatfx.export.hf: a converted model -> a compressed-tensors "pack-quantized" W4A16 directory
that transformers loads, holding convert's int4 codes and scales bit for bit."""

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
    with pytest.raises(ExportError, match=r"(?s)model\.layers\.0\.self_attn\.qkv_proj: q_proj, v_proj int4 but k_proj float.*skip them all"):
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
        (qatfx.Int8WeightOnlyQuantizer(), "int8 weights"),
        (qatfx.Quantizer(None, QuantSpec(4, PerGroup(GROUP), symmetric=False)), "asymmetric"),
    ],
    ids=["int8", "asymmetric-int4"],
)
def test_weights_off_the_symmetric_int4_grid_are_refused(quantizer, message, tmp_path):
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(CausalLM(CONFIG).eval(), quantizer, (tokens(),)).eval())
    with pytest.raises(ExportError, match=f"model.layers.0.self_attn.q_proj.weight: .*{message}"):
        hf(converted, tmp_path / "refused", config=CONFIG)
    assert not (tmp_path / "refused").exists()


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
