"""Transformers tokenizer directories rebuilt from llama.cpp's tokenizer test vocabularies.

llama.cpp ships real models' tokenizers without their weights, as its converter wrote them
(`models/ggml-vocab-<name>.gguf`), with test strings (`.inp`) and the ids transformers gave for
them (`.out`: convert_hf_to_gguf_update.py wrote them with `encode(text, add_special_tokens=False)`;
tests/test-tokenizer-0 holds llama.cpp to them). Rebuilding the transformers tokenizer from the
GGUF gives the tests real vocabularies (Llama 2 and 3 among them) with no Hub download or gated
model, and two checks of the rebuild: it encodes the `.inp` strings to the `.out` ids, and
llama.cpp's converter takes it back to the same GGUF tokenizer.

The rebuild inverts the converter (conversion/base.py, get_vocab_base and
_create_vocab_sentencepiece):

- byte-level BPE (tokenizer.ggml.model "gpt2": llama-bpe, qwen2, gpt-2): the vocabulary and
  merges are in the GGUF; the pre-tokenizer is not (only its llama.cpp name, tokenizer.ggml.pre),
  so each family's is copied from its tokenizer.json on the Hub (_BYTE_LEVEL_FAMILIES). The
  converter names it again by hashing the ids of a fixed text: a wrong pipeline is refused there.
- SentencePiece BPE ("llama": llama-spm, phi-3): tokens, scores and piece types become a
  `tokenizer.model` protobuf (what the converter reads for these families) and a tokenizer.json
  with Llama's legacy pipeline (see _sentencepiece_bpe).
- CONTROL tokens become special added tokens, USER_DEFINED ones non-special added tokens, as the
  converter maps them (special, or looking special -> CONTROL; other added tokens -> USER_DEFINED).
- "[PAD<id>]" tokens are dropped: the converter pads the vocabulary to config.json's vocab_size
  with them, so a model config with vocab_size=len(tokens) brings them back.

The directory is what the installed transformers' save_pretrained writes (tokenizer.json,
tokenizer_config.json, chat_template.jinja where the GGUF has a template), loaded as the generic
tokenizers-backed class: transformers 5's family classes (LlamaTokenizer, Qwen2Tokenizer) rebuild
their own pipeline from the vocabulary instead of the one in tokenizer.json.

Reading a GGUF takes gguf's GGUFReader 15-30 s for llama-bpe or qwen2 (a numpy memmap view per
string), so each file is read once per process; build directories once per session (a session
fixture).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.llama_cpp_sources import llama_cpp_source

VOCABS = ("llama-bpe", "qwen2", "gpt-2", "llama-spm", "phi-3")
# tokenizer.ggml.pre that convert_hf_to_gguf.py writes for each rebuilt tokenizer: BPE families it
# identifies by hashing (get_vocab_base_pre), SentencePiece ones are always "default".
EXPECTED_PRE = {"llama-bpe": "llama-bpe", "qwen2": "qwen2", "gpt-2": "gpt-2", "llama-spm": "default", "phi-3": "default"}

# gguf.TokenType, the same numbers as SentencePiece's piece types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "\u2581"  # SentencePiece's visible space
# test-tokenizer-0.cpp read_tests: the .inp cases are separated (and ended) by this line
_CASE_SEPARATOR = "\n__ggml_vocab_test__\n"


@dataclass(frozen=True)
class _ByteLevelFamily:
    """A byte-level BPE family's pipeline, from its tokenizer.json on the Hub, that the GGUF keeps
    only by name (tokenizer.ggml.pre)."""

    split: str | None  # regex of the Split before ByteLevel; None: GPT-2's regex built into ByteLevel
    nfc: bool = False  # an NFC normalizer first
    ignore_merges: bool = False  # a pre-token found whole in the vocabulary is not merged up
    add_bos: bool = False  # encoding prepends BOS (where the GGUF does not say)


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL_FAMILIES = {
    "llama-bpe": _ByteLevelFamily(_LLAMA3_SPLIT, ignore_merges=True, add_bos=True),  # meta-llama/Meta-Llama-3-8B
    "qwen2": _ByteLevelFamily(_QWEN2_SPLIT, nfc=True),  # Qwen/Qwen1.5-7B
    "gpt-2": _ByteLevelFamily(None),  # openai-community/gpt2
}


@dataclass(frozen=True)
class Vocab:
    """A GGUF vocabulary: its general.architecture and tokenizer.ggml.* metadata."""

    architecture: str
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    scores: tuple[float, ...]  # SentencePiece only; () for BPE
    merges: tuple[str, ...]  # BPE only, "left right"
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    @functools.cached_property
    def n_base(self) -> int:
        """How many tokens the tokenizer model itself holds: the converter writes added tokens and
        padding after them, so the last NORMAL or BYTE token ends them."""
        return 1 + max(i for i, kind in enumerate(self.token_types) if kind in (NORMAL, BYTE))

    def is_padding(self, token_id: int) -> bool:
        """A "[PAD<id>]" the converter filled the vocabulary up with (typed UNUSED by today's
        converter, USER_DEFINED or UNKNOWN in these files, which older converters wrote)."""
        return token_id >= self.n_base and self.tokens[token_id] == f"[PAD{token_id}]"


# ------------------------------------------------------------------------------------ reading
def vocab_path(name: str, source: Path | None = None) -> Path:
    """models/ggml-vocab-<name>.gguf of llama.cpp's sources (default: llama_cpp_source())."""
    path = Path(source or llama_cpp_source()) / "models" / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no llama.cpp vocabulary {name!r} (this module rebuilds {', '.join(VOCABS)})")
    return path


