"""A transformers tokenizer directory as a GGUF tokenizer section, written the way llama.cpp's
own converter writes it (conversion/base.py: `_set_vocab_sentencepiece`, `_set_vocab_llama_hf`,
`_set_vocab_gpt2` with `get_vocab_base` / `get_vocab_base_pre`; each family's `set_vocab`),
so that llama.cpp tokenizes as transformers does:

- SentencePiece (`tokenizer.model`) first, with its scores and piece types (Phi-3 and Gemma 3
  with their converters' own rules for added tokens and the space prefix);
- then, for Llama-family models, a Llama-style tokenizer.json (byte fallback, "▁" spaces)
  through gguf-py's LlamaHfVocab;
- then byte-level BPE ("gpt2"), whose pre-tokenizer llama.cpp must know: it is identified as
  the converter does, by hashing the ids of a fixed text (the table in
  gguf_pretokenizers.json is read from the converter by tests/export/pretokenizer_table.py).
  An unknown one is refused: written as "default", llama.cpp would split text otherwise than
  transformers and give other token ids without any error.
"""

from __future__ import annotations

import functools
import json
from hashlib import sha256
from pathlib import Path
from typing import Any

from qatfx.export.gguf_arch import Family
from qatfx.export.verify import ExportError

# llama.cpp's SentencePieceTokenTypes (conversion/base.py), as gguf.TokenType numbers
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPM_PIECE = "\u2581"


@functools.lru_cache(maxsize=1)
def pretokenizer_table() -> dict:
    return json.loads((Path(__file__).with_name("gguf_pretokenizers.json")).read_text(encoding="utf-8"))


def write_tokenizer(gguf, writer, directory: Path, hparams: dict, family: Family) -> str:
    """Write `directory`'s tokenizer; returns the tokenizer model written ("llama", "gpt2")."""
    if not directory.is_dir():
        raise ExportError(f"tokenizer_dir={directory} is not a directory; pass the directory tokenizer.save_pretrained wrote")
    vocab_size = hparams["vocab_size"]
    if family.phi3_converter:
        return _write_phi3(gguf, writer, directory, vocab_size)
    if family.gemma3_converter:  # Gemma3Model.set_vocab
        if (directory / "tokenizer.model").is_file():
            model = _write_sentencepiece(gguf, writer, directory, vocab_size)
            writer.add_add_space_prefix(False)
            return model
        return _write_gpt2(gguf, writer, directory, vocab_size)
    if family.llama_converter:  # LlamaModel.set_vocab
        config = _json(directory / "tokenizer_config.json")
        if config.get("add_prefix_space") is not None:
            writer.add_add_space_prefix(config["add_prefix_space"])
    if (directory / "tokenizer.model").is_file():
        model = _write_sentencepiece(gguf, writer, directory, vocab_size)
    elif family.llama_converter and _is_llama_hf(gguf, directory):
        model = _write_llama_hf(gguf, writer, directory)
    elif (directory / "tokenizer.json").is_file():
        model = _write_gpt2(gguf, writer, directory, vocab_size)
    else:
        raise ExportError(f"{directory}: no tokenizer.model (SentencePiece) or tokenizer.json (BPE) that GGUF can hold")
    if family.llama_converter and vocab_size == 49152:  # LlamaModel.set_vocab: SmolLM's vocabulary adds no BOS
        writer.add_add_bos_token(False)
    return model


def tokenizer_rows(directory: Path, hparams: dict) -> int:
    """How many tokens the tokenizer in `directory` has, as Gemma3Model.modify_tensors counts
    them to cut the embedding: SentencePiece's vocabulary padded to the config's size, or
    tokenizer.json's vocabulary plus its added tokens."""
    if (directory / "tokenizer.model").is_file():
        return len(_sentencepiece_pieces(directory, hparams["vocab_size"])[0])
    tokenizer = _json(directory / "tokenizer.json")
    return len(tokenizer["model"]["vocab"]) + len(tokenizer["added_tokens"])


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _looks_special(token: str) -> bool:
    """TextModel.does_token_look_special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _sentencepiece_pieces(directory: Path, vocab_size: int) -> tuple[list, list, list]:
    """The pieces, scores and types of tokenizer.model up to `vocab_size` ids ([PADi] after),
    with added_tokens.json's tokens as user-defined (_create_vocab_sentencepiece)."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as exc:
        raise ExportError(f"{directory} holds a SentencePiece tokenizer.model; reading it needs the sentencepiece package (pip install sentencepiece)") from exc
    processor = SentencePieceProcessor()
    processor.LoadFromFile(str(directory / "tokenizer.model"))
    vocab_size = vocab_size or processor.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(min(processor.vocab_size(), vocab_size)):
        tokens[i] = processor.IdToPiece(i).encode("utf-8")
        scores[i] = processor.GetScore(i)
        types[i] = (
            UNKNOWN if processor.IsUnknown(i) else CONTROL if processor.IsControl(i)
            else UNUSED if processor.IsUnused(i) else BYTE if processor.IsByte(i) else NORMAL
        )
    for token, i in _json(directory / "added_tokens.json").items():
        if i < vocab_size:
            tokens[i], scores[i], types[i] = token.encode("utf-8"), -1000.0, USER_DEFINED
    return tokens, scores, types


