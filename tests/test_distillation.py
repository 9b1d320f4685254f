"""qatfx.distillation: the loss against its formula, and the frozen teacher's sharing and
copying, checked by storage."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import qatfx
from qatfx.distillation import check_teacher, teacher_memory
from qatfx.recipes.model import CausalLM, LMConfig

CONFIG = LMConfig(vocab_size=40, dim=32, layers=2, heads=2, hidden=64, max_seq=32)
QUANTIZER = qatfx.Int8DynActInt4WeightQuantizer(group_size=32)
EPS32 = torch.finfo(torch.float32).eps


def logits(seed: int, shape=(3, 5, 17), scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def kl_div_formula(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """torch's own KL: F.kl_div(log q, log p, log_target=True) = p (log p - log q) elementwise."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1).mean() * temperature**2


def float64_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    log_s = F.log_softmax(student.double() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.double() / temperature, dim=-1)
    return ((log_t.exp() * (log_t - log_s)).sum(-1).mean() * temperature**2).item()


# --- distillation_loss ---------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_loss_is_the_kl_formula(temperature):
    s, t = logits(0), logits(1)
    loss = qatfx.distillation_loss(s, t, temperature)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # Exact: kl_div's elementwise exp(t) * (t - s) is the loss's p_t * (log_t - log_s), the
    # same float32 ops on the same log_softmax outputs, then the same sum and mean.
    assert loss.item() == kl_div_formula(s, t, temperature).item()
    # Independent of torch's kl_div: float64. float32 log_softmax is off by a few ulps of its
    # inputs' magnitude (|z/T| + log V); each token's KL weights two such errors by p (sum 1):
    # |error| <= 2 x 4 eps32 (max|z/T| + log V) x T^2, plus the T^2 scaling's rounding.
    bound = 8 * EPS32 * ((torch.cat([s, t]).abs().max() / temperature).item() + math.log(17)) * temperature**2
    assert abs(loss.item() - float64_kl(s, t, temperature)) <= bound
    assert loss.item() > 10 * bound  # the comparison above is not of two zeros


def test_loss_is_zero_when_the_student_is_the_teacher():
    s = logits(0)
    # the same log_softmax of the same values: every term is p x 0 exactly
    assert qatfx.distillation_loss(s, s.clone(), 2.0).item() == 0.0


def test_kl_is_from_the_teacher_to_the_student():
    # KL is not symmetric: swapping the roles gives another number, so the order is tested
    s, t = logits(0), logits(1)
    assert qatfx.distillation_loss(s, t).item() != qatfx.distillation_loss(t, s).item()
    assert qatfx.distillation_loss(s, t).item() == kl_div_formula(s, t, 1.0).item()


def test_temperature_scales_by_t_squared():
    s, t = logits(0), logits(1)
    T = 3.0
    # logits / T at temperature 1 are the same log_softmax inputs; x T^2 is the only difference
    unscaled = qatfx.distillation_loss(s / T, t / T, 1.0)
    assert qatfx.distillation_loss(s, t, T).item() == (unscaled * (T * T)).item()
    # High-temperature limit (Hinton et al.): T^2 KL -> (1/2V) sum_i (d_i - mean d)^2 per token,
    # d = z_t - z_s. Without the T^2 the loss would vanish like 1/T^2. The next term of the
    # expansion is O(max|z| / T) relative: 3 x 3 / 300 = 3% covers it (logits are ~N(0, 9)).
    T = 300.0
    d = (t - s).double()
    limit = ((d - d.mean(-1, keepdim=True)) ** 2).mean(-1).mean().item() / 2
    z = torch.cat([s, t]).abs().max().item()
    assert abs(qatfx.distillation_loss(s, t, T).item() - limit) <= 3 * z / T * limit


def test_gradient_reaches_the_student_only_and_is_t_times_p_s_minus_p_t():
    s = logits(0).requires_grad_()
    t = logits(1).requires_grad_()
    T = 2.0
    qatfx.distillation_loss(s, t, T).backward()
    assert t.grad is None  # the teacher is detached
    # d/dz_s [T^2 KL(p_t || softmax(z_s / T))] = T (p_s - p_t), averaged over the 15 tokens.
    # float32 softmax differences: a few eps per probability, x T / N.
    expected = T * (F.softmax(s.detach().double() / T, -1) - F.softmax(t.detach().double() / T, -1)) / 15
    assert torch.allclose(s.grad.double(), expected, rtol=0, atol=8 * EPS32 * T / 15)


