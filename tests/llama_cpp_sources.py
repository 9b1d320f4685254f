"""llama.cpp's own Python sources for the tests: its HF -> GGUF converter (`convert_hf_to_gguf.py`
with its `conversion/` package and the `gguf-py/` it puts first on sys.path) and its tokenizer
test vocabularies (`models/ggml-vocab-*.gguf` with their `.inp` / `.out` cases).

They come from the llama-cpp-python source archive on PyPI, which vendors llama.cpp: pinned by
version and sha256, so every machine tests against the same converter. Only the few MB the tests
read are kept (the archive's other ~70 MB are ggml and the C++ sources), in

    $QATFX_LLAMA_CPP_SRC                 an extracted sdist, or its vendor/llama.cpp; else
    $QATFX_CACHE_DIR/llama_cpp_python-<version>     (default ~/.cache/qatfx/...)

which is filled once with `pip download` when absent. Offline, point QATFX_LLAMA_CPP_SRC at an
extracted copy; tests call `llama_cpp_source_or_skip()` and skip with the reason otherwise.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# PyPI never lets a file be replaced: pip checks the archive against this before using it.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SOURCE_ENV = "QATFX_LLAMA_CPP_SRC"
CACHE_ENV = "QATFX_CACHE_DIR"  # the qatfx cache (qatfx.recipes.corpus.default_cache_dir)

_SDIST_ROOT = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
_VENDOR = "vendor/llama.cpp"
# What the converter runs on (models/templates: chat templates some families' converters read)
# and the tokenizer test vocabularies; paths relative to vendor/llama.cpp.
_KEEP_FILES = ("convert_hf_to_gguf.py", "LICENSE")
_KEEP_PREFIXES = ("conversion/", "gguf-py/", "models/templates/", "models/ggml-vocab-")
# A directory holding these is a usable vendor/llama.cpp.
_REQUIRED = ("convert_hf_to_gguf.py", "conversion/base.py", "gguf-py/gguf/__init__.py", "models")
_PIP_TIMEOUT_S = 900

log = logging.getLogger(__name__)
# Cache roots whose download failed in this process: offline, each pip attempt can take minutes
# (pip retries), and every test that needs the sources would otherwise pay it again.
_failed: dict[Path, str] = {}


class LlamaCppSourceError(RuntimeError):
    """The llama.cpp sources are neither cached nor downloadable; the message says why."""


def llama_cpp_source() -> Path:
    """The `vendor/llama.cpp` directory of llama-cpp-python's sdist, downloaded once if needed.

    Raises LlamaCppSourceError when QATFX_LLAMA_CPP_SRC names a directory that holds no such
    sources, or when the download fails (no network): a failed download is not retried in the
    same process.
    """
    root = cache_root()
    if root in _failed:
        raise LlamaCppSourceError(_failed[root])
    if not root.exists():
        try:
            _populate(root)
        except LlamaCppSourceError as exc:
            _failed[root] = str(exc)
            raise
    found = _vendor_dir(root)
    if found is None:
        raise LlamaCppSourceError(
            f"{root} holds neither an extracted llama-cpp-python sdist nor its vendor/llama.cpp "
            f"(no {', '.join(_REQUIRED)}); fix or remove it, or unset {SOURCE_ENV}")
    return found


def llama_cpp_source_or_skip() -> Path:
    """`llama_cpp_source()` for a test: skips it, with the reason, where the sources cannot be had."""
    try:
        return llama_cpp_source()
    except LlamaCppSourceError as exc:
        pytest.skip(str(exc))


def cache_root() -> Path:
    """Where the sources are looked for: $QATFX_LLAMA_CPP_SRC, else the versioned qatfx cache folder."""
    configured = os.environ.get(SOURCE_ENV)
    if configured:
        return Path(configured).expanduser()
    cache = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qatfx"
    return Path(cache).expanduser() / _SDIST_ROOT


def _vendor_dir(root: Path) -> Path | None:
    """`root` itself if it is a vendor/llama.cpp, else root/vendor/llama.cpp if that is one."""
    for candidate in (root, root / _VENDOR):
        if all((candidate / required).exists() for required in _REQUIRED):
            return candidate
    return None


def _populate(root: Path) -> None:
    """Download the sdist and extract the kept files to `root`, all or nothing.

    Everything is written in a scratch folder beside `root` (same file system) and renamed into
    place last, so an interrupted or failed run leaves no half-filled `root` behind.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}.") as scratch:
        archive = _download_sdist(Path(scratch))
        tree = _extract_sources(archive, Path(scratch) / "tree")
        try:
            tree.rename(root)
        except OSError:
            if _vendor_dir(root) is None:  # not merely another process that finished first
                raise


def _download_sdist(scratch: Path) -> Path:
    """`pip download` the pinned sdist into scratch/download; returns the archive's path."""
    requirements = scratch / "requirements.txt"
    requirements.write_text(f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} --hash=sha256:{SDIST_SHA256}\n")
    dest = scratch / "download"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-r", str(requirements), "-d", str(dest)]
    what = f"`pip download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}`"
    offline = f"; offline, set {SOURCE_ENV} to an extracted llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION} sdist"
    log.info("downloading the llama-cpp-python %s sdist for llama.cpp's converter and vocabularies", LLAMA_CPP_PYTHON_VERSION)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise LlamaCppSourceError(f"{what} did not finish in {_PIP_TIMEOUT_S} s{offline}") from exc
    archive = dest / f"{_SDIST_ROOT}.tar.gz"
    if proc.returncode != 0 or not archive.is_file():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise LlamaCppSourceError(f"{what} failed (exit {proc.returncode}): {tail}{offline}")
    return archive


def _extract_sources(archive: Path, dest: Path) -> Path:
    """Extract the kept files of `archive` under `dest`; returns dest/<sdist root>."""
    with tarfile.open(archive) as tar:
        members = [member for member in tar.getmembers() if (member.isfile() or member.isdir()) and _kept(member.name)]
        if not members:
            raise LlamaCppSourceError(f"{archive.name} holds no {_SDIST_ROOT}/{_VENDOR}/convert_hf_to_gguf.py")
        # "data": no absolute paths, links out of dest or device files (the default from 3.14)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **safe)
    tree = dest / _SDIST_ROOT
    if _vendor_dir(tree) is None:
        raise LlamaCppSourceError(f"{archive.name} lacks part of {', '.join(_REQUIRED)} under {_VENDOR}")
    return tree


def _kept(member: str) -> bool:
    prefix = f"{_SDIST_ROOT}/{_VENDOR}/"
    if not member.startswith(prefix):
        return False
    relative = member[len(prefix):]
    return relative in _KEEP_FILES or relative.startswith(_KEEP_PREFIXES)
