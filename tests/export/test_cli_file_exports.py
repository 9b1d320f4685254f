"""`qatfx export --format gguf|hf`: a `qatfx finetune` output of builtin:charlm -> a verified
GGUF with the character vocabulary / a verified compressed-tensors directory; bad input exits
2 before any work."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

import qatfx
from qatfx.cli import main
from qatfx.recipes.corpus import CharTokenizer
from qatfx.recipes.finetune import BUILTIN_MODELS, SIDECAR
from qatfx.recipes.model import CausalLM, LMConfig

gguf_package = pytest.importorskip("gguf", reason="the gguf extra: pip install -e '.[gguf]'")

TEXT = "the quick brown fox jumps over the lazy dog.\n"


def finetune_like_output(directory: Path, scales_precision=torch.bfloat16) -> Path:
    """What `qatfx finetune --model builtin:charlm` leaves: the converted model (qatfx.save) and
    the sidecar naming the model and its characters (training skipped: the grid is what matters)."""
    chars = CharTokenizer.from_text(TEXT)
    config = LMConfig(vocab_size=chars.vocab_size, **BUILTIN_MODELS["builtin:charlm"])
    torch.manual_seed(0)
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(32, scales_precision=scales_precision)
    example = chars.encode(TEXT)[None, :16]
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(CausalLM(config).eval(), quantizer, (example,)))
    qatfx.save(converted, directory)
    sidecar = {"model": "builtin:charlm", "tokenizer": json.loads(chars.to_json()), "seq_len": 16, "max_positions": 256}
    (directory / SIDECAR).write_text(json.dumps(sidecar))
    return directory


def test_export_gguf_writes_the_trained_grid_and_the_vocabulary(tmp_path):
    model_dir = finetune_like_output(tmp_path / "ft")
    out = tmp_path / "charlm.gguf"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["export", "--format", "gguf", "--model", str(model_dir), "--out", str(out)]) == 0
    printed = stdout.getvalue()
    assert "29 quantized layers written from the trained codes" in printed  # 4 layers x 7 + lm_head
    assert "verified:" in printed
    reader = gguf_package.GGUFReader(str(out))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    pieces = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    chars = CharTokenizer.from_text(TEXT)
    assert pieces == ["<unk>", *("\u2581" if c == " " else c for c in chars.chars)]


def test_export_gguf_bad_input_exits_2(tmp_path, capsys):
    model_dir = finetune_like_output(tmp_path / "ft", scales_precision=torch.float32)
    with pytest.raises(SystemExit) as raised:
        main(["export", "--format", "gguf", "--model", str(model_dir), "--out", str(tmp_path / "x.pte")])
    assert raised.value.code == 2 and "ending in .gguf for --format gguf" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:  # fp32 scales: not fp16 values
        main(["export", "--format", "gguf", "--model", str(model_dir), "--out", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert raised.value.code == 2 and "float32 scales are not fp16 values" in err and "--allow-rounding" in err
    assert not (tmp_path / "x.gguf").exists()
    assert main(["export", "--format", "gguf", "--model", str(model_dir), "--out", str(tmp_path / "x.gguf"), "--allow-rounding"]) == 0
    assert "weights moved" in capsys.readouterr().out


def test_export_hf_writes_a_verified_directory(tmp_path, capsys):
    pytest.importorskip("compressed_tensors", reason="the hf extra: pip install -e '.[hf]'")
    model_dir = finetune_like_output(tmp_path / "ft")
    out = tmp_path / "hf"
    assert main(["export", "--format", "hf", "--model", str(model_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert "vs the converted 8da4w model (activations quantized there, float here" in printed  # the drop, measured
    with pytest.raises(SystemExit) as raised:
        main(["export", "--format", "hf", "--model", str(model_dir), "--out", str(tmp_path / "x.gguf")])
    assert raised.value.code == 2 and "writes a directory" in capsys.readouterr().err