def test_mask_leaves_positions_out():
    s, t = logits(0), logits(1)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, :2] = False
    mask[2, 4] = False
    loss = qatfx.distillation_loss(s, t, 1.5, mask=mask)
    # the same as the kept positions alone: the same rows through the same ops
    assert loss.item() == qatfx.distillation_loss(s[mask], t[mask], 1.5).item()
    assert loss.item() != qatfx.distillation_loss(s, t, 1.5).item()  # the masked rows would count
    # anything at a masked position, inf and nan included, changes nothing
    s2, t2 = s.clone(), t.clone()
    s2[~mask], t2[~mask] = float("nan"), float("inf")
    assert qatfx.distillation_loss(s2, t2, 1.5, mask=mask).item() == loss.item()
    # a 0/1 mask of another dtype is the same mask
    assert qatfx.distillation_loss(s, t, 1.5, mask=mask.long()).item() == loss.item()
    assert qatfx.distillation_loss(s, t, 1.5, mask=mask.float()).item() == loss.item()
    # masked positions get no gradient
    s3 = s.clone().requires_grad_()
    qatfx.distillation_loss(s3, t, 1.5, mask=mask).backward()
    assert torch.all(s3.grad[~mask] == 0) and torch.all(s3.grad[mask].abs().sum(-1) > 0)


def test_all_masked_is_zero_with_a_zero_gradient():
    s = logits(0).requires_grad_()
    loss = qatfx.distillation_loss(s, logits(1), 2.0, mask=torch.zeros(3, 5, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_bf16_logits_are_upcast_exactly():
    s, t = logits(0).bfloat16().requires_grad_(), logits(1).bfloat16()
    loss = qatfx.distillation_loss(s, t, 2.0)
    # bf16 -> float32 is exact, then the same float32 computation
    assert loss.dtype == torch.float32
    assert loss.item() == qatfx.distillation_loss(s.detach().float(), t.float(), 2.0).item()
    loss.backward()
    assert s.grad.dtype == torch.bfloat16 and s.grad.abs().sum() > 0


def test_teacher_logits_that_rule_a_token_out_add_nothing():
    s, t = logits(0), logits(1)
    t_out = t.clone()
    t_out[..., 3] = float("-inf")  # p_t = 0 there: 0 log 0 = 0, not nan
    loss = qatfx.distillation_loss(s, t_out)
    assert math.isfinite(loss.item())
    keep = [i for i in range(17) if i != 3]
    log_s = F.log_softmax(s, -1)[..., keep]
    log_t = F.log_softmax(t_out, -1)[..., keep]
    expected = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    # the same terms, except the kept 16 are summed within a 17-wide reduction: 17 eps of the sum
    assert abs(loss.item() - expected.item()) <= 17 * EPS32 * expected.item()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(teacher_logits=logits(1, (3, 5, 16))), ValueError, r"student logits \(3, 5, 17\) and teacher logits \(3, 5, 16\) differ"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be a finite number > 0"),
        (dict(mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, r"mask has shape \(3, 4\), the logits' positions \(3, 5\)"),
        (dict(mask=torch.full((3, 5), 2)), ValueError, "must hold only 0 and 1"),
        (dict(teacher_logits=torch.zeros(3, 5, 17, dtype=torch.long)), TypeError, "floating-point logits"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, message):
    arguments = dict(student_logits=logits(0), teacher_logits=logits(1)) | kwargs
    with pytest.raises(error, match=message):
        qatfx.distillation_loss(**arguments)


# --- frozen_teacher ------------------------------------------------------------------------


def float_model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(CONFIG).eval()


def storages(tensors) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors}


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def buffer_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())


def example():
    return torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))