def read_vocab(name: str, source: Path | None = None) -> Vocab:
    """The vocabulary `name` as its GGUF holds it (read once per process: see the module doc)."""
    return _read_gguf(vocab_path(name, source).resolve())


@functools.lru_cache(maxsize=len(VOCABS))
def _read_gguf(path: Path) -> Vocab:
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key: str, default: Any = None) -> Any:
        field = reader.get_field(key)
        return default if field is None else field.contents()

    prefix = "tokenizer.ggml."
    return Vocab(
        architecture=value("general.architecture"),
        model=value(prefix + "model"),
        pre=value(prefix + "pre"),
        tokens=tuple(value(prefix + "tokens")),
        token_types=tuple(value(prefix + "token_type")),
        scores=tuple(value(prefix + "scores", ())),
        merges=tuple(value(prefix + "merges", ())),
        bos_id=value(prefix + "bos_token_id"),
        eos_id=value(prefix + "eos_token_id"),
        unk_id=value(prefix + "unknown_token_id"),
        pad_id=value(prefix + "padding_token_id"),
        add_bos=value(prefix + "add_bos_token"),
        add_eos=value(prefix + "add_eos_token"),
        add_space_prefix=value(prefix + "add_space_prefix"),
        chat_template=value("tokenizer.chat_template"),
    )


def test_cases(name: str, source: Path | None = None) -> list[tuple[str, list[int]]]:
    """The (text, ids) cases of ggml-vocab-<name>.gguf.inp/.out, parsed as test-tokenizer-0.cpp
    does. The ids are transformers' `encode(text, add_special_tokens=False)`: no BOS."""
    path = vocab_path(name, source)
    texts = _split_cases(Path(f"{path}.inp").read_bytes().decode("utf-8"))
    lines = Path(f"{path}.out").read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":  # the final newline ends the last line; it starts none
        lines.pop()
    if len(lines) != len(texts):
        raise ValueError(f"{path}: {len(texts)} .inp cases but {len(lines)} .out lines")
    return [(text, [int(token) for token in line.split()]) for text, line in zip(texts, lines)]


# a helper, not a test: pytest would collect it from a test module that imports it by name
test_cases.__test__ = False


def _split_cases(raw: str) -> list[str]:
    """Each case is followed by the separator, so the piece after the last one is empty, not a case."""
    cases = raw.split(_CASE_SEPARATOR)
    if cases[-1] == "":
        cases.pop()
    return cases


