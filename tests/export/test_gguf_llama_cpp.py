"""llama.cpp itself (llama-cpp-python, built from its PyPI source package) loads the GGUF qatfx
writes, tokenizes with its character vocabulary, and computes the converted model's logits.
Long: the source build takes ~15 minutes on 2 cores (`pip install llama-cpp-python`; README)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qatfx
from qatfx.export.gguf import gguf
from qatfx.recipes.corpus import CharTokenizer
from qatfx.recipes.model import CausalLM, LMConfig
from tests.export.training import qat_steps

pytestmark = pytest.mark.long
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (a source build): pip install llama-cpp-python")

TEXT = "It was the best of times, it was the worst of times; it was the age of wisdom.\n"
CHARS = CharTokenizer.from_text(TEXT)
CONFIG = LMConfig(vocab_size=CHARS.vocab_size, dim=64, layers=2, heads=4, kv_heads=2, hidden=128, tie_embeddings=True)
PROMPTS = ("it was the best", "the age of wisdom", "worst of times; it")


def _logits(path, ids: list) -> torch.Tensor:
    # KV cache in F32 (llama.cpp keeps it in F16 by default, which rounds every K and V)
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=2, verbose=False, type_k=0, type_v=0)
    try:
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    finally:
        llm.close()


def _compare(path, converted) -> tuple[float, float, torch.Tensor]:
    """(relative RMS logit difference, next-token agreement, each position's max |difference|)
    over PROMPTS."""
    got, expected = [], []
    for prompt in PROMPTS:
        ids = CHARS.encode(prompt)
        got.append(_logits(path, ids.tolist()))
        with torch.no_grad():
            expected.append(converted(ids.expand(2, -1))[0])  # the batch of 2 it was captured with
    got, expected = torch.cat(got), torch.cat(expected)
    relative = ((got - expected).norm() / expected.norm()).item()
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    return relative, agreement, (got - expected).abs().amax(-1)


def _converted(quantizer):
    torch.manual_seed(0)
    prepared = qatfx.prepare_pt2e(CausalLM(CONFIG), quantizer, (CHARS.encode(TEXT)[:32].view(2, 16),)).train()
    qat_steps(prepared, CONFIG.vocab_size, steps=3, compiled=True)
    return qatfx.convert_pt2e(prepared.eval())


def test_llama_cpp_tokenizes_with_the_character_vocabulary(tmp_path):
    converted = _converted(qatfx.Int8DynActInt4WeightQuantizer(32, scales_precision=torch.float16))
    path = gguf(converted, tmp_path / "m.gguf", config=CONFIG, vocabulary=CHARS.chars).path
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
    try:
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == CHARS.encode(TEXT).tolist()
    finally:
        llm.close()


def test_8da4w_model_in_llama_cpp(tmp_path):
    """8da4w trains per-token asymmetric activations; llama.cpp quantizes them per 32 as Q8_0,
    and the float table is stored Q8_0: a different activation scheme, not a wrong file."""
    converted = _converted(qatfx.Int8DynActInt4WeightQuantizer(32, scales_precision=torch.float16))
    report = gguf(converted, tmp_path / "m.gguf", config=CONFIG, vocabulary=CHARS.chars)
    relative, agreement, _ = _compare(report.path, converted)
    # measured here: see docs/export_gguf.md; two int8 activation schemes differ by about one
    # activation step per value (~1/255 of the range), far below int4's own error (~10%)
    assert relative < 3e-2 and agreement >= 0.9, (relative, agreement)


def test_llama_cpp_quantizer_model_in_llama_cpp(tmp_path):
    """Trained on llama.cpp's own arithmetic (Q4_0 weights x Q8_0 activations, x86 path) and
    the embedding stored F32: the same integer products on both sides, so what remains is
    float order (RMSNorm, RoPE tables llama.cpp computes itself, softmax, the sums of block
    products) plus the activation codes those ~1e-7 differences move across a rounding edge."""
    converted = _converted(qatfx.LlamaCppQuantizer())
    report = gguf(converted, tmp_path / "m.gguf", config=CONFIG, vocabulary=CHARS.chars, embeddings="f32")
    assert report.differences == []  # nothing but float order differs
    relative, agreement, per_position = _compare(report.path, converted)
    # Float order alone: ~1e-7 on logits of order 1 (measured: 47 of 50 positions within
    # 3e-7). A value within that of a rounding edge takes the neighbouring Q8_0 code in one of
    # the two; such a flip moves its position's logits by ~1e-3 and, through attention, the
    # later positions of that prompt (measured: one flip, 3 positions, relative 7.9e-4).
    assert per_position.median().item() < 1e-6, per_position
    assert relative < 3e-3 and agreement == 1.0, (relative, agreement)


TOKENIZER_FAMILIES = {
    # llama.cpp vocabulary: (config class, model class) of a family that ships it
    "llama-bpe": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "gpt-2": ("LlamaConfig", "LlamaForCausalLM"),
    "llama-spm": ("MistralConfig", "MistralForCausalLM"),
}


@pytest.mark.parametrize("vocab_name", list(TOKENIZER_FAMILIES))
def test_llama_cpp_tokenizes_like_its_own_tests_from_a_qatfx_file(vocab_name, tmp_path):
    """llama.cpp loads the tokenizer qatfx wrote (from a transformers tokenizer rebuilt from
    llama.cpp's vocab file) and tokenizes the vocabulary's test strings to the ids llama.cpp's
    own tokenizer tests expect (test-tokenizer-0: no BOS, special tokens not parsed)."""
    from tests.llama_cpp_sources import llama_cpp_source_or_skip
    from tests.model_zoo import _hf
    from tests.models import tokens
    from tests.vocab_tokenizers import read_vocab, test_cases, tokenizer_dir

    source = llama_cpp_source_or_skip()
    vocab = read_vocab(vocab_name, source)
    config_class, model_class = TOKENIZER_FAMILIES[vocab_name]
    model, _ = _hf(config_class, model_class, vocab_size=len(vocab.tokens), num_hidden_layers=1,
                   bos_token_id=vocab.bos_id, eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id)()
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(32, scales_precision=torch.bfloat16)
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, quantizer, (tokens(2, 8, len(vocab.tokens), 0),), regions="auto").eval())
    path = gguf(converted, tmp_path / "m.gguf", tokenizer_dir=tokenizer_dir(vocab_name, tmp_path / "tok", source), verify=False).path
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        wrong = [(text, ids, llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
                 for text, ids in test_cases(vocab_name, source)]
    finally:
        llm.close()
    assert [w for w in wrong if w[1] != w[2]] == []
