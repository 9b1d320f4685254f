"""The qatfx command: argument validation (exit code 2) and the tiny demo preset. The
finetune -> eval round trips on transformers models are in test_finetune.py."""

import json
from pathlib import Path

import pytest
import torch

from qatfx.cli import main
from tests.recipes.test_finetune import save_checkpoint

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
        (lambda tmp: ["demo", "--export", "executorch,onnx"], "choose a comma-separated subset of executorch, gguf, hf"),
        (lambda tmp: ["finetune", "--model", "builtin:charlm", "--text", str(_text(tmp)), "--out", str(tmp / "o"),
                      "--steps", "5", "--fake-quant-after", "5"], "QAT would never train with fake-quant"),
        # model_zoo's GPT-2 has 64 positions; the default --seq-len is 128
        (lambda tmp: ["finetune", "--model", str(save_checkpoint("hf_gpt2", tmp / "gpt2")), "--text", str(_text(tmp)),
                      "--out", str(tmp / "o")], "--seq-len 128 is longer than the model's context of 64 positions"),
        (lambda tmp: ["finetune", "--model", str(_small_vocab(tmp)), "--text", str(_text(tmp)), "--out", str(tmp / "o")],
         "fewer than the 256 byte values qatfx would feed it; save the model's tokenizer"),
        (lambda tmp: ["eval", "--model", str(_old_layout(tmp)), "--text", str(_text(tmp))], "re-run `qatfx finetune`"),
        (lambda tmp: ["finetune", "--model", str(_old_layout(tmp)), "--text", str(_text(tmp)), "--out", str(tmp / "o")],
         "finetune starts from a float transformers checkpoint"),
        (lambda tmp: ["eval", "--model", str(_damaged_save(tmp)), "--text", str(_text(tmp))], "weights.safetensors is missing"),
        (lambda tmp: [*_charlm(tmp), "--lora-rank", "0"], "must be a positive integer"),
        (lambda tmp: [*_charlm(tmp), "--lora-mode", "torchtune"], "add --lora-rank R to train them"),
        (lambda tmp: [*_charlm(tmp), "--lora-rank", "4", "--lora-alpha", "0"], "LoRA alpha must be > 0"),
        (lambda tmp: [*_charlm(tmp), "--lora-rank", "4", "--lora-targets", "*.nothing"],
         "LoRA targets ['*.nothing'] match no linear layer; the layers are: ['blocks.0.q_proj'"),
        (lambda tmp: [*_charlm(tmp), "--lora-rank", "200"], "LoRA rank 200 > min(N, K) = 128 for layer 'blocks.0.q_proj'"),
        (lambda tmp: ["demo", "--rows", "int4 g32,int5 g7"], "choose comma-separated rows from: int4 g32; "),
        (lambda tmp: [*_charlm(tmp), "--preset", "tensorrt"], "invalid choice: 'tensorrt'"),
        (lambda tmp: [*_charlm(tmp), "--preset", "llama_cpp_q4_0", "--group-size", "64"], "fixes its group size"),
    ],
    ids=["missing-file", "binary-file", "not-a-checkpoint", "group-size", "zero-seeds", "unknown-export-format", "fake-quant-after-steps",
         "seq-len-past-context", "no-tokenizer-small-vocab", "eval-old-layout", "finetune-of-an-output", "eval-damaged-save",
         "lora-rank-0", "lora-option-without-rank", "lora-alpha-0", "lora-targets-match-nothing", "lora-rank-too-big",
         "unknown-demo-row", "unknown-preset", "preset-fixed-group-size"],
)
def test_bad_arguments_exit_2_with_a_clear_message(tmp_path, capsys, make_argv, message):
    code, err = exit_code_and_stderr(capsys, make_argv(tmp_path))
    assert code == 2 and message in err, err


def _charlm(tmp: Path) -> list:
    return ["finetune", "--model", "builtin:charlm", "--text", str(_text(tmp)), "--out", str(tmp / "o"), "--steps", "1", "--eager"]


def _binary(tmp: Path) -> Path:
    path = tmp / "weights.bin"
    path.write_bytes(bytes(range(256)) * 8)
    return path


def _small_vocab(tmp: Path) -> Path:
    """A checkpoint with no tokenizer and model_zoo's 128-token vocabulary."""
    from tests.model_zoo import BY_NAME

    BY_NAME["hf_llama"].build()[0].save_pretrained(tmp / "llama128")
    return tmp / "llama128"


def _old_layout(tmp: Path) -> Path:
    """What `qatfx finetune` wrote before it used qatfx.save."""
    path = tmp / "old_out"
    path.mkdir()
    (path / "converted.pt").write_bytes(b"")
    (path / "qatfx_model.json").write_text('{"model": "builtin:charlm", "qatfx_version": "0.1.0"}')
    return path


