"""qatfx inside Hugging Face transformers: a region-captured LlamaForCausalLM generates with
its KV cache, trains in `transformers.Trainer` with `QATCallback`, and is converted and
saved at the end."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import qatfx
from qatfx.graph.regions import model_stage
from qatfx.integrations.transformers import QATCallback, prepare_for_trainer
from tests.model_zoo import VOCAB, _hf

QUANTIZER = qatfx.Int8DynActInt4WeightQuantizer(group_size=32)
NEW_TOKENS = 8


def tiny_llama() -> LlamaForCausalLM:
    model, _ = _hf("LlamaConfig", "LlamaForCausalLM", use_cache=True)()
    return model


def tokens(seed: int, shape: tuple) -> torch.Tensor:
    # 3 and up: not pad (0), bos (1) or eos (2)
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def greedy_without_cache(model, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding by running `model` on the whole growing sequence each step; returns
    the sequences and each step's last-position logits (batch, step, vocab)."""
    sequence, logits = prompt, []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            step = model(sequence, use_cache=False).logits[:, -1]
            logits.append(step)
            sequence = torch.cat([sequence, step.argmax(-1, keepdim=True)], dim=1)
    return sequence, torch.stack(logits, dim=1)


def assert_generate_matches(regional, whole_graph, prompt: torch.Tensor) -> None:
    expected, expected_logits = greedy_without_cache(whole_graph, prompt)
    # The regional model on the same sequence runs the same ops as the whole graph.
    with torch.no_grad():
        assert torch.equal(regional(expected, use_cache=False).logits, whole_graph(expected, use_cache=False).logits)
    top2 = expected_logits.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).min().item()
    # The prompts are chosen so that no step is a near-tie: token equality below then tests
    # the cache, not rounding. Measured here: 2.6e-2, against logit differences of 2e-7.
    assert margin > 1e-2, f"a near-tie (top-2 margin {margin:.1e}) would make the token comparison depend on rounding"

    cached = regional.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    uncached = regional.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
    assert torch.equal(cached.sequences, expected)
    assert torch.equal(uncached, expected)
    # Decoding with the cache computes each new token's row alone (GEMMs with one row,
    # attention over the stored K/V) where the uncached run computes all rows: the same
    # float32 math summed in another order (measured: 2e-7). The int8 activation codes are
    # per token, so a rounding tie resolved the other way moves one code of one token by one
    # step, i.e. one term of a K-term dot product (~1/K of the output's RMS); 1e-3 relative
    # RMS allows a few such flips and fails on a real cache error, which the greedy tokens
    # of this random model may not show: measured here, decode positions off by one move
    # the logits by 9e-3 and attention missing the newest token's K/V by 1e-1, both with
    # the same tokens.
    got = torch.stack(cached.logits, dim=1)
    rel = ((got - expected_logits).norm() / expected_logits.norm()).item()
    assert rel < 1e-3, f"cached logits differ from the uncached ones by {rel:.2e} relative RMS"


def test_generate_with_kv_cache_matches_the_whole_graph_without_it():
    model = tiny_llama()
    example = tokens(0, (2, 8))
    regional = qatfx.prepare_pt2e(model, QUANTIZER, (example,), regions="auto").eval()
    whole_graph = qatfx.prepare_pt2e(model, QUANTIZER, (example,), example_kwargs={"use_cache": False}).eval()
    assert isinstance(regional, LlamaForCausalLM)
    # seeds whose 8 greedy steps have a clear winner each and never produce eos
    prompt = torch.cat([tokens(1, (1, 6)), tokens(30, (1, 6))])
    assert_generate_matches(regional, whole_graph, prompt)
    assert_generate_matches(qatfx.convert_pt2e(regional).eval(), qatfx.convert_pt2e(whole_graph).eval(), prompt)


