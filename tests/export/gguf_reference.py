"""llama.cpp's own converter as the reference for qatfx's GGUF files.

The reference file is `convert_hf_to_gguf.py --outtype f32` run on the same model saved with
save_pretrained, its quantized weights replaced by their fake-quantized values (convert's
codes times scales): every layout transform (q/k permutation, rope_freqs, biases, norms) is
then the converter's, applied to the values the converted model computes with. qatfx's file
must carry the same metadata (but the keys that name the file itself), the same tensors, and
every tensor must dequantize to the reference's float32 values bit for bit.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from qatfx.export.weights import converted_tensors

# what names the file rather than the model: qatfx writes its own name and Q4_0 as file type
SELF_DESCRIBING = {"general.file_type", "general.name", "general.size_label", "general.quantization_version"}


def reference_gguf(llama_cpp: Path, model: torch.nn.Module, converted: torch.nn.Module, tokenizer: Path, out: Path) -> Path:
    """The converter's f32 GGUF of `model` (the float model the prepared one shares tensors
    with) carrying `converted`'s dequantized weights and the tokenizer in `tokenizer`."""
    reference = copy.deepcopy(model)
    quantized = converted_tensors(converted).quantized
    if reference.config.tie_word_embeddings and "lm_head.weight" in quantized and "model.embed_tokens.weight" not in quantized:
        # an int4 head over a float embedding is two tables: the converted model is untied
        reference.config.tie_word_embeddings = False
        reference.lm_head.weight = torch.nn.Parameter(reference.lm_head.weight.detach().clone())
    state = reference.state_dict()
    for name, weight in quantized.items():
        state[name].copy_(weight.dequantized(torch.float32))
    directory = out / "hf"
    reference.save_pretrained(directory)
    for file in tokenizer.iterdir():
        shutil.copy(file, directory / file.name)
    path = out / "reference.gguf"
    done = subprocess.run(
        [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(directory), "--outfile", str(path), "--outtype", "f32"],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return path


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.") and k not in SELF_DESCRIBING}


def differences(ours: Path, reference: Path) -> list:
    """What differs between the two files: metadata, tensor names and shapes, and values."""
    import gguf

    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(reference))
    found = []
    fa, fb = _fields(a), _fields(b)
    for key in sorted(set(fa) | set(fb)):
        if fa.get(key) != fb.get(key):
            found.append(f"metadata {key}: {str(fa.get(key, '<absent>'))[:80]} vs {str(fb.get(key, '<absent>'))[:80]}")
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    found += [f"tensor {n} only in ours" for n in sorted(set(ta) - set(tb))]
    found += [f"tensor {n} only in the reference" for n in sorted(set(tb) - set(ta))]
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if list(x.shape) != list(y.shape):
            found.append(f"tensor {name}: shape {list(x.shape)} vs {list(y.shape)}")
            continue
        got = np.asarray(gguf.quants.dequantize(x.data, x.tensor_type), dtype=np.float32)
        want = np.asarray(gguf.quants.dequantize(y.data, y.tensor_type), dtype=np.float32)
        if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            found.append(f"tensor {name} ({x.tensor_type.name}): {int((got != want).sum())} values differ")
    return found


def tensor_types(path: Path) -> dict:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
