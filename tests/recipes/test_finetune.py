"""`qatfx finetune` / `qatfx eval` on real transformers families saved to disk as a user
would have them (tests/model_zoo.py builders, random weights, `use_cache` on as in a real
checkpoint): linear sizes read from the modules, the float control, the qatfx.save output
and `qatfx eval` of it."""

import json
import re
from pathlib import Path

import pytest
import torch

import qatfx
from qatfx.cli import main
from qatfx.recipes.corpus import load_text, split_text
from qatfx.recipes.finetune import SIDECAR, check_group_size, evaluate, load_model
from tests.model_zoo import BY_NAME, FAMILIES

ROOT = Path(__file__).resolve().parents[2]
HF_FAMILIES = [f.name for f in FAMILIES if f.name.startswith("hf_") and not f.long_only]
# K of every linear, from docs/models.md: hidden 64 (q/k/v/o, gate/up, lm_head), MLP 128
# (down); GPT-2's MLP is 256 and its Conv1D weights are stored (K, N).
EXPECTED_K = {name: (64, 256) if name == "hf_gpt2" else (64, 128) for name in HF_FAMILIES}


@pytest.fixture
def text_file(tmp_path):
    """Real English prose with no download: the project's own documentation."""
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))))
    return path


def save_checkpoint(family: str, directory: Path, tokenizer=None) -> Path:
    """A family's random model saved like a user's checkpoint: KV cache on (the transformers
    default), and a vocabulary the tokenizer fills, or 256 for UTF-8 bytes without one."""
    model, _ = BY_NAME[family].build()
    model.resize_token_embeddings(256 if tokenizer is None else len(tokenizer))
    model.config.use_cache = True
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def bpe_tokenizer(text: str):
    """A byte-level BPE tokenizer trained on `text` (256 bytes + 64 merges), offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_linear_input_sizes_come_from_the_modules_of_every_family(tmp_path, family):
    loaded = load_model(str(save_checkpoint(family, tmp_path / family)), "")
    assert loaded.linear_in_features == EXPECTED_K[family]
    assert loaded.max_positions == 64  # model_zoo's context (GPT-2: n_positions)
    assert loaded.tokenizer.kind == "bytes"
    # 48 divides none of 64, 128, 256
    with pytest.raises(ValueError, match=re.escape(f"group size 48 does not divide the linear input size(s) {list(EXPECTED_K[family])}")):
        check_group_size(loaded, 48)


def finetune_and_eval(tmp_path: Path, text_file: Path, checkpoint, *extra: str) -> tuple[dict, Path]:
    out = tmp_path / "out"
    # 3 steps, fake-quant from step 2: steps 0-1 are float in both runs
    argv = ["finetune", "--model", str(checkpoint), "--text", str(text_file), "--out", str(out), "--steps", "3",
            "--fake-quant-after", "2", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-3", "--eager", *extra]
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text()), out


def check_output(tmp_path: Path, text_file: Path, report: dict, out: Path, capsys, distilled: bool = False) -> None:
    ppl = report["test_perplexity"]
    assert set(ppl) == {"float_start", "float_control", "ptq", "qat_fake_quant", "qat_converted"}
    assert ppl["qat_converted"] == ppl["qat_fake_quant"]  # the contract: converted == fake-quant bit for bit
    assert ppl["float_control"] != ppl["float_start"]  # the control was fine-tuned
    control, qat = report["train_loss"]["float control"], report["train_loss"]["QAT"]
    if distilled:
        # Step 0 runs the same weights on the same batch with fake-quant off: QAT's cross-entropy
        # term is the control's loss bit for bit. (Step 1 may agree too: at step 0 the KD
        # gradient is 0 and Adam's update hardly depends on the gradient's scale.)
        assert report["train_loss"]["QAT cross-entropy"][0] == control[0]
    else:
        # Same graph, batches and seed, fake-quant off (an exact identity) for QAT's first 2 steps:
        # the control's losses are QAT's bit for bit until fake-quant switches on at step 2.
        assert control[:2] == qat[:2] and control[2] != qat[2]
    md = (out / "report.md").read_text()
    for row in ("float, before fine-tuning (start)", "float control", "PTQ of the float control", "QAT fake-quant", "QAT converted"):
        assert f"| {row}" in md
    assert "QAT recovers:" in md

    # The output is a qatfx.save directory plus the tokenizer sidecar; nothing of the old layout.
    converted = qatfx.load(out)
    assert converted.qatfx_stage == "converted" and sum(r.quantized for r in converted.qatfx_layers) > 0
    assert not (out / "converted.pt").exists() and not (out / "qatfx_model.json").exists()
    assert "qatfx_version" not in json.loads((out / SIDECAR).read_text())

    # `qatfx eval` on the test split scores the saved program on the same windows as the
    # report's "QAT converted" row: the same computation op for op, so the same float.
    test_file = tmp_path / "test_split.txt"
    test_file.write_text(split_text(load_text(text_file)).test)
    assert evaluate(str(out), test_file) == ppl["qat_converted"]
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--text", str(test_file)]) == 0
    assert capsys.readouterr().out == f"test perplexity: {ppl['qat_converted']:.4f}\n"


@pytest.mark.long  # ~30 s on 2 cores; the builtin model's finetune + eval is the default run's
def test_finetune_then_eval_gpt2_with_byte_tokens(tmp_path, text_file, capsys):
    checkpoint = save_checkpoint("hf_gpt2", tmp_path / "gpt2")
    report, out = finetune_and_eval(tmp_path, text_file, checkpoint)
    assert json.loads((out / SIDECAR).read_text())["tokenizer"] == {"kind": "bytes"}
    check_output(tmp_path, text_file, report, out, capsys)


@pytest.mark.long  # ~30 s on 2 cores
def test_finetune_then_eval_llama_with_its_tokenizer(tmp_path, text_file, capsys):
    import shutil

    tokenizer = bpe_tokenizer(load_text(text_file))
    checkpoint = save_checkpoint("hf_llama", tmp_path / "llama", tokenizer)
    report, out = finetune_and_eval(tmp_path, text_file, checkpoint)
    assert report["test_tokens"] == len(tokenizer(split_text(load_text(text_file)).test)["input_ids"])
    shutil.rmtree(checkpoint)  # the output needs nothing from the checkpoint: its tokenizer was copied
    check_output(tmp_path, text_file, report, out, capsys)


@pytest.mark.long  # ~45 s on 2 cores; finetune + eval end to end stay in the default run for GPT-2 and Llama
def test_finetune_then_eval_builtin_charlm(tmp_path, text_file, capsys):
    text_file.write_text(text_file.read_text()[:20_000])  # its 4-layer, 128-wide model evaluates slowly
    report, out = finetune_and_eval(tmp_path, text_file, "builtin:charlm", "--scales-precision", "bfloat16")
    # bf16 scales: the grid ExecuTorch stores and GGUF / a bf16 checkpoint hold exactly
    assert {r.weight_spec.scale_dtype for r in qatfx.load(out).qatfx_layers if r.quantized} == {torch.bfloat16}
    chars = json.loads((out / SIDECAR).read_text())["tokenizer"]
    assert chars["kind"] == "chars" and set(chars["chars"]) == set(split_text(load_text(text_file)).train)
    check_output(tmp_path, text_file, report, out, capsys)


def float_bytes(text_file: Path) -> tuple[int, int]:
    """(parameter bytes, buffer bytes) of builtin:charlm with the vocabulary of this text."""
    model = load_model("builtin:charlm", split_text(load_text(text_file)).train).module
    return (sum(p.numel() * p.element_size() for p in model.parameters()),
            sum(b.numel() * b.element_size() for b in model.buffers()))


def check_distillation(report: dict, out: Path, kd_weight: float, temperature: float, copied: int, shared: int) -> None:
    kd = report["distillation"]
    assert (kd["kd_weight"], kd["temperature"]) == (kd_weight, temperature)
    assert (kd["teacher_copied_bytes"], kd["teacher_shared_bytes"]) == (copied, shared)
    curves = report["train_loss"]
    assert set(curves) == {"float control", "QAT", "QAT cross-entropy", "QAT distillation"}
    for total, ce, kl in zip(curves["QAT"], curves["QAT cross-entropy"], curves["QAT distillation"]):
        # the loss is the float32 (1 - w) ce + w kl: two products and a sum, each rounded once
        # (and the float32 1 - w): within 4 float32 ulps of the exact value
        assert abs(total - ((1 - kd_weight) * ce + kd_weight * kl)) <= 4 * 2**-24 * total
    # Step 0: fake-quant off (--fake-quant-after 2) and the starting weights: the student is
    # the teacher (the exported graph runs the float model's ops), so KD is 0 exactly; from
    # step 1 the student has moved away from the frozen teacher.
    kl = curves["QAT distillation"]
    assert kl[0] == 0.0 and all(value > 0 for value in kl[1:])
    md = (out / "report.md").read_text()
    assert (f"- distillation (QAT only): loss = {1 - kd_weight:g} x cross-entropy + {kd_weight:g} x KL(teacher || student) "
            f"x T^2 at T = {temperature:g}; teacher: the float model before fine-tuning, frozen ({copied:,} bytes copied, "
            f"{shared:,} shared with the model)") in md


@pytest.mark.long  # ~50 s on 2 cores; distillation's loss, teacher and train(): tests/test_distillation.py, recipes/test_train.py
def test_finetune_with_distillation_builtin_charlm(tmp_path, text_file, capsys):
    """--distill: QAT trains on 0.3 ce + 0.7 KD from the starting float model; the control
    trains `model`'s tensors in place, so the teacher holds a copy of every parameter."""
    text_file.write_text(text_file.read_text()[:20_000])
    report, out = finetune_and_eval(tmp_path, text_file, "builtin:charlm", "--distill", "--kd-weight", "0.7", "--temperature", "2")
    params, buffers = float_bytes(text_file)
    check_distillation(report, out, 0.7, 2.0, copied=params, shared=buffers)
    check_output(tmp_path, text_file, report, out, capsys, distilled=True)


