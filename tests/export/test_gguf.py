"""qatfx.export.gguf: a converted Llama -> GGUF whose Q4_0 blocks hold the trained codes and
scales; read back with the gguf package's own dequantizer, every mapped tensor equals the
converted model's, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qatfx
from qatfx import reference
from qatfx.export import ExportError
from qatfx.export.gguf import gguf
from qatfx.export.gguf_arch import family_of, rotary_rows, tensor_namer
from qatfx.export.llama_layout import UnsupportedModel
from qatfx.export.gguf_blocks import q4_0_bytes, q8_0_bytes
from qatfx.export.weights import converted_tensors
from qatfx.recipes.model import CausalLM, LMConfig
from tests.model_zoo import BY_NAME
from tests.export.training import qat_steps
from tests.models import tokens

gguf_package = pytest.importorskip("gguf", reason="the gguf extra: pip install -e '.[gguf]'")
Q4_0 = gguf_package.GGMLQuantizationType.Q4_0

LLAMA_STYLE = LMConfig(vocab_size=96, dim=64, layers=2, heads=4, kv_heads=2, hidden=128, tie_embeddings=True)
FP16_8DA4W = qatfx.Int8DynActInt4WeightQuantizer(32, scales_precision=torch.float16)


def _dequantized(data: np.ndarray, qtype, shape) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf_package.quants.dequantize(data, qtype), dtype=np.float32)).reshape(shape)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_q4_0_blocks_hold_the_codes_and_scales(group_size):
    """gguf's own Q4_0 dequantizer reads q4_0_bytes as codes * scale exactly: nibble order,
    the +8 offset and a group's scale repeated over its 32-blocks."""
    gen = torch.Generator().manual_seed(group_size)
    codes = torch.randint(-8, 8, (6, 256), generator=gen, dtype=torch.int8)
    scales = (torch.rand(6, 256 // group_size, generator=gen) + 0.01).to(torch.float16)
    expected = codes.float() * scales.float().repeat_interleave(group_size, dim=1)
    # exact on any CPU: an fp16 value (11-bit mantissa) times a code in [-8, 7] fits in
    # float32's 24 bits, so numpy's product and torch's are the same float
    assert torch.equal(_dequantized(q4_0_bytes(codes, scales, group_size), Q4_0, codes.shape), expected)


def test_q8_0_blocks_hold_the_codes_and_scales():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (4, 128), generator=gen, dtype=torch.int8)
    scales = torch.rand(4, 1, generator=gen).to(torch.float16)  # per row: one scale for 4 blocks
    expected = codes.float() * scales.float()
    got = _dequantized(q8_0_bytes(codes, scales, 128), gguf_package.GGMLQuantizationType.Q8_0, codes.shape)
    assert torch.equal(got, expected)


def test_rotary_rows_is_convert_hf_to_gguf_permute():
    """llama.cpp's `LlamaModel.permute(weights, n_head, n_head_kv)`, written out in numpy."""
    weights = np.arange(32 * 3).reshape(32, 3)
    heads = 4
    reference = weights.reshape(heads, 2, 32 // heads // 2, 3).swapaxes(1, 2).reshape(32, 3)
    assert np.array_equal(rotary_rows(torch.from_numpy(weights), heads).numpy(), reference)
    assert sorted(rotary_rows(torch.arange(32), heads).tolist()) == list(range(32))  # a permutation


def test_tensor_names_are_llama_cpps():
    """Names come from gguf-py's table for the family's architecture; what it lacks is refused."""
    import gguf as gguf_py

    llama = {"model_type": "llama", "num_hidden_layers": 4}
    name = tensor_namer(gguf_py, llama, family_of(llama))
    assert name("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
    assert name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    assert name("model.embed_tokens.weight") == "token_embd.weight"
    assert name("lm_head.weight") == "output.weight"
    qwen3 = {"model_type": "qwen3", "num_hidden_layers": 2}
    name = tensor_namer(gguf_py, qwen3, family_of(qwen3))
    assert name("model.layers.1.self_attn.k_norm.weight") == "blk.1.attn_k_norm.weight"
    assert name("model.layers.0.self_attn.v_proj.bias") == "blk.0.attn_v.bias"
    with pytest.raises(UnsupportedModel, match="model.layers.2.mlp.up_proj.weight has no tensor"):
        name("model.layers.2.mlp.up_proj.weight")  # past the config's block count
    with pytest.raises(UnsupportedModel, match=r"model_type 'bert' has no GGUF export here; supported: gemma3_text, llama, mistral, phi3, qwen2, qwen3"):
        family_of({"model_type": "bert"})


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory):
    """The demo's model family, tied embeddings, GQA, trained two QAT steps in fp16 scales
    (eager: the compiled path is the long llama.cpp test's)."""
    torch.manual_seed(0)
    model = CausalLM(LLAMA_STYLE)
    prepared = qatfx.prepare_pt2e(model, FP16_8DA4W, (tokens(2, 8, 96),)).train()
    qat_steps(prepared, 96)
    converted = qatfx.convert_pt2e(prepared.eval())
    vocabulary = [chr(32 + i) for i in range(95)]
    report = gguf(converted, tmp_path_factory.mktemp("gguf") / "model.gguf", config=LLAMA_STYLE, vocabulary=vocabulary)
    return model, converted, report


def test_every_linear_is_q4_0_with_the_trained_grid(llama_style):
    _, converted, report = llama_style
    assert report.quantized_layers == 15 and report.rounded == {}
    types = report.tensor_types
    assert types["output.weight"] == "Q4_0"  # the head is a quantized linear; the float table is tied to it
    assert types["token_embd.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    assert sum(t == "Q4_0" for t in types.values()) == 15
    # everything but the Q8_0 embedding read back and compared bit for bit inside gguf()
    assert report.verified == len(types) - 1
    assert report.bytes == report.path.stat().st_size


def test_read_back_q_proj_is_converts_codes_in_llama_cpp_row_order(llama_style):
    """Independently of the exporter's own check: un-permute blk.0.attn_q and compare with the
    converted model's dequantized weight."""
    _, converted, report = llama_style
    reader = gguf_package.GGUFReader(str(report.path))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    weight = converted_tensors(converted).quantized["blocks.0.q_proj.weight"]
    got = _dequantized(tensor.data, tensor.tensor_type, weight.shape)
    assert torch.equal(got, rotary_rows(weight.dequantized(), LLAMA_STYLE.heads))
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == 2
    assert int(fields["llama.block_count"].parts[-1][0]) == 2


def test_the_report_names_what_llama_cpp_computes_differently(llama_style):
    _, _, report = llama_style
    assert any("Q8_0" in d and "LlamaCppQuantizer" in d for d in report.differences)  # 8da4w activations
    assert any("token_embd.weight" in d for d in report.differences)  # the float table, stored Q8_0


@pytest.mark.parametrize("regions", ["auto", None], ids=["region_capture", "whole_graph"])
def test_hf_llama_exports_verified(tmp_path, regions):
    model, vocab = BY_NAME["hf_llama"].build()
    ids = tokens(2, 8, vocab, 0)
    kwargs = {"regions": "auto"} if regions else {"example_kwargs": {"use_cache": False}}
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, FP16_8DA4W, (ids,), **kwargs).eval())
    config = None if regions else model.config  # a whole-graph capture carries no config
    report = gguf(converted, tmp_path / "hf.gguf", config=config, embeddings="f16")
    assert report.quantized_layers == 15 and report.tensor_types["token_embd.weight"] == "F16"
    assert report.verified == len(report.tensor_types) - 1  # all but the f16 table


def test_unmappable_layers_are_named_and_rounding_is_reported(tmp_path):
    model = CausalLM(LLAMA_STYLE)
    fp32 = qatfx.Int8DynActInt4WeightQuantizer(32)  # float32 scales: fp16 rounds most of them
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, fp32, (tokens(2, 8, 96),)).eval())
    with pytest.raises(ExportError, match=r"(?s)blocks\.0\.q_proj\.weight: \d+ of \d+ float32 scales are not fp16 values.*allow_rounding=True"):
        gguf(converted, tmp_path / "r.gguf", config=LLAMA_STYLE)
    assert not (tmp_path / "r.gguf").exists()
    report = gguf(converted, tmp_path / "r.gguf", config=LLAMA_STYLE, allow_rounding=True)
    assert report.quantized_layers == 0 and len(report.rounded) == 15
    assert report.verified == 20  # the rounded grids too: trained codes x fp16(scale), read back exactly
    weight = converted_tensors(converted).quantized["blocks.0.up_proj.weight"]
    reason, moved = report.rounded["blk.0.ffn_up.weight"]
    assert "codes kept, scales rounded to fp16" in reason
    rounded = reference.dequantize(weight.codes, weight.scales.half(), None, 32, torch.float32)
    assert moved == int((rounded != weight.dequantized()).sum()) > 0

    g16 = qatfx.Int8DynActInt4WeightQuantizer(16, scales_precision=torch.float16)
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, g16, (tokens(2, 8, 96),)).eval())
    with pytest.raises(ExportError, match="group size 16 is not a multiple of 32"):
        gguf(converted, tmp_path / "g.gguf", config=LLAMA_STYLE)
    report = gguf(converted, tmp_path / "g.gguf", config=LLAMA_STYLE, allow_rounding=True)
    reason, moved = report.rounded["blk.0.attn_q.weight"]
    assert "requantized with llama.cpp's Q4_0 quantizer" in reason and moved > 0 and report.verified == 20