def _add_sentencepiece(gguf, writer, directory: Path, tokens: list, scores: list, types: list) -> str:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(directory, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return "llama"


def _write_sentencepiece(gguf, writer, directory: Path, vocab_size: int) -> str:
    tokens, scores, types = _sentencepiece_pieces(directory, vocab_size)
    vocab_size = len(tokens)
    for key, data in _json(directory / "tokenizer_config.json").get("added_tokens_decoder", {}).items():
        i, token = int(key), data["content"]
        if i >= vocab_size:
            continue
        if data.get("special") or _looks_special(token):
            types[i] = CONTROL
        else:
            token = token.replace(_SPM_PIECE, " ")  # pre-normalized user-defined spaces
            types[i] = USER_DEFINED
        scores[i], tokens[i] = -1000.0, token.encode("utf-8")
    return _add_sentencepiece(gguf, writer, directory, tokens, scores, types)


def _write_phi3(gguf, writer, directory: Path, vocab_size: int) -> str:
    """Phi3MiniModel.set_vocab: byte-level BPE when tokenizer_config says GPT2Tokenizer, else
    SentencePiece whose added tokens (tokenizer_config.json, then tokenizer.json) are typed
    CONTROL when special and USER_DEFINED otherwise, kept as written."""
    config = _json(directory / "tokenizer_config.json")
    if config.get("tokenizer_class") == "GPT2Tokenizer":
        return _write_gpt2(gguf, writer, directory, vocab_size)
    if not (directory / "tokenizer.model").is_file():
        raise ExportError(f"{directory}: no tokenizer.model; a Phi-3 GGUF holds its SentencePiece vocabulary")
    tokens, scores, types = _sentencepiece_pieces(directory, vocab_size)
    added = [(int(key), data) for key, data in config.get("added_tokens_decoder", {}).items()]
    added += [(int(data["id"]), data) for data in _json(directory / "tokenizer.json").get("added_tokens", [])]
    for i, data in added:
        tokens[i], scores[i] = data["content"].encode("utf-8"), -1000.0
        types[i] = CONTROL if data.get("special") else USER_DEFINED
    return _add_sentencepiece(gguf, writer, directory, tokens, scores, types)


def _is_llama_hf(gguf, directory: Path) -> bool:
    """gguf-py's LlamaHfVocab takes a tokenizer.json BPE with byte fallback (Llama 2 / Mistral
    converted to a fast tokenizer) and refuses byte-level ones with a TypeError."""
    try:
        gguf.LlamaHfVocab(directory)
    except (FileNotFoundError, TypeError):
        return False
    return True


def _write_llama_hf(gguf, writer, directory: Path) -> str:
    vocab = gguf.LlamaHfVocab(directory)
    tokens, scores, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    gguf.SpecialVocab(directory, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return "llama"


def _auto_tokenizer(directory: Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ExportError("writing a byte-level BPE tokenizer to GGUF needs transformers (pip install -e '.[gguf]')") from exc
    return AutoTokenizer.from_pretrained(str(directory))


def bpe_pretokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (get_vocab_base_pre)."""
    table = pretokenizer_table()
    digest = sha256(str(tokenizer.encode(table["chktxt"])).encode()).hexdigest()
    name = table["hashes"].get(digest)
    if name is None:
        raise ExportError(
            f"llama.cpp does not know this tokenizer's BPE pre-tokenizer (hash {digest} of llama.cpp's check text): "
            "written as 'default', llama.cpp would split text differently from transformers and produce other token ids. "
            "Use the base model's own tokenizer (its tokenizer.json unchanged), or export without a tokenizer "
            "(tokenizer_dir=None: llama.cpp then takes token ids) and convert the tokenizer with llama.cpp's "
            "convert_hf_to_gguf_update.py once it knows the model"
        )
    return name


def _write_gpt2(gguf, writer, directory: Path, vocab_size: int) -> str:
    """TextModel.get_vocab_base + _set_vocab_gpt2."""
    tokenizer = _auto_tokenizer(directory)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"{directory}: the tokenizer has ids up to {max(vocab.values())}, more than the model's {vocab_size} embeddings")
    pre = bpe_pretokenizer(tokenizer)
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = by_id[i]
        if token in added:
            # llama.cpp expects CONTROL and USER_DEFINED tokens pre-normalized
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(CONTROL)
            else:
                token = token.replace(_SPM_PIECE, " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(directory, load_merges=True).add_to_gguf(writer, quiet=True)
    return "gpt2"