def train_steps(student, steps: int = 3) -> None:
    """A few eager AdamW steps on next-token cross-entropy (what QAT does to the weights)."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    student.train()
    for step in range(steps):
        batch = torch.randint(0, CONFIG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(step + 1))
        F.cross_entropy(student(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    student.eval()


@pytest.mark.parametrize("regions", [None, "auto"])
def test_full_qat_teacher_copies_every_trained_weight_and_keeps_its_outputs(regions, caplog):
    model = float_model()
    x = example()
    with torch.no_grad():
        start = model(x)
    student = qatfx.prepare_pt2e(model, QUANTIZER, (x,), regions=regions)
    with caplog.at_level(logging.INFO, logger="qatfx.distillation"):
        teacher = qatfx.frozen_teacher(model, student)
    # prepare_pt2e trains the float model's tensors: every parameter is copied, no storage shared
    assert storages(teacher.parameters()).isdisjoint(storages(model.parameters()))
    assert storages(teacher.buffers()) == storages(model.buffers())  # the RoPE tables: never trained
    memory = teacher_memory(teacher)
    assert memory.copied_bytes == param_bytes(model) and memory.shared_bytes == buffer_bytes(model) > 0
    assert set(memory.copied) == {name for name, _ in model.named_parameters()}
    assert f"{memory.copied_bytes:,} bytes copied" in caplog.text
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the user's model is left as it was

    train_steps(student)
    with torch.no_grad():
        # the same module on the same input: the start's computation op for op
        assert torch.equal(teacher(x), start)
        assert not torch.equal(model(x), start)  # the float model did move (this test can fail)
    check_teacher(teacher, student)
    with pytest.raises(ValueError, match="shares the storage of .* tensors the student trains"):
        check_teacher(model, student)  # the float model itself follows the student


def test_lora_teacher_shares_every_tensor():
    model = float_model()
    x = example()
    with torch.no_grad():
        start = model(x)
    student = qatfx.prepare_pt2e(model, QUANTIZER, (x,), lora=qatfx.LoRA(4, 8, targets=["*_proj"]))
    teacher = qatfx.frozen_teacher(model, student)
    # the base is frozen and the adapters are new tensors: nothing the student trains is in the teacher
    assert storages(teacher.parameters()) == storages(model.parameters())
    assert storages(teacher.buffers()) == storages(model.buffers())
    memory = teacher_memory(teacher)
    assert memory.copied_bytes == 0 and memory.copied == ()
    assert memory.shared_bytes == param_bytes(model) + buffer_bytes(model)
    # frozen as new Parameters on the same storage: the user's model keeps requires_grad
    assert not any(p.requires_grad for p in teacher.parameters()) and all(p.requires_grad for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    adapters = {name: p.detach().clone() for name, p in student.named_parameters() if p.requires_grad}
    train_steps(student)
    assert adapters and all(not torch.equal(p, adapters[name]) for name, p in student.named_parameters() if p.requires_grad)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # the base did not move
    with torch.no_grad():
        assert torch.equal(teacher(x), start)
    check_teacher(teacher, student)


def test_several_students_and_no_student():
    # qatfx finetune's case: the float control trains the model's tensors, the QAT copy its own
    model = float_model()
    control = qatfx.prepare_pt2e(model, QUANTIZER, (example(),))
    qat = copy.deepcopy(control)
    assert teacher_memory(qatfx.frozen_teacher(model, qat)).copied_bytes == 0  # qat alone shares nothing with model
    both = teacher_memory(qatfx.frozen_teacher(model, (control, qat)))
    assert both.copied_bytes == param_bytes(model)
    # no student: whatever requires grad in the float model may train
    assert teacher_memory(qatfx.frozen_teacher(model)).copied_bytes == param_bytes(model)
    model.embed.weight.requires_grad_(False)
    alone = teacher_memory(qatfx.frozen_teacher(model))
    assert alone.copied_bytes == param_bytes(model) - model.embed.weight.numel() * 4
    assert "embed.weight" not in alone.copied


def test_batch_norm_running_statistics_are_copied():
    # a training forward updates them in place: a shared one would follow the student
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)).eval()
    teacher = qatfx.frozen_teacher(model, student=model)  # a float fine-tune of the model itself
    assert set(teacher_memory(teacher).copied) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                                                   "1.running_var", "1.num_batches_tracked"}
    x = torch.randn(16, 8)
    with torch.no_grad():
        start = teacher(x)
        model.train()(x * 5 + 3)  # moves the running statistics, no optimizer step
        assert torch.equal(teacher(x), start)
        assert not torch.equal(model.eval()(x), start)


def test_misuse_is_refused():
    model = float_model()
    student = qatfx.prepare_pt2e(model, QUANTIZER, (example(),))
    with pytest.raises(ValueError, match=r"takes the float model .* got a prepared qatfx model"):
        qatfx.frozen_teacher(student)
    with pytest.raises(ValueError, match="parameters that require grad"):
        check_teacher(copy.deepcopy(model), student)
    with pytest.raises(ValueError, match="not built by qatfx.frozen_teacher"):
        teacher_memory(model)


def test_the_documented_loop_runs():
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "distillation.md"
    snippet = next(s for s in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S) if "for step in" in s)
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(snippet, str(doc), "exec"), namespace)
    student, teacher, model = namespace["student"], namespace["teacher"], namespace["model"]
    assert teacher_memory(teacher).copied_bytes == param_bytes(model)  # full QAT: every weight copied
    assert math.isfinite(namespace["loss"].item()) and namespace["kd"].item() > 0
    check_teacher(teacher, student)