def test_bfloat16_scales_are_fp16_values(tmp_path):
    """bf16's 8-bit mantissa fits in fp16's 11 bits: a model trained for ExecuTorch (bf16
    scales) maps to Q4_0 exactly while its scales stay in fp16's normal range (>= 2^-14)."""
    model = CausalLM(LLAMA_STYLE)
    bf16 = qatfx.Int8DynActInt4WeightQuantizer(32, scales_precision=torch.bfloat16)
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, bf16, (tokens(2, 8, 96),)).eval())
    scales = [w.scales for w in converted_tensors(converted).quantized.values()]
    assert all(s.dtype == torch.bfloat16 and float(s.min()) >= 2**-14 for s in scales)
    report = gguf(converted, tmp_path / "bf16.gguf", config=LLAMA_STYLE)
    assert report.quantized_layers == 15 and report.rounded == {} and report.verified == 20


def test_models_it_cannot_write_are_refused(tmp_path):
    model = CausalLM(LLAMA_STYLE)
    prepared = qatfx.prepare_pt2e(model, FP16_8DA4W, (tokens(2, 8, 96),))
    with pytest.raises(ExportError, match="convert it first"):
        gguf(prepared, tmp_path / "p.gguf", config=LLAMA_STYLE)
    converted = qatfx.convert_pt2e(prepared.eval())
    assert converted.config == model.config  # a whole capture keeps it: no config= needed
    biased = LMConfig(vocab_size=96, dim=64, layers=2, hidden=128, o_proj_bias=True)
    with pytest.raises(ExportError, match="o_proj_bias=False"):
        gguf(converted, tmp_path / "b.gguf", config=biased)
    three_layers = LMConfig(vocab_size=96, dim=64, layers=3, heads=4, kv_heads=2, hidden=128, tie_embeddings=True)
    with pytest.raises(ExportError, match=r"lacks tensors its config \(3 layers\) implies: model\.layers\.2\..*is config= this model's"):
        gguf(converted, tmp_path / "l.gguf", config=three_layers)
    with pytest.raises(ValueError, match="embeddings='q4'"):
        gguf(converted, tmp_path / "e.gguf", config=LLAMA_STYLE, embeddings="q4")
    assert not list(tmp_path.iterdir())


