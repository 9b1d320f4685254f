"""The recipes' training loop is bit-reproducible under torch.compile."""

import pytest
import torch
from torch._inductor.utils import fresh_cache, run_and_get_code

from qatfx.recipes.model import CausalLM, LMConfig
from qatfx.recipes.train import TrainConfig, deterministic_algorithms, lm_loss, train

CONFIG = LMConfig(vocab_size=40, dim=32, layers=1, heads=2, hidden=64, max_seq=32)


def _compiled_step_code(model, batch):
    def step():
        lm_loss(torch.compile(model)(batch[:, :-1]), batch[:, 1:]).backward()

    _, code = run_and_get_code(step)
    return "\n".join(code)


@pytest.mark.long  # a cold compile of forward and backward, ~20 s on 2 cores
def test_embedding_backward_has_no_atomic_adds_in_deterministic_mode():
    # The source of run-to-run drift: Inductor's parallel scatter-add for the embedding's
    # gradient sums with atomic adds, in an order that varies between runs.
    torch.manual_seed(0)
    model = CausalLM(CONFIG)
    batch = torch.randint(0, CONFIG.vocab_size, (4, 17))
    with fresh_cache():
        assert "atomic_add" in _compiled_step_code(model, batch)  # the check can fail
        torch._dynamo.reset()
        with deterministic_algorithms():
            assert "atomic_add" not in _compiled_step_code(model, batch)
    torch._dynamo.reset()
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is back


def test_same_seed_same_losses_bit_for_bit():
    tokens = torch.randint(0, CONFIG.vocab_size, (5_000,), generator=torch.Generator().manual_seed(1))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = CausalLM(CONFIG)
        runs.append(train(model, tokens, TrainConfig(steps=4, batch_size=4, seq_len=16, warmup_steps=1)))
    assert runs[0] == runs[1]


# --- knowledge distillation ----------------------------------------------------------------

import qatfx  # noqa: E402
from qatfx.recipes.train import Distillation  # noqa: E402

QUANTIZER = qatfx.Int8DynActInt4WeightQuantizer(group_size=32)


def _tokens() -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (5_000,), generator=torch.Generator().manual_seed(1))


def _qat_student(seed: int = 0):
    torch.manual_seed(seed)
    model = CausalLM(CONFIG).eval()
    return model, qatfx.prepare_pt2e(model, QUANTIZER, (torch.randint(0, CONFIG.vocab_size, (2, 16)),))


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.long)])  # compiled: ~1 min of compiles
def test_kd_weight_zero_gives_the_losses_of_training_without_a_teacher(compile):
    # (1 - 0) x ce + 0 x kd is ce exactly (x 1.0 and + 0.0 are exact in floating point), its
    # gradient is ce's (the kd branch adds exact zeros), and the eval-mode teacher draws no
    # random numbers: the same steps bit for bit, so the curves are equal, not close.
    config = TrainConfig(steps=4, batch_size=4, seq_len=16, warmup_steps=1)
    model, student = _qat_student()
    without = train(student, _tokens(), config, compile=compile)
    model, student = _qat_student()
    distill = Distillation(qatfx.frozen_teacher(model, student), kd_weight=0.0, temperature=2.0)
    with_teacher = train(student, _tokens(), config, compile=compile, distill=distill)
    assert with_teacher == without
    assert with_teacher == distill.parts["cross_entropy"]
    assert all(kd > 0 for kd in distill.parts["distillation"])  # the teacher ran and differs from the student


def test_training_with_a_teacher_lowers_the_distillation_loss():
    # A QAT student from another initialisation, distilled alone (kd_weight 1). Two fresh
    # models both predict nearly uniformly (KD ~0.01); the teacher's head x 20 makes its
    # distribution peaked, so there is something to learn (KD ~2.5 at the start).
    teacher_model, _ = _qat_student(seed=0)
    with torch.no_grad():
        teacher_model.lm_head.weight.mul_(20)
    _, student = _qat_student(seed=1)
    distill = Distillation(qatfx.frozen_teacher(teacher_model), kd_weight=1.0, temperature=2.0)
    config = TrainConfig(steps=15, batch_size=4, seq_len=16, warmup_steps=2, lr=2e-2)
    losses = train(student, _tokens(), config, compile=False, distill=distill)
    kd = distill.parts["distillation"]
    assert losses == kd  # 0 x ce + 1 x kd is kd exactly
    assert sum(kd[-3:]) / 3 < 0.5 * kd[0], kd  # measured: 2.49 -> 0.81


def test_a_teacher_that_follows_the_student_is_refused():
    model, student = _qat_student()
    config = TrainConfig(steps=1, batch_size=2, seq_len=16)
    with pytest.raises(ValueError, match="shares the storage of .* tensors the student trains"):
        train(student, _tokens(), config, compile=False, distill=Distillation(model))  # prepare trains model's tensors
    with pytest.raises(ValueError, match=r"kd_weight must be in \[0, 1\]"):
        Distillation(model, kd_weight=1.5)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        Distillation(model, temperature=0.0)