@pytest.mark.long  # ~1 min on 2 cores
def test_finetune_with_distillation_and_lora_shares_every_weight(tmp_path, text_file, capsys):
    """--distill --lora-rank: the base is frozen in both runs, so the teacher copies nothing."""
    text_file.write_text(text_file.read_text()[:20_000])
    report, out = finetune_and_eval(tmp_path, text_file, "builtin:charlm", "--distill", "--lora-rank", "4")
    params, buffers = float_bytes(text_file)
    check_distillation(report, out, 0.5, 1.0, copied=0, shared=params + buffers)  # the defaults
    check_output(tmp_path, text_file, report, out, capsys, distilled=True)


@pytest.mark.long  # ~40 s on 2 cores; the learned scales themselves: tests/test_learnable_scales.py
def test_finetune_with_learnable_scales_and_distillation_builtin_charlm(tmp_path, text_file, capsys):
    """--learnable-scales: QAT trains its scales and the saved model stores them (its specs say
    so; converted == fake-quant still holds); the control and its PTQ keep the rule's."""
    text_file.write_text(text_file.read_text()[:20_000])
    report, out = finetune_and_eval(tmp_path, text_file, "builtin:charlm", "--learnable-scales", "--scale-lr", "1e-4", "--distill")
    assert {r.weight_spec.learnable for r in qatfx.load(out).qatfx_layers if r.quantized} == {True}
    assert report["options"]["learnable_scales"] == "True" and report["options"]["scale_lr"] == "0.0001"
    params, buffers = float_bytes(text_file)
    check_distillation(report, out, 0.5, 1.0, copied=params, shared=buffers)  # the control trains `model` in place
    check_output(tmp_path, text_file, report, out, capsys, distilled=True)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--scale-lr", "1e-4"], "add --learnable-scales"),
        (["--learnable-scales", "--scale-lr", "0"], "--scale-lr 0.0 must be > 0"),
        (["--kd-weight", "0.5"], "--kd-weight configure distillation; add --distill"),
        (["--temperature", "2", "--kd-weight", "0.5"], "--kd-weight / --temperature configure distillation; add --distill"),
        (["--distill", "--kd-weight", "1.5"], "--kd-weight 1.5 must be in [0, 1]"),
        (["--distill", "--kd-weight", "-0.1"], "--kd-weight -0.1 must be in [0, 1]"),
        (["--distill", "--temperature", "0"], "--temperature 0.0 must be > 0"),
        (["--distill", "--temperature", "nan"], "--temperature nan must be > 0"),
    ],
)
def test_distillation_options_are_checked_before_loading(tmp_path, text_file, capsys, extra, message):
    argv = ["finetune", "--model", "builtin:charlm", "--text", str(text_file), "--out", str(tmp_path / "o"), *extra]
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ~35-50 s each on 2 cores: the long run (LoRA training itself: tests/passes/test_lora*.py)
@pytest.mark.long
@pytest.mark.parametrize("mode", ["merge_consistent", "torchtune"])
def test_finetune_with_lora_adapters(tmp_path, text_file, capsys, mode):
    """--lora-rank: control and QAT train the same adapters on a frozen base, merged before
    convert. merge_consistent keeps the contract (converted == fake-quant); torchtune mode
    reports how the merge moved the perplexity."""
    tokenizer = bpe_tokenizer(load_text(text_file))
    checkpoint = save_checkpoint("hf_llama", tmp_path / "llama", tokenizer)
    report, out = finetune_and_eval(tmp_path, text_file, checkpoint, "--lora-rank", "4", "--lora-mode", mode)
    config = json.loads((checkpoint / "config.json").read_text())
    # rank 4 on q/v/o/gate/up/down of every layer: A (4 x K) + B (N x 4)
    hidden, inter, kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"] * config["head_dim"]
    per_layer = 4 * ((hidden + hidden) + (hidden + kv) + (hidden + hidden) + 2 * (hidden + inter) + (inter + hidden))
    assert report["trainable_parameters"] == config["num_hidden_layers"] * per_layer
    md = (out / "report.md").read_text()
    assert f"LoRA ({mode}): rank 4, alpha 8" in md
    # the adapters alone, in peft's layout, pointing at the checkpoint they were trained on
    adapter = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == str(checkpoint.resolve())
    assert report["peft_adapter"] == str(out / "peft_adapter")
    if mode == "merge_consistent":
        check_output(tmp_path, text_file, report, out, capsys)
    else:
        ppl = report["test_perplexity"]
        assert ppl["qat_converted"] != ppl["qat_fake_quant"] and "the merge moved the test perplexity" in md
        assert qatfx.load(out).qatfx_stage == "converted"