def byte_level_bpe(directory, text: str, vocab_size: int = 300):
    """A GPT-2-style byte-level BPE tokenizer trained on `text` (no download), saved as
    transformers saves one."""
    import tokenizers
    import transformers

    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tokenizer.train_from_iterator([text] * 4, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


BPE_TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness. " * 3


def test_an_unknown_bpe_pretokenizer_is_refused(tmp_path):
    """A byte-level BPE whose pre-tokenizer llama.cpp does not know (a tokenizer trained here)
    is refused, as llama.cpp's converter refuses it: written as "default" it would tokenize
    otherwise in llama.cpp. Real vocabularies: tests/export/test_gguf_reference.py."""
    tokenizer = byte_level_bpe(tmp_path / "tok", BPE_TEXT)
    vocab = len(tokenizer) + 4
    model, _ = _hf_llama(vocab)
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, FP16_8DA4W, (tokens(2, 8, vocab),), regions="auto").eval())
    with pytest.raises(ExportError, match=r"(?s)does not know this tokenizer's BPE pre-tokenizer.*tokenizer_dir=None"):
        gguf(converted, tmp_path / "bpe.gguf", tokenizer_dir=tmp_path / "tok")
    with pytest.raises(ExportError, match="more than the model's 8 embeddings"):
        model, _ = _hf_llama(8)
        small = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, FP16_8DA4W, (tokens(2, 8, 8),), regions="auto").eval())
        gguf(small, tmp_path / "small.gguf", tokenizer_dir=tmp_path / "tok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # nothing half-written


def _hf_llama(vocab: int):
    from tests.model_zoo import _hf

    return _hf("LlamaConfig", "LlamaForCausalLM", vocab_size=vocab)()


def test_missing_gguf_names_the_extra(monkeypatch, llama_style):
    import builtins

    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf" or name.startswith("gguf."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(ExportError, match=r"pip install -e '\.\[gguf\]'"):
        gguf(llama_style[1], "unused.gguf", config=LLAMA_STYLE)


# ---- per-layer schemes ----------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_llama_cpp_preset_writes_q4_0_body_and_q8_0_output_and_embeddings_from_the_trained_codes(tmp_path, tie):
    """llama_cpp_q4_0: every body linear Q4_0, output.weight and token_embd.weight Q8_0, all
    from convert's codes and fp16 scales (d = s per block of 32), read back bit for bit."""
    config = LMConfig(vocab_size=96, dim=64, layers=2, heads=4, kv_heads=2, hidden=128, tie_embeddings=tie)
    torch.manual_seed(1)
    prepared = qatfx.prepare_pt2e(CausalLM(config), qatfx.presets.llama_cpp_q4_0(), (tokens(2, 8, 96),)).train()
    qat_steps(prepared, 96)
    converted = qatfx.convert_pt2e(prepared.eval())
    report = gguf(converted, tmp_path / "mixed.gguf", config=config)
    types = report.tensor_types
    assert sum(t == "Q4_0" for t in types.values()) == 14 and types["token_embd.weight"] == "Q8_0"
    assert report.rounded == {} and report.verified == len(types)  # every tensor exact, the Q8_0 ones too
    if tie:
        assert "output.weight" not in types  # llama.cpp reads the tied table for the output
        assert report.quantized_layers == 15  # 14 body linears + the shared table
    else:
        assert types["output.weight"] == "Q8_0" and report.quantized_layers == 16
    reader = gguf_package.GGUFReader(str(report.path))
    table = next(t for t in reader.tensors if t.name == "token_embd.weight")
    weight = converted_tensors(converted).quantized["embed.weight" if not tie else "lm_head.weight"]
    assert torch.equal(_dequantized(table.data, table.tensor_type, weight.shape), weight.dequantized())
    assert not any("LlamaCppQuantizer" in d for d in report.differences)  # Q8_0 activations trained as llama.cpp runs them


def test_per_channel_int8_layers_are_q8_0_when_their_scales_are_fp16_values(tmp_path):
    """An 8da8w lm_head has one scale per row: each of the row's blocks of 32 gets d = s, exact
    when s is an fp16 value. With float32 scales (executorch_llama's) the export names the
    layers; allow_rounding keeps the codes and rounds the scales."""
    config = LMConfig(vocab_size=96, dim=64, layers=1, heads=4, hidden=128)
    fp16_head = qatfx.MixedQuantizer(
        [("lm_head", qatfx.Int8DynActInt8WeightQuantizer(scales_precision=torch.float16))], default=FP16_8DA4W
    )
    model = CausalLM(config)
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, fp16_head, (tokens(2, 8, 96),)).eval())
    report = gguf(converted, tmp_path / "q8.gguf", config=config)
    assert report.tensor_types["output.weight"] == "Q8_0" and report.rounded == {}
    assert report.verified == len(report.tensor_types) - 1  # all but the float embedding table, stored Q8_0 by choice

    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, qatfx.presets.executorch_llama(), (tokens(2, 8, 96),)).eval())
    with pytest.raises(ExportError, match=r"(?s)embed\.weight: 96 of 96 float32 scales are not fp16 values.*lm_head\.weight: 96 of 96"):
        gguf(converted, tmp_path / "et.gguf", config=config)
    assert not (tmp_path / "et.gguf").exists()
    report = gguf(converted, tmp_path / "et.gguf", config=config, allow_rounding=True)
    assert "codes kept, scales rounded to fp16" in report.rounded["output.weight"][0]