def _damaged_save(tmp: Path) -> Path:
    """A finetune output whose weights file was not copied."""
    import qatfx
    from qatfx.recipes.finetune import SIDECAR

    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    prepared = qatfx.prepare_pt2e(model.eval(), qatfx.Int8DynActInt4WeightQuantizer(32), (torch.randn(2, 32),))
    path = qatfx.save(qatfx.convert_pt2e(prepared), tmp / "out")
    (path / SIDECAR).write_text(json.dumps({"tokenizer": {"kind": "bytes"}, "seq_len": 8, "max_positions": None}))
    (path / "weights.safetensors").unlink()
    return path


def _text(tmp: Path) -> Path:
    path = tmp / "plain.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 200)
    return path


def test_tiny_demo_report(tmp_path, text_file, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--preset", "tiny", "--text", str(text_file), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main([*argv, "--export", "executorch,gguf,hf"]) == 0
    assert "| int4 g32 |" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert {"corpus", "model", "parameters", "float_bytes", "float_ppl", "rows", "curves"} <= report.keys()
    lora_rows = ["int4 g32 QAT+LoRA (r=8)", "int4 g32 QAT+LoRA (r=8, torchtune)"]
    assert [row["scheme"] for row in report["rows"]] == ["int4 g32", "executorch_llama preset", "int3 per-channel", *lora_rows]
    rows = {row["scheme"]: row for row in report["rows"]}
    for row in report["rows"]:
        if row["scheme"] != lora_rows[1]:  # the contract: converted == fake-quant (merged first for LoRA)
            assert row["qat_ppl"] == row["qat_fake_quant_ppl"]
        assert row["converted_bytes"] < report["float_bytes"]
    # torchtune mode deploys fq(W + sBA), not the trained fq(W) + sBA: the merge moves the perplexity
    assert rows[lora_rows[1]]["qat_ppl"] != rows[lora_rows[1]]["qat_fake_quant_ppl"]
    # adapters only: rank 8 on 6 of the 7 linears of one block (dim 64, hidden 128), A (8 x K) + B (N x 8)
    adapters = 8 * ((64 + 64) * 3 + (64 + 128) * 2 + (128 + 64))
    assert rows[lora_rows[0]]["trainable_parameters"] == rows[lora_rows[1]]["trainable_parameters"] == adapters
    assert rows["int4 g32"]["trainable_parameters"] == report["parameters"]  # full QAT trains every parameter
    assert "the merge gap costs" in (out / "report.md").read_text()
    for name in ("report.md", "training_curves.png", "perplexity.png"):
        assert (out / name).stat().st_size > 0
    # the deploy step: the int4 g32 QAT model as a .pte, verified (export raises below the
    # verifier's thresholds), timed beside the float model
    deploy = report["deploy"]
    assert (out / "qat.pte").stat().st_size == deploy["pte_bytes"]
    assert deploy["delegated"] == "8/8"  # 1 layer x 7 linears + lm_head
    assert deploy["next_token_agreement"] >= 0.9 and deploy["relative_error"] <= 0.1
    assert deploy["float_tokens_per_s"] > 0 and deploy["pte_tokens_per_s"] > 0
    assert "## Deployed: int4 g32 QAT model" in (out / "report.md").read_text()
    # the ExecuTorch preset's row (8da4w body, 8da8w lm_head, int8 embedding): its own .pte, verified
    preset = report["preset_deploy"]
    assert (out / "executorch_llama.pte").stat().st_size == preset["pte_bytes"] and preset["delegated"] == "8/8"
    assert preset["next_token_agreement"] >= 0.9 and preset["relative_error"] <= 0.1
    assert rows["executorch_llama preset"]["converted_bytes"] < rows["int4 g32"]["converted_bytes"]  # int8 embedding
    # --export gguf: written (the demo's float32 scales rounded to fp16, reported) and verified
    gguf_lines = report["file_exports"]["gguf"]
    assert (out / "qat.gguf").stat().st_size > 0
    assert sum(line.startswith("  rounded: ") and "weights moved" in line for line in gguf_lines) == 8
    assert any(line.startswith("  verified:") for line in gguf_lines)
    assert "## Exported: the int4 g32 QAT model as GGUF" in (out / "report.md").read_text()
    # --export hf: the weights exactly (verified), the 8da4w activation quantization dropped and measured
    hf_lines = "\n".join(report["file_exports"]["hf"])
    # 7 linears packed; the quantized lm_head written as its float grid (vLLM-safe default)
    assert (out / "qat_hf" / "model.safetensors").exists() and "7 int4 linears" in hf_lines
    assert "float (ignore): lm_head: written as its dequantized int4/group32/sym grid" in hf_lines
    assert "vs the converted 8da4w model" in hf_lines
