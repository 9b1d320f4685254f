"""`qatfx export --format executorch` and `qatfx verify`: a qatfx.save directory -> .pte ->
verified, exit codes 0 (verified), 1 (the .pte does not match the model), 2 (bad input,
before any work). The .pte is exported once per module (lowering takes ~10-20 s)."""

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import qatfx
from qatfx.cli import main
from tests.models import TinyLM, tokens


def _save(seed: int, directory: Path) -> Path:
    torch.manual_seed(seed)
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(32, scales_precision=torch.bfloat16)
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(TinyLM(tie=True).eval(), quantizer, (tokens(),)))
    return qatfx.save(converted, directory)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _save(0, tmp_path_factory.mktemp("saved"))


@pytest.fixture(scope="module")
def exported(saved, tmp_path_factory):
    """`qatfx export` of `saved`: (exit code, stdout, the .pte path)."""
    pte = tmp_path_factory.mktemp("pte") / "tiny.pte"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["export", "--format", "executorch", "--model", str(saved), "--out", str(pte)])
    return code, stdout.getvalue(), pte


def exit_code_and_stderr(capsys, argv):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    return raised.value.code, capsys.readouterr().err


def test_export_then_verify_round_trip(exported, saved, capsys):
    code, stdout, pte = exported
    assert code == 0 and pte.stat().st_size > 0
    assert "15/15 int4 linears delegated to XNNPACK" in stdout
    assert "next-token agreement" in stdout and "FAILED" not in stdout  # export verifies by default
    assert main(["verify", str(pte), "--model", str(saved)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"verify {pte} vs the converted model: 4 held-out inputs, 64 positions")
    assert out.count(" ok") == 2 and "FAILED" not in out


def test_verify_against_another_model_exits_1_with_the_numbers(exported, tmp_path, capsys):
    _, _, pte = exported
    other = _save(1, tmp_path / "other")
    assert main(["verify", str(pte), "--model", str(other)]) == 1
    err = capsys.readouterr().err
    assert "qatfx verify: verification FAILED" in err
    assert "relative logit error" in err and "> max_relative_error 0.1" in err and "--max-relative-error" in err


def test_an_impossible_threshold_exits_1(exported, saved, capsys):
    _, _, pte = exported
    # XNNPACK's arithmetic differs slightly from the converted model's (the export report's
    # "differs from training" lines): the relative error is not 0, so 0 cannot be met.
    assert main(["verify", str(pte), "--model", str(saved), "--max-relative-error", "0"]) == 1
    assert "relative logit error" in capsys.readouterr().err


def _checkpoint(tmp: Path) -> Path:
    (tmp / "hf").mkdir()
    (tmp / "hf" / "config.json").write_text("{}")
    return tmp / "hf"


def _old_layout(tmp: Path) -> Path:
    (tmp / "old").mkdir()
    (tmp / "old" / "converted.pt").write_bytes(b"")
    (tmp / "old" / "qatfx_model.json").write_text("{}")
    return tmp / "old"


def _not_a_program(tmp: Path) -> Path:
    (tmp / "text.pte").write_text("not a program")
    return tmp / "text.pte"


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda tmp, saved, pte: ["verify", str(tmp / "missing.pte"), "--model", str(saved)], "missing.pte: no such .pte file"),
        (lambda tmp, saved, pte: ["export", "--model", str(tmp / "nowhere"), "--out", str(tmp / "a.pte")], "nowhere: not a directory"),
        (lambda tmp, saved, pte: ["export", "--model", str(_checkpoint(tmp)), "--out", str(tmp / "a.pte")],
         "a transformers checkpoint (a float model), not a converted one"),
        (lambda tmp, saved, pte: ["export", "--model", str(tmp), "--out", str(tmp / "a.pte")], "no qatfx_manifest.json"),
        (lambda tmp, saved, pte: ["verify", str(pte), "--model", str(_old_layout(tmp))], "re-run `qatfx finetune`"),
        (lambda tmp, saved, pte: ["export", "--model", str(saved), "--out", str(tmp / "a.bin")], "ending in .pte"),
        (lambda tmp, saved, pte: ["export", "--model", str(saved), "--out", str(tmp / "a.pte"), "--min-agreement", "1.5"],
         "must be a fraction in [0, 1] (0.9: 90% of positions), got 1.5"),
        (lambda tmp, saved, pte: ["verify", str(pte), "--model", str(saved), "--max-relative-error", "-1"], "must be >= 0"),
        (lambda tmp, saved, pte: ["export", "--format", "onnx", "--model", str(saved), "--out", str(tmp / "a.pte")], "invalid choice: 'onnx'"),
        (lambda tmp, saved, pte: ["verify", str(_not_a_program(tmp)), "--model", str(saved)], "is not an ExecuTorch program"),
    ],
    ids=["missing-pte", "missing-model", "float-checkpoint", "no-manifest", "old-finetune-layout", "not-pte-suffix",
         "agreement-above-1", "negative-error", "unknown-format", "not-a-program"],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, saved, exported, make_argv, message):
    code, err = exit_code_and_stderr(capsys, make_argv(tmp_path, saved, exported[2]))
    assert code == 2 and message in err, err
    assert not (tmp_path / "a.pte").exists()