class RandomTokens(torch.utils.data.Dataset):
    """Causal-LM examples of random tokens, as a data collator's input (no `datasets`)."""

    def __init__(self, n: int = 16, length: int = 8) -> None:
        self.ids = tokens(0, (n, length))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class FakeQuantObserver(TrainerCallback):
    """Whether fake-quant is on at the start of each step (before its forward), by step."""

    def __init__(self) -> None:
        self.at_begin = None
        self.by_step: dict[int, bool] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.at_begin = qatfx.fake_quant_enabled(model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.by_step[state.global_step + 1] = qatfx.fake_quant_enabled(model)


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3, save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def test_trainer_runs_qat_switches_fake_quant_on_and_saves_the_converted_model(tmp_path):
    data = RandomTokens()
    model = prepare_for_trainer(tiny_llama(), QUANTIZER, data.ids[:2])
    assert isinstance(model, LlamaForCausalLM)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    qat, observer = QATCallback(fake_quant_after_n_steps=2), FakeQuantObserver()
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=data, callbacks=[qat, observer])
    trainer.train()

    assert observer.by_step == {1: False, 2: False, 3: True, 4: True}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, start[name])]
    assert not unchanged, f"training left {unchanged} unchanged"

    # Trainer's checkpoints (save_pretrained) hold the float weights under the model's own
    # names: a plain LlamaForCausalLM loads the last one, every key matched, bit for bit.
    reloaded, info = LlamaForCausalLM.from_pretrained(tmp_path / "checkpoint-4", output_loading_info=True)
    assert not any(info.values()), info
    assert all(torch.equal(t, reloaded.state_dict()[name]) for name, t in model.state_dict().items())

    assert qat.saved_to == tmp_path / "qatfx"
    assert isinstance(qat.converted, LlamaForCausalLM) and model_stage(qat.converted) == "converted"
    ids = tokens(5, (3, 11))  # another batch size and length than in training
    loaded = qatfx.load(qat.saved_to)
    with torch.no_grad():
        # the saved program is the converted model re-exported: the same ops
        assert torch.equal(loaded(input_ids=ids).logits, qat.converted(input_ids=ids, use_cache=False).logits)


def test_resumed_run_switches_fake_quant_at_the_same_step(tmp_path):
    data = RandomTokens()

    def run(max_steps, resume=None):
        model = prepare_for_trainer(tiny_llama(), QUANTIZER, data.ids[:2])
        observer = FakeQuantObserver()
        callbacks = [QATCallback(fake_quant_after_n_steps=3, convert_at_end=False), observer]
        trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=max_steps), train_dataset=data, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return model, observer

    run(2)
    resumed, observer = run(4, resume=str(tmp_path / "checkpoint-2"))
    assert observer.at_begin is False  # resumed at step 2 of 3 in float
    assert observer.by_step == {3: False, 4: True}
    assert qatfx.fake_quant_enabled(resumed)


@pytest.mark.parametrize("stage", ["float", "converted"])
def test_callback_refuses_a_model_that_is_not_prepared(tmp_path, stage):
    model = tiny_llama()
    if stage == "converted":
        model = qatfx.convert_pt2e(prepare_for_trainer(model, QUANTIZER, tokens(0, (2, 8))))
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=RandomTokens(), callbacks=[QATCallback()])
    with pytest.raises(ValueError, match="QATCallback: Trainer is training .*prepare_for_trainer"):
        trainer.train()


def test_prepare_for_trainer_refuses_bad_input():
    with pytest.raises(ValueError, match="batch or sequence size of 1"):
        prepare_for_trainer(tiny_llama(), QUANTIZER, tokens(0, (1, 8)))
    with pytest.raises(TypeError, match="needs a transformers PreTrainedModel.*qatfx.prepare_pt2e"):
        prepare_for_trainer(torch.nn.Linear(4, 4), QUANTIZER, tokens(0, (2, 8)))
    with pytest.raises(ValueError, match="fake_quant_after_n_steps must be >= 0"):
        QATCallback(fake_quant_after_n_steps=-1)


def test_the_documented_snippet_runs(tmp_path, monkeypatch):
    doc = Path(__file__).resolve().parents[2] / "docs" / "integrations_transformers.md"
    snippet = re.search(r"```python\n(.*?)```", doc.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, str(doc), "exec"), namespace)
    assert namespace["qat"].saved_to == Path("out") / "qatfx"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-2", "checkpoint-4", "qatfx"]
    assert namespace["loaded"](input_ids=namespace["prompt"]).logits.shape == (1, 6, 128)


