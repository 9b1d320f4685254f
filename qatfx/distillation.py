"""Knowledge distillation from the float model (LLM-QAT, Gemma's QAT): the loss, and a
frozen teacher that costs no parameter memory where the student leaves the float weights
alone.

    student = qatfx.prepare_pt2e(model, quantizer, example)          # trains model's tensors in place
    teacher = qatfx.frozen_teacher(model, student)                   # after prepare, before training
    with torch.no_grad():
        teacher_logits = teacher(x)
    loss = (1 - w) * ce + w * qatfx.distillation_loss(student(x), teacher_logits, temperature=T)

What the teacher copies. `prepare_pt2e` (whole or region capture) trains the float model's
own parameter tensors in place, so a teacher that shared them would follow the student:
`frozen_teacher` copies every float tensor whose storage a trainable parameter of the student
uses (full QAT: all trained weights, once, without gradients or optimizer state) and shares
every other one (QAT+LoRA: the base weights are frozen, the adapters are new tensors, so
nothing is copied). It measures the result by storage and records it in
`teacher.qatfx_teacher_memory` (a `TeacherMemory`), also logged.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from qatfx.graph.regions import model_stage

log = logging.getLogger("qatfx.distillation")

MEMORY_ATTR = "qatfx_teacher_memory"


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """KL(p_teacher,T || p_student,T) x T^2, summed over the vocabulary (the last dim) and
    averaged over the tokens (every other dim), a float32 scalar.

    p_x,T = softmax(logits / T), computed as log_softmax in float32 whatever the logits'
    dtype (bf16 logits are upcast exactly). The teacher gets no gradient (detached). T^2 keeps
    the gradient's scale independent of T (Hinton et al.), so the weight between this and the
    cross-entropy means the same at every temperature.

    mask: optional, of shape logits.shape[:-1], bool or 0/1: positions where it is False (0)
        are left out entirely (their logits may hold anything, inf included, and get a zero
        gradient); the mean is over the remaining positions. A batch with every position
        masked has nothing to distil: the loss is 0 (still connected to the student's graph,
        so backward runs and gives zero gradients), not an error, so one all-padding batch
        does not stop a training run.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"distillation_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; run the teacher on the same inputs, with the same vocabulary"
        )
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0:
        raise ValueError(f"distillation_loss: logits of shape {tuple(student_logits.shape)} have no vocabulary dimension")
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise TypeError(f"distillation_loss takes floating-point logits, got {student_logits.dtype} and {teacher_logits.dtype}")
    check_temperature(temperature)
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    if mask is not None:
        keep = _bool_mask(mask, student_logits.shape[:-1]).to(student.device).reshape(-1)
        student, teacher = student[keep], teacher[keep]
    if student.shape[0] == 0:
        return student.float().sum() * 0.0  # all masked: 0, with a (zero) gradient path
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    p_t = log_t.exp()
    # p log(p/q), with 0 log 0 = 0: a teacher logit of -inf (a token it rules out) adds nothing
    kl = torch.where(p_t > 0, p_t * (log_t - log_s), 0.0).sum(dim=-1)
    return kl.mean() * (temperature * temperature)


def check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"distillation temperature must be a finite number > 0 (1.0: the model's own distribution), got {temperature!r}")


def check_kd_weight(kd_weight: float) -> None:
    if not (isinstance(kd_weight, (int, float)) and 0.0 <= kd_weight <= 1.0):
        raise ValueError(
            f"kd_weight must be in [0, 1] (loss = (1 - kd_weight) x cross-entropy + kd_weight x distillation; "
            f"1: distillation only), got {kd_weight!r}"
        )


def _bool_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"distillation_loss: the mask has shape {tuple(mask.shape)}, the logits' positions {tuple(shape)}; "
                         "give one value per position (logits.shape[:-1])")
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("distillation_loss: a non-bool mask must hold only 0 and 1 (1: use the position)")
    return mask != 0


@dataclass(frozen=True)
class TeacherMemory:
    """What a teacher holds, by storage: `copied_bytes` in tensors of its own (made by
    frozen_teacher), `shared_bytes` in storages it shares with the float model; `copied`
    names the float model's copied tensors (parameters and buffers)."""

    copied_bytes: int
    shared_bytes: int
    copied: tuple[str, ...]

    def __str__(self) -> str:
        return (f"teacher: {self.copied_bytes:,} bytes copied ({len(self.copied)} tensors), "
                f"{self.shared_bytes:,} bytes shared with the float model")