def test_a_damaged_save_exits_2(tmp_path, capsys, saved):
    damaged = Path(shutil.copytree(saved, tmp_path / "damaged"))
    (damaged / "weights.safetensors").unlink()
    code, err = exit_code_and_stderr(capsys, ["export", "--model", str(damaged), "--out", str(tmp_path / "a.pte")])
    assert code == 2 and "weights.safetensors is missing" in err, err


def test_without_executorch_exit_2_says_how_to_install_it(tmp_path, capsys, saved, exported, monkeypatch):
    for name in [n for n in sys.modules if n == "executorch" or n.startswith("executorch.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import executorch...` now raises ImportError
    monkeypatch.setitem(sys.modules, "executorch", None)
    for argv in (["export", "--model", str(saved), "--out", str(tmp_path / "a.pte")], ["verify", str(exported[2]), "--model", str(saved)]):
        code, err = exit_code_and_stderr(capsys, argv)
        assert code == 2 and 'pip install -e ".[executorch]"' in err, err


@pytest.mark.long
def test_finetune_output_exports_and_verifies(tmp_path, capsys):
    """A `qatfx finetune` output (HF Llama, byte tokens, float32 scales: the finetune default)."""
    from tests.recipes.test_finetune import save_checkpoint

    root = Path(__file__).resolve().parents[2]
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(p.read_text() for p in sorted((root / "docs").glob("*.md")))[:20_000])
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(save_checkpoint("hf_llama", tmp_path / "llama")), "--text", str(text),
                 "--out", str(out), "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--eager"]) == 0
    assert json.loads((out / "qatfx_finetune.json").read_text())["tokenizer"] == {"kind": "bytes"}
    pte = tmp_path / "llama.pte"
    assert main(["export", "--model", str(out), "--out", str(pte)]) == 0
    assert main(["verify", str(pte), "--model", str(out)]) == 0
    assert "FAILED" not in capsys.readouterr().out


@pytest.mark.long
def test_verify_in_a_fresh_process_loads_the_quantized_embedding_kernels(tmp_path):
    """A .pte with an int4 embedding (ExecuTorch's embedding_4bit, not linked into the Python
    runtime) verifies from the command line in a new process."""
    import subprocess

    from qatfx.export import executorch
    from qatfx.spec import int4_per_group_embedding

    torch.manual_seed(0)
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(32, scales_precision=torch.bfloat16,
                                                     embedding_spec=int4_per_group_embedding(32, torch.bfloat16))
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(TinyLM(tie=True).eval(), quantizer, (tokens(),)))
    saved = qatfx.save(converted, tmp_path / "saved")
    executorch(converted, tmp_path / "emb.pte", verify=False)
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "qatfx", "verify", str(tmp_path / "emb.pte"), "--model", str(saved)],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "next-token agreement" in run.stdout and "FAILED" not in run.stdout