def test_trainer_models_train_eagerly_without_keeping_fake_quantized_weights():
    # The HF Trainer runs the prepared model eagerly: each quantized weight reaches autograd
    # as a FakeQuantizedWeight (recomputed in backward), never as a kept fq(W) tensor.
    from qatfx.lean.lazy_weight import FakeQuantizedWeight

    model = tiny_llama()
    ids = tokens(0, (2, 8))
    prepared = prepare_for_trainer(model, qatfx.Int8DynActInt4WeightQuantizer(group_size=32), {"input_ids": ids, "labels": ids})
    weights = {id(p) for p in prepared.parameters()}
    weight_shapes = {tuple(p.shape) for p in prepared.parameters() if p.dim() == 2}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = prepared(input_ids=ids, labels=ids).loss
    lazy = [t for t in saved if isinstance(t, FakeQuantizedWeight)]
    n_quantized = len(qatfx.summary(prepared).quantized)
    assert len(lazy) >= n_quantized  # one per quantized linear, kept by its matmul
    kept_copies = [
        tuple(t.shape) for t in saved
        if type(t) is torch.Tensor and id(t) not in weights and t.is_floating_point() and tuple(t.shape) in weight_shapes
    ]
    assert kept_copies == []
    loss.backward()
    assert all(p.grad is not None for p in prepared.parameters() if p.requires_grad)


# --- knowledge distillation: DistillationTrainer -------------------------------------------

from qatfx.integrations.transformers import DistillationTrainer  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


def padded_batch() -> dict:
    """Two sequences, the second's first 3 labels unscored (-100, as a prompt or padding)."""
    ids = tokens(7, (2, 8))
    labels = ids.clone()
    labels[1, :3] = -100
    return {"input_ids": ids, "labels": labels}


def distillation_setup(tmp_path, **trainer_kwargs):
    data = RandomTokens()
    model = tiny_llama()
    prepared = prepare_for_trainer(model, QUANTIZER, data.ids[:2])
    teacher = qatfx.frozen_teacher(model, student=prepared)
    trainer = DistillationTrainer(model=prepared, args=training_args(tmp_path, **trainer_kwargs.pop("args", {})),
                                  train_dataset=data, teacher=teacher, **trainer_kwargs)
    return model, prepared, teacher, trainer


def kd_formula(student_logits, teacher_logits, labels, temperature):
    """Per position KL(p_t || p_s) x T^2 by torch's kl_div, kept where the shifted label is scored:
    (sum over the scored positions, their count)."""
    log_s = torch.log_softmax(student_logits.float() / temperature, -1)
    log_t = torch.log_softmax(teacher_logits.float() / temperature, -1)
    per_position = torch.nn.functional.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1) * temperature**2
    scored = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1) != -100  # HF's shift
    return per_position[scored].sum(), int(scored.sum())


def test_distillation_trainer_loss_is_the_formula_on_one_batch(tmp_path):
    _, prepared, teacher, trainer = distillation_setup(tmp_path, kd_weight=0.3, temperature=2.0)
    batch = padded_batch()
    with torch.no_grad():
        student_logits = prepared(input_ids=batch["input_ids"]).logits
        teacher_logits = teacher(input_ids=batch["input_ids"]).logits
        ce_mean = prepared(**batch).loss  # transformers' own causal-LM loss
        kd_sum, n = kd_formula(student_logits, teacher_logits, batch["labels"], 2.0)
        # 7 scored positions per row (the last predicts nothing); in row 1 positions 0 and 1
        # predict the unscored labels 1 and 2 (label 0 is never predicted)
        assert n == 2 * 7 - 2
        assert kd_sum > 0

        # Per-batch mean (no num_items_in_batch, as in evaluation): 0.7 ce + 0.3 x mean KD.
        loss = trainer.compute_loss(prepared, dict(batch))
        expected = 0.7 * ce_mean + 0.3 * (kd_sum / n)
        # The same float32 terms, except the KD mean: a sum of 12 per-position values here,
        # their mean inside the loss (two orders: <= 11 eps32 relative) and the final combination
        # (<= 3 more roundings): 16 eps32 of the loss (measured: equal, and 0.5 eps32 with num_items_in_batch).
        assert abs(loss - expected) <= 16 * EPS32 * expected

        # With num_items_in_batch (Trainer's count over the accumulated batch, here as if a second
        # micro-batch had 9 more scored tokens): both terms are sums over this batch / that count.
        total = torch.tensor(n + 9)
        loss = trainer.compute_loss(prepared, dict(batch), num_items_in_batch=total)
        ce_sum = prepared(**batch, num_items_in_batch=total).loss * total
        expected = (0.7 * ce_sum + 0.3 * kd_sum) / total
        assert abs(loss - expected) <= 16 * EPS32 * expected

        # the -100 labels matter: with every label scored the loss is another
        unmasked = {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}
        assert trainer.compute_loss(prepared, unmasked) != trainer.compute_loss(prepared, dict(batch))


