"""The fused linear's activations: one table from the name the op takes to the torch
function (the CPU path, the kernel's reference and the pattern the lowering matches) and
to the Triton kernel's ACTIVATION constexpr."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    kernel_code: int  # `ACTIVATION` in kernels/w4a8_gemm.py::_activation


def _identity(y: torch.Tensor) -> torch.Tensor:
    return y


def _gelu_tanh(y: torch.Tensor) -> torch.Tensor:
    return F.gelu(y, approximate="tanh")


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("none", _identity, 0),
        Activation("relu", torch.relu, 1),
        Activation("gelu", F.gelu, 2),
        Activation("gelu_tanh", _gelu_tanh, 3),
        Activation("silu", F.silu, 4),
    )
}


def activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"qatfx.w4a8_linear: unknown activation {name!r}; expected one of {tuple(ACTIVATIONS)}") from None
