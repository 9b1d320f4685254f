"""qatfx's GGUF files against llama.cpp's own converter, family by family, with real tokenizer
vocabularies rebuilt from llama.cpp's ggml-vocab files (tests/vocab_tokenizers.py).

Each case: a transformers model from its config (small dimensions, the family's real vocabulary
size), 8da4w int4 g32 with bfloat16 scales (fp16 holds them: an exact Q4_0 grid), two QAT
steps, convert, then qatfx.export.gguf beside the converter's file for the same model with its
quantized weights replaced by their fake-quantized values (tests/export/gguf_reference.py):
same metadata but the file's own name and type, same tensors, every value bit for bit.

The default run takes one byte-level BPE family (Llama 3.2 layout, tied, llama3 RoPE) and one
SentencePiece family (Mistral), ~30 s each; Phi-3 (fused projections, its own converter),
Gemma 3 (norms stored as 1 + w, its own keys) and each family with its own real vocabulary
are in the long run (reading a 128k-150k vocabulary file alone takes 15-40 s here).
"""

from __future__ import annotations

import pytest
import torch

import qatfx
from qatfx.export import ExportError
from tests.export.gguf_reference import differences, reference_gguf, tensor_types
from tests.export.training import qat_steps
from tests.llama_cpp_sources import llama_cpp_source_or_skip
from tests.model_zoo import LLAMA3_ROPE, _hf
from tests.models import tokens

gguf_py = pytest.importorskip("gguf", reason="the gguf extra: pip install -e '.[gguf]'")
pytest.importorskip("sentencepiece", reason="the test extra (SentencePiece vocabularies)")

PHI3_LONGROPE = {"rope_type": "longrope", "long_factor": [1.0 + i / 8 for i in range(8)], "short_factor": [1.0 + i / 16 for i in range(8)]}
CASES = {
    # name: (config class, model class, llama.cpp vocabulary, config overrides, in the default run)
    "llama3_2-gpt2": ("LlamaConfig", "LlamaForCausalLM", "gpt-2", dict(tie_word_embeddings=True, **LLAMA3_ROPE), True),
    "mistral-spm": ("MistralConfig", "MistralForCausalLM", "llama-spm", dict(sliding_window=None), True),
    "llama3_2": ("LlamaConfig", "LlamaForCausalLM", "llama-bpe", dict(tie_word_embeddings=True, **LLAMA3_ROPE), False),
    "llama3_1": ("LlamaConfig", "LlamaForCausalLM", "llama-bpe", dict(LLAMA3_ROPE), False),
    "qwen2_5": ("Qwen2Config", "Qwen2ForCausalLM", "qwen2", dict(tie_word_embeddings=True), False),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen2", dict(tie_word_embeddings=True), False),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "phi-3", {}, False),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "llama-spm", dict(tie_word_embeddings=True, sliding_window=4), False),
    "phi3_longrope": ("Phi3Config", "Phi3ForCausalLM", "phi-3", dict(original_max_position_embeddings=32, rope_scaling=PHI3_LONGROPE), False),
}
QUANTIZER = qatfx.Int8DynActInt4WeightQuantizer(32, scales_precision=torch.bfloat16)


@pytest.fixture(scope="module")
def llama_cpp():
    return llama_cpp_source_or_skip()


def _params(default_only: bool = False):
    return [pytest.param(name, marks=() if case[-1] else pytest.mark.long) for name, case in CASES.items() if case[-1] or not default_only]


@pytest.mark.parametrize("case", _params())
def test_the_file_is_the_converters_with_the_trained_grid(case, llama_cpp, tmp_path):
    from tests.vocab_tokenizers import read_vocab, tokenizer_dir

    config_class, model_class, vocab_name, overrides, _ = CASES[case]
    vocab = read_vocab(vocab_name, llama_cpp)
    ids = dict(bos_token_id=vocab.bos_id, eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id)
    model, _ = _hf(config_class, model_class, vocab_size=len(vocab.tokens), use_cache=True, **ids, **overrides)()
    prepared = qatfx.prepare_pt2e(model.train(), QUANTIZER, (tokens(2, 8, len(vocab.tokens), 0),), regions="auto")
    qat_steps(prepared, len(vocab.tokens))
    converted = qatfx.convert_pt2e(prepared.eval())
    tokenizer = tokenizer_dir(vocab_name, tmp_path / "tokenizer", llama_cpp)

    ours = qatfx.export.gguf(converted, tmp_path / "qatfx.gguf", embeddings="f32", output="f32", tokenizer_dir=tokenizer)
    reference = reference_gguf(llama_cpp, model, converted, tokenizer, tmp_path)
    assert differences(ours.path, reference) == []
    quantized = [r for r in qatfx.summary(converted).quantized if r.op != "embedding"]
    assert ours.quantized_layers == len(quantized) and ours.rounded == {}
    assert sum(kind == "Q4_0" for kind in tensor_types(ours.path).values()) == len(quantized)


def test_a_family_llama_cpps_converter_does_not_write_is_refused(tmp_path):
    """A model_type without a GGUF family here is refused before anything is written, naming
    the families and the other targets."""
    model, vocab = _hf("GPT2Config", "GPT2LMHeadModel", n_embd=64, n_layer=1, n_head=4)()
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, QUANTIZER, (tokens(2, 8, vocab, 0),), regions="auto").eval())
    with pytest.raises(ExportError, match=r"model_type 'gpt2' has no GGUF export here; supported: gemma3_text, llama, mistral, phi3, qwen2, qwen3.*qatfx\.export\.hf"):
        qatfx.export.gguf(converted, tmp_path / "gpt2.gguf")
    assert not list(tmp_path.iterdir())


def test_the_shipped_pretokenizer_table_is_the_converters(llama_cpp):
    """qatfx names a BPE pre-tokenizer from a table read off llama.cpp's converter; it must be
    the converter's, check text and hashes (regenerate: tests/export/pretokenizer_table.py)."""
    from qatfx.export.gguf_vocab import pretokenizer_table
    from tests.export.pretokenizer_table import read_table

    shipped, converter = pretokenizer_table(), read_table(llama_cpp)
    assert shipped["chktxt"] == converter["chktxt"] and shipped["hashes"] == converter["hashes"]
    assert {"llama-bpe", "qwen2", "gpt-2", "smollm"} <= set(shipped["hashes"].values())