def test_distillation_trainer_trains_the_student_and_leaves_the_teacher(tmp_path):
    model, prepared, teacher, trainer = distillation_setup(
        tmp_path, kd_weight=0.5, temperature=1.0, args=dict(gradient_accumulation_steps=2, save_steps=100),
        callbacks=[QATCallback(fake_quant_after_n_steps=1, convert_at_end=False)],
    )
    ids = tokens(5, (3, 11))
    with torch.no_grad():
        start = teacher(input_ids=ids).logits
    before = {name: p.detach().clone() for name, p in prepared.named_parameters()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert all(not torch.equal(p, before[name]) for name, p in prepared.named_parameters())  # full QAT: every weight trains
    with torch.no_grad():
        assert torch.equal(teacher(input_ids=ids).logits, start)  # its own copies: the same computation as before
        assert not torch.equal(model(input_ids=ids).logits, start)  # the float model's tensors did train
    assert qatfx.distillation.teacher_memory(teacher).copied_bytes == sum(p.numel() * 4 for p in model.parameters())


def test_distillation_trainer_refuses_misuse(tmp_path):
    data = RandomTokens()
    model = tiny_llama()
    prepared = prepare_for_trainer(model, QUANTIZER, data.ids[:2])
    args = training_args(tmp_path)
    with pytest.raises(ValueError, match="shares the storage of .* tensors the student trains"):
        DistillationTrainer(model=prepared, args=args, train_dataset=data, teacher=model)  # the float model itself
    teacher = qatfx.frozen_teacher(model, student=prepared)
    with pytest.raises(ValueError, match=r"kd_weight must be in \[0, 1\]"):
        DistillationTrainer(model=prepared, args=args, train_dataset=data, teacher=teacher, kd_weight=2.0)
    with pytest.raises(ValueError, match="drop compute_loss_func"):
        DistillationTrainer(model=prepared, args=args, train_dataset=data, teacher=teacher, compute_loss_func=lambda *a, **k: 0)
    trainer = DistillationTrainer(model=prepared, args=args, train_dataset=data, teacher=teacher)
    with pytest.raises(ValueError, match="needs labels in each batch"):
        trainer.compute_loss(prepared, {"input_ids": data.ids[:2]})


@pytest.mark.long  # ~15 s on 2 cores; DistillationTrainer itself: the tests above
def test_the_documented_distillation_snippet_runs(tmp_path, monkeypatch):
    doc = Path(__file__).resolve().parents[2] / "docs" / "integrations_transformers.md"
    snippet = next(s for s in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S) if "DistillationTrainer(" in s)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, str(doc), "exec"), namespace)
    memory = qatfx.distillation.teacher_memory(namespace["teacher"])
    assert memory.copied_bytes == sum(p.numel() * 4 for p in namespace["float_model"].parameters())
    assert namespace["trainer"].state.global_step == 4
    assert math.isfinite(namespace["trainer"].state.log_history[-1]["train_loss"])
    assert (tmp_path / "kd_out" / "qatfx" / "program.pt2").exists()  # QATCallback converted and saved it