@pytest.mark.long
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_finetune_then_eval_every_family(tmp_path, text_file, capsys, family):
    report, out = finetune_and_eval(tmp_path, text_file, save_checkpoint(family, tmp_path / family))
    check_output(tmp_path, text_file, report, out, capsys)


@pytest.mark.long  # ~45 s on 2 cores; the option checks below are in the default run
def test_finetune_with_the_executorch_preset(tmp_path, text_file, capsys):
    """--preset: per-layer schemes (8da4w body, 8da8w lm_head); the saved model holds them
    and scores what trained (check_output checks the contract)."""
    checkpoint = save_checkpoint("hf_llama", tmp_path / "llama")
    report, out = finetune_and_eval(tmp_path, text_file, checkpoint, "--preset", "executorch_llama")
    layers = {r.layer: r.scheme for r in qatfx.load(out).qatfx_layers}
    # finetune wraps the transformers model as `lm`: "*.lm_head" finds its head
    assert layers["lm.lm_head"] == "8da8w" and layers["lm.model.layers.0.self_attn.q_proj"] == "8da4w"
    assert layers["lm.model.embed_tokens"] == "8w"
    assert report["layer_schemes"]["8da8w"] == 1
    assert "preset executorch_llama (qatfx.presets; group size 32)" in (out / "report.md").read_text()
    check_output(tmp_path, text_file, report, out, capsys)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--preset", "llama_cpp_q4_0", "--group-size", "64"], "fixes its group size"),
        (["--preset", "executorch_llama", "--scales-precision", "bfloat16"], "fixes its scales' dtypes"),
    ],
)
def test_preset_options_that_conflict_are_refused_before_loading(tmp_path, text_file, extra, message):
    from qatfx.recipes.finetune import FinetuneOptions

    options = {"--preset": "preset", "--group-size": "group_size", "--scales-precision": "scales_precision"}
    kwargs = {options[k]: (int(v) if k == "--group-size" else v) for k, v in zip(extra[::2], extra[1::2])}
    with pytest.raises(ValueError, match=message):
        FinetuneOptions(model="builtin:charlm", text=text_file, out=tmp_path / "out", **kwargs).check()