# ----------------------------------------------------------------------------------- building
def tokenizer_dir(name: str, out_dir: Path | str, source: Path | None = None) -> Path:
    """Write the transformers tokenizer of vocabulary `name` to `out_dir` (created if needed; empty
    or a model's directory) as save_pretrained does, plus `tokenizer.model` for SentencePiece
    vocabularies; returns out_dir.

    A model saved to the same directory needs config vocab_size=len(read_vocab(name).tokens)
    for the converter to give back the GGUF's vocabulary, padding included.
    """
    vocab = read_vocab(name, source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if vocab.model == "gpt2":
        backend = _byte_level_bpe(vocab)
    elif vocab.model == "llama":
        backend = _sentencepiece_bpe(vocab)
        (out / "tokenizer.model").write_bytes(_sentencepiece_model(vocab))
    else:
        raise ValueError(f"{name}: tokenizer.ggml.model {vocab.model!r} is neither byte-level BPE (gpt2) nor SentencePiece (llama)")
    _add_tokens(backend, vocab)
    _save(backend, vocab, out)
    return out


def _byte_level_bpe(vocab: Vocab):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    family = _BYTE_LEVEL_FAMILIES.get(vocab.pre)
    if family is None:
        raise ValueError(f"no pre-tokenizer known for tokenizer.ggml.pre={vocab.pre!r} (known: {', '.join(_BYTE_LEVEL_FAMILIES)})")
    merges = [tuple(merge.split(" ", 1)) for merge in vocab.merges]
    tokenizer = Tokenizer(models.BPE(vocab=_base_vocab(vocab), merges=merges, ignore_merges=family.ignore_merges))
    if family.nfc:
        tokenizer.normalizer = normalizers.NFC()
    if family.split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(family.split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(vocab: Vocab):
    """Llama's tokenizer.json (Llama 2, Phi-3): every text gets SentencePiece's dummy-prefix "▁"
    (a Prepend normalizer). Transformers 5's LlamaTokenizer uses a Metaspace pre-tokenizer instead,
    which adds none before a leading space: " Hello" gives [▁Hello], not llama.cpp's [▁, ▁Hello]
    (that class passes 31 of llama-spm's 46 cases, this pipeline all 46)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    prefix = vocab.add_space_prefix is not False
    model = models.BPE(vocab=_base_vocab(vocab), merges=_sentencepiece_merges(vocab),
                       unk_token=vocab.tokens[vocab.unk_id], fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(model)
    replace = normalizers.Replace(" ", _SPACE)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), replace]) if prefix else replace
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if prefix else steps)
    return tokenizer


def _base_vocab(vocab: Vocab) -> dict[str, int]:
    return {token: token_id for token_id, token in enumerate(vocab.tokens[: vocab.n_base])}


def _sentencepiece_merges(vocab: Vocab) -> list[tuple[str, str]]:
    """BPE merges that replay SentencePiece's: it joins the adjacent pair whose joined piece
    scores highest (leftmost first on ties), so a merge ranks by its piece's score."""
    normal = {token: token_id for token_id, token in enumerate(vocab.tokens[: vocab.n_base])
              if vocab.token_types[token_id] == NORMAL}
    ranked = []
    for piece, piece_id in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-vocab.scores[piece_id], piece_id, normal[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_model(vocab: Vocab) -> bytes:
    """The tokenizer.model protobuf: the base pieces with their scores and llama.cpp's types
    (the unknown token as UNKNOWN), BPE with byte fallback, Llama's identity normalizer."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    for token_id, token in enumerate(vocab.tokens[: vocab.n_base]):
        kind = UNKNOWN if token_id == vocab.unk_id else vocab.token_types[token_id]
        proto.pieces.add(piece=token, score=vocab.scores[token_id] if kind == NORMAL else 0.0, type=kind)
    spec = proto.trainer_spec
    spec.model_type = model_pb2.TrainerSpec.BPE
    spec.vocab_size = vocab.n_base
    spec.byte_fallback = BYTE in vocab.token_types
    # the pieces these ids name; -1 (none) where the GGUF's id is an added token past the model
    for role, token_id in (("unk", vocab.unk_id), ("bos", vocab.bos_id), ("eos", vocab.eos_id), ("pad", vocab.pad_id)):
        inside = token_id is not None and token_id < vocab.n_base
        setattr(spec, f"{role}_id", token_id if inside else -1)
        if inside:
            setattr(spec, f"{role}_piece", vocab.tokens[token_id])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = vocab.add_space_prefix is not False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def _adds_bos_eos(vocab: Vocab) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS: the GGUF's flags, else llama.cpp's defaults
    (llama-vocab.cpp): BOS for SentencePiece and for Llama 3's pre-tokenizer, never EOS."""
    family = _BYTE_LEVEL_FAMILIES.get(vocab.pre)
    default_bos = vocab.model == "llama" or (family is not None and family.add_bos)
    return (default_bos if vocab.add_bos is None else vocab.add_bos), bool(vocab.add_eos)


def _add_tokens(tokenizer, vocab: Vocab) -> None:
    """Register the GGUF's CONTROL / UNKNOWN (special) and USER_DEFINED (not special) tokens as
    added tokens, in id order, so each keeps its GGUF id; padding must come last and is dropped."""
    from tokenizers import AddedToken

    padding = [token_id for token_id in range(len(vocab.tokens)) if vocab.is_padding(token_id)]
    if padding and padding != list(range(padding[0], len(vocab.tokens))):
        raise ValueError(f"the [PAD<id>] tokens are not the vocabulary's last ones (first at {padding[0]})")
    end = padding[0] if padding else len(vocab.tokens)
    for token_id in range(end):
        kind = vocab.token_types[token_id]
        if kind not in (UNKNOWN, CONTROL, USER_DEFINED):
            continue
        content = vocab.tokens[token_id]
        token = AddedToken(content, special=kind != USER_DEFINED, normalized=False)
        (tokenizer.add_tokens if kind == USER_DEFINED else tokenizer.add_special_tokens)([token])
        if tokenizer.token_to_id(content) != token_id:  # a gap or a duplicate before it
            raise ValueError(f"added token {content!r} got id {tokenizer.token_to_id(content)}, not its GGUF id {token_id}")


def _save(tokenizer, vocab: Vocab, out: Path) -> None:
    """save_pretrained through transformers' generic tokenizers-backed class, with the GGUF's
    special tokens, BOS / EOS flags (transformers turns them into tokenizer.json's post-processor,
    where the converter reads them back) and chat template."""
    from transformers import PreTrainedTokenizerFast

    roles = {"bos_token": vocab.bos_id, "eos_token": vocab.eos_id, "unk_token": vocab.unk_id, "pad_token": vocab.pad_id}
    named = {role: vocab.tokens[token_id] for role, token_id in roles.items() if token_id is not None}
    add_bos, add_eos = _adds_bos_eos(vocab)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False,
                                      add_bos_token=add_bos, add_eos_token=add_eos, **named)
    if vocab.chat_template:
        wrapped.chat_template = vocab.chat_template
    wrapped.save_pretrained(out)
