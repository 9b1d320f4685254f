"""Training and evaluation loops shared by the demo and `qatfx finetune`.

Training runs through `torch.compile` of whatever module it is given (a float model or a
prepared QAT graph), as a user would run it. With a teacher (knowledge distillation,
qatfx.distillation) the loss is (1 - kd_weight) x cross-entropy + kd_weight x
distillation_loss(student, teacher, temperature), LLM-QAT's and Gemma QAT's form
(kd_weight 1: distillation only); the teacher runs under no_grad, compiled when the student
is (docs/distillation.md has the measurement). Perplexity is computed eagerly
under no_grad on non-overlapping windows, so a prepared model and its converted model are
evaluated on exactly the same computation (the numerics contract says their logits are
bit-identical).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from qatfx.api import learned_qparams
from qatfx.distillation import check_kd_weight, check_teacher, check_temperature, distillation_loss


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    # peak learning rate of learned scales / zero points (learnable_scales); None: lr. It
    # follows the same warm-up and decay, without weight decay (which would shrink them).
    scale_lr: Optional[float] = None


def random_windows(tokens: torch.Tensor, batch_size: int, length: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless (batch, length) windows at random offsets of a 1-D token tensor."""
    if tokens.numel() <= length:
        raise ValueError(f"the training text has {tokens.numel()} tokens, fewer than one window of {length + 1}")
    while True:
        starts = torch.randint(0, tokens.numel() - length, (batch_size,), generator=generator)
        yield torch.stack([tokens[s : s + length] for s in starts.tolist()])


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Bit-reproducible training for the duration of the block, then the caller's setting.

    Without it, Inductor compiles the embedding's backward (a scatter-add) into a parallel
    CPU loop with atomic adds, whose summation order varies from run to run: two runs of the
    same seed drifted apart from the second step. Deterministic mode makes Inductor emit an
    ordered kernel instead (and keys its compile cache on the setting)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@dataclass(frozen=True)
class Distillation:
    """Knowledge distillation for `train`: loss = (1 - kd_weight) x cross-entropy +
    kd_weight x qatfx.distillation_loss(student, teacher, temperature).

    teacher: a frozen model (qatfx.frozen_teacher) giving logits for the same tokens.
    parts: filled by `train` with each step's "cross_entropy" and "distillation" terms
        (before weighting), so both curves can be reported."""

    teacher: nn.Module
    kd_weight: float = 0.5
    temperature: float = 1.0
    parts: dict = field(default_factory=lambda: {"cross_entropy": [], "distillation": []}, compare=False)

    def __post_init__(self) -> None:
        check_kd_weight(self.kd_weight)
        check_temperature(self.temperature)


def train(
    model: nn.Module,
    tokens: torch.Tensor,
    config: TrainConfig,
    *,
    desc: str = "train",
    step_hook: Optional[object] = None,
    compile: bool = True,
    distill: Optional[Distillation] = None,
) -> list[float]:
    """Train `model` in place on random windows of `tokens`; returns the loss per step (with
    `distill`, the weighted sum; its two terms go to `distill.parts`).
    The same seed gives the same losses bit for bit (deterministic algorithms inside).

    `step_hook(step)` is called before each step (e.g. qatfx.FakeQuantAfterNSteps)."""
    if distill is not None:
        check_teacher(distill.teacher, model)  # before any step: a teacher that trains along is refused
    with deterministic_algorithms():
        return _train(model, tokens, config, desc, step_hook, compile, distill)


def _param_groups(model: nn.Module, params: list, config: TrainConfig) -> list[dict]:
    """One group, or two when the model has learned scales: theirs at scale_lr / lr of the
    schedule and no weight decay."""
    scales = [p for p in learned_qparams(model).values() if p.requires_grad]
    if not scales:
        return [{"params": params}]
    others = [p for p in params if all(p is not s for s in scales)]
    ratio = 1.0 if config.scale_lr is None else config.scale_lr / config.lr
    return [{"params": others}, {"params": scales, "lr_ratio": ratio, "weight_decay": 0.0}]


def _train(model, tokens, config, desc, step_hook, compile, distill) -> list[float]:
    generator = torch.Generator().manual_seed(config.seed)
    windows = random_windows(tokens, config.batch_size, config.seq_len + 1, generator)
    model.train()
    forward = torch.compile(model) if compile else model
    if distill is not None:
        # Compiled like the student: on builtin:charlm (CPU) that saves 55-75 of ~300 CPU ms per
        # step; its compile (~30 CPU s cold, ~3 s from Inductor's cache) is paid back after
        # ~460 steps cold, ~45 warm (docs/distillation.md)
        teacher = distill.teacher.eval()
        teacher_forward = torch.compile(teacher) if compile else teacher
    # only what trains: a LoRA model's frozen base stays out of the optimizer and the clipping
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(model, params, config), lr=config.lr, weight_decay=config.weight_decay)
    losses = []
    bar = tqdm(range(config.steps), desc=desc, leave=False, dynamic_ncols=True)
    for step in bar:
        if step_hook is not None:
            step_hook(step)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config) * group.get("lr_ratio", 1.0)
        batch = next(windows)
        if distill is None:
            loss = lm_loss(forward(batch[:, :-1]), batch[:, 1:])
        else:
            loss = _distillation_step(forward, teacher_forward, batch, distill)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def _distillation_step(forward, teacher_forward, batch: torch.Tensor, distill: Distillation) -> torch.Tensor:
    inputs = batch[:, :-1]
    logits = forward(inputs)
    with torch.no_grad():  # eval mode, no RNG drawn: the student's dropout masks are those of a run without teacher
        teacher_logits = teacher_forward(inputs)
    ce = lm_loss(logits, batch[:, 1:])
    kd = distillation_loss(logits, teacher_logits, distill.temperature)
    distill.parts["cross_entropy"].append(ce.item())
    distill.parts["distillation"].append(kd.item())
    # kd_weight 0 gives ce exactly (1.0 x ce + 0.0 x kd, and the kd term's gradient is 0.0 x ...)
    return (1.0 - distill.kd_weight) * ce + distill.kd_weight * kd


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int = 16, desc: str = "eval") -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `tokens` (eager, no_grad)."""
    model.eval()
    window = seq_len + 1
    n_windows = (tokens.numel() - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {window}")
    starts = [i * seq_len for i in range(n_windows)]
    total, count = 0.0, 0
    for i in tqdm(range(0, n_windows, batch_size), desc=desc, leave=False, dynamic_ncols=True):
        batch = torch.stack([tokens[s : s + window] for s in starts[i : i + batch_size]])
        logits = model(batch[:, :-1])
        nll = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)