def test_learned_scales_are_written_as_trained(tmp_path):
    """learnable_scales: the Q4_0 / Q8_0 blocks hold the trained fp16 scales, not the rule's:
    the forward rounded them to fp16, so the file is the trained grid with nothing rounded,
    and gguf's dequantizer reads back the converted model's weights bit for bit."""
    torch.manual_seed(1)
    quantizer = qatfx.presets.llama_cpp_q4_0().with_learnable_scales()
    prepared = qatfx.prepare_pt2e(CausalLM(LLAMA_STYLE), quantizer, (tokens(2, 8, 96),)).train()
    start = {n: p.detach().clone() for n, p in qatfx.learned_qparams(prepared).items()}
    qat_steps(prepared, 96)
    trained = qatfx.learned_qparams(prepared)["blocks.0.q_proj.weight_learned_scale"].detach()
    assert not torch.equal(trained, start["blocks.0.q_proj.weight_learned_scale"])
    converted = qatfx.convert_pt2e(prepared.eval())
    report = gguf(converted, tmp_path / "learned.gguf", config=LLAMA_STYLE)
    assert report.rounded == {} and report.verified == len(report.tensor_types)
    reader = gguf_package.GGUFReader(str(report.path))
    q_proj = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    weight = converted_tensors(converted).quantized["blocks.0.q_proj.weight"]
    read_back = _dequantized(q_proj.data, q_proj.tensor_type, (64, 64))
    # llama.cpp's q rows are permuted for its RoPE layout; the set of block scales is not
    d = torch.from_numpy(np.frombuffer(q_proj.data.tobytes(), dtype=np.uint8).reshape(-1, 18)[:, :2].copy().view(np.float16).astype(np.float32)).flatten()
    assert sorted(d.tolist()) == sorted(trained.to(torch.float16).float().flatten().tolist())
    assert torch.equal(torch.sort(read_back.flatten()).values, torch.sort(weight.dequantized().flatten()).values)
