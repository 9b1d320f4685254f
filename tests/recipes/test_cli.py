"""The qatfx command: argument validation (exit code 2), the tiny demo preset, and
finetune -> eval round trip on a small transformers Llama saved to disk."""

import json
from pathlib import Path

import pytest
import torch

from qatfx.cli import main
from qatfx.recipes.finetune import load_converted
from qatfx.recipes.train import perplexity

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def text_file(tmp_path):
    """Real English prose with no download: the project's own documentation."""
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    path = tmp_path / "docs.txt"
    path.write_text(text)
    return path


def exit_code_and_stderr(capsys, argv):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    return raised.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda tmp: ["demo", "--text", str(tmp / "missing.txt")], "missing.txt"),
        (lambda tmp: ["eval", "--model", "builtin:charlm", "--text", str(_binary(tmp))], "is not a UTF-8 text file"),
        (lambda tmp: ["finetune", "--model", str(tmp), "--text", str(_text(tmp)), "--out", str(tmp / "o")], "no config.json"),
        (lambda tmp: ["finetune", "--model", "builtin:charlm", "--text", str(_text(tmp)), "--out", str(tmp / "o"),
                      "--group-size", "48"], "group size 48 does not divide"),
        (lambda tmp: ["demo", "--seeds", "0"], "must be a positive integer"),
    ],
    ids=["missing-file", "binary-file", "not-a-checkpoint", "group-size", "zero-seeds"],
)
def test_bad_arguments_exit_2_with_a_clear_message(tmp_path, capsys, make_argv, message):
    code, err = exit_code_and_stderr(capsys, make_argv(tmp_path))
    assert code == 2 and message in err, err


def _binary(tmp: Path) -> Path:
    path = tmp / "weights.bin"
    path.write_bytes(bytes(range(256)) * 8)
    return path


def _text(tmp: Path) -> Path:
    path = tmp / "plain.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 200)
    return path


def test_tiny_demo_report(tmp_path, text_file, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "tiny", "--text", str(text_file), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "| int4 g32 |" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert {"corpus", "model", "parameters", "float_bytes", "float_ppl", "rows", "curves"} <= report.keys()
    assert [row["scheme"] for row in report["rows"]] == ["int4 g32", "int3 per-channel"]
    for row in report["rows"]:
        assert row["qat_ppl"] == row["qat_fake_quant_ppl"]  # the contract: converted == fake-quant
        assert row["converted_bytes"] < report["float_bytes"]
    for name in ("report.md", "training_curves.png", "perplexity.png"):
        assert (out / name).stat().st_size > 0


def test_finetune_then_eval_round_trips_a_transformers_llama(tmp_path, text_file):
    import transformers
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    checkpoint = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(checkpoint)
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(checkpoint), "--text", str(text_file), "--out", str(out),
            "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--eager"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    ppl = report["test_perplexity"]
    assert ppl["qat_converted"] == ppl["qat_fake_quant"]
    # Rebuilt from converted.pt + qatfx_model.json: the same model, so the same perplexity.
    from qatfx.recipes.corpus import load_text, split_text

    text = load_text(text_file)
    converted, encode = load_converted(out, text)
    assert perplexity(converted, encode(split_text(text).test), 32) == ppl["qat_converted"]
    assert main(["eval", "--model", str(out), "--text", str(text_file), "--seq-len", "32"]) == 0