def frozen_teacher(float_model: nn.Module, student: Union[nn.Module, Iterable[nn.Module], None] = None) -> nn.Module:
    """A frozen copy of `float_model` (requires_grad False, eval mode) for distillation,
    sharing every tensor the student will not change and copying the ones it will.

    Build it after `prepare_pt2e` and before training: `student` is the prepared model (or
    several: every model that will train, as `qatfx finetune`'s float control and QAT copy),
    and a float tensor is copied when its storage is used by a parameter the student trains
    (requires_grad True now). Without `student`, every parameter of `float_model` that
    requires grad is copied (safe for any training of it). Buffers are shared, except
    batch-norm running statistics the student shares (a training forward updates them).

    `float_model` itself is left as it is (its parameters keep their requires_grad); the
    teacher's frozen parameters are new `nn.Parameter`s on the shared storage. The bytes
    copied and shared are measured by storage and kept in `teacher.qatfx_teacher_memory`.
    """
    stage = model_stage(float_model)
    if stage is not None:
        raise ValueError(
            f"frozen_teacher takes the float model (the one given to prepare_pt2e), got a {stage} qatfx model; "
            "pass the float model and the prepared one as student: frozen_teacher(model, student=prepared)"
        )
    students = [] if student is None else [student] if isinstance(student, nn.Module) else list(student)
    if student is not None:
        trained = {_storage_key(p) for s in students for p in s.parameters() if p.requires_grad}
        shared_buffers = {_storage_key(b) for s in students for b in s.buffers()}
    else:
        trained = {_storage_key(p) for p in float_model.parameters() if p.requires_grad}
        shared_buffers = {_storage_key(b) for b in float_model.buffers()}
    running_stats = _running_stat_buffers(float_model)

    memo: dict[int, torch.Tensor] = {}
    copied: list[str] = []
    for name, param in float_model.named_parameters(remove_duplicate=True):
        data = param.detach()
        if _storage_key(param) in trained:
            data = data.clone()
            copied.append(name)
        memo[id(param)] = nn.Parameter(data, requires_grad=False)
    for name, buffer in float_model.named_buffers(remove_duplicate=True):
        if id(buffer) in running_stats and _storage_key(buffer) in shared_buffers:
            memo[id(buffer)] = buffer.detach().clone()
            copied.append(name)
        else:
            memo[id(buffer)] = buffer
    teacher = copy.deepcopy(float_model, memo).eval()
    teacher.requires_grad_(False)
    memory = _measure(teacher, float_model, tuple(copied))
    setattr(teacher, MEMORY_ATTR, memory)
    log.info("qatfx.frozen_teacher: %s", memory)
    return teacher


def teacher_memory(teacher: nn.Module) -> TeacherMemory:
    """The TeacherMemory that frozen_teacher recorded on `teacher`."""
    memory = getattr(teacher, MEMORY_ATTR, None)
    if memory is None:
        raise ValueError(f"this {type(teacher).__name__} was not built by qatfx.frozen_teacher; build the teacher with it")
    return memory


def check_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """Refuse a teacher that would train or follow the student's training: one with
    parameters that require grad, or sharing storage with a parameter the student trains
    (passing the float model itself, whose tensors prepare_pt2e trains in place)."""
    trained = {_storage_key(p): name for name, p in student.named_parameters() if p.requires_grad}
    shared = [name for name, t in (*teacher.named_parameters(), *teacher.named_buffers()) if _storage_key(t) in trained]
    if shared:
        raise ValueError(
            f"the teacher shares the storage of {len(shared)} tensors the student trains (e.g. {shared[0]!r}), so it would "
            "follow the student's training (prepare_pt2e trains the float model's tensors in place); build it with "
            "qatfx.frozen_teacher(float_model, student=prepared) after prepare and before training"
        )
    trainable = [name for name, p in teacher.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"the teacher has {len(trainable)} parameters that require grad (e.g. {trainable[0]!r}); "
            "build it with qatfx.frozen_teacher(float_model, student) (frozen, eval mode)"
        )


def _storage_key(tensor: torch.Tensor) -> tuple:
    storage = tensor.untyped_storage()
    # an empty storage has no address to compare: a key of its own (nothing to share or copy)
    return (tensor.device, storage.data_ptr() if storage.nbytes() else ("empty", id(tensor)))


def _running_stat_buffers(model: nn.Module) -> set[int]:
    """Buffers a training forward updates in place: batch-norm (and instance-norm) running
    statistics, the only torch.nn buffers that change in training."""
    return {id(b) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) for b in m.buffers(recurse=False)}


def _measure(teacher: nn.Module, float_model: nn.Module, copied: tuple[str, ...]) -> TeacherMemory:
    source = {_storage_key(t) for t in (*float_model.parameters(), *float_model.buffers())}
    storages: dict[tuple, int] = {}
    for t in (*teacher.parameters(), *teacher.buffers()):
        storages[_storage_key(t)] = t.untyped_storage().nbytes()
    shared = sum(n for key, n in storages.items() if key in source)
    return TeacherMemory(copied_bytes=sum(storages.values()) - shared, shared_bytes=shared, copied=copied)
