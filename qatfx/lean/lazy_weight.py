"""FakeQuantizedWeight: fq(W) that is computed where it is read, never stored.

F.linear's backward needs the weight it multiplied by (grad_x = grad @ fq(W)), so if fq(W)
were an ordinary tensor autograd would keep one copy per linear from forward to backward:
a second model's worth of memory. This wrapper tensor holds W (which the model holds
anyway) and W's qparams; `t()` and other 2-D transposes give another wrapper, and any
other op (the matmul forward, the matmul backward, an embedding lookup) first computes
fq(W) into a temporary. Autograd saves the wrapper, so backward recomputes fq(W) once per
matmul that needs it.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map_only

from qatfx.lean import kernels
from qatfx.lean.values import Grid, blocks, fake_quantized

aten = torch.ops.aten
_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}
_ALIASES = {aten.detach.default, aten.alias.default}


def _is_2d_swap(func, args) -> bool:
    if func is aten.transpose.int:
        return sorted(int(d) % 2 for d in args[1:3]) == [0, 1]
    if func is aten.permute.default:
        return [int(d) % 2 for d in args[1]] == [1, 0]
    return True


class FakeQuantizedWeight(torch.Tensor):
    """fq(source) (transposed when `transposed`) for a 2-D `source` and its `grid`."""

    source: torch.Tensor
    grid: Grid
    group_size: int
    transposed: bool

    @staticmethod
    def __new__(cls, source: torch.Tensor, grid: Grid, group_size: int, transposed: bool = False):
        rows, cols = source.shape
        shape, strides = ((cols, rows), (1, cols)) if transposed else ((rows, cols), (cols, 1))
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, strides=strides, dtype=source.dtype, device=source.device, requires_grad=False
        )

    def __init__(self, source: torch.Tensor, grid: Grid, group_size: int, transposed: bool = False) -> None:
        self.source = source
        self.grid = grid
        self.group_size = group_size
        self.transposed = transposed
        self._version_at_creation = source._version

    def materialize(self) -> torch.Tensor:
        if self.source._version != self._version_at_creation:
            raise RuntimeError(
                "a fake-quantized weight was modified in place between forward and backward (an optimizer "
                "step before loss.backward()?); qatfx recomputes fq(W) from W in backward, so W must not "
                "change until backward has run"
            )
        w_blocks = blocks(self.source, self.group_size)
        if kernels.used_for(self.source):
            values = kernels.values(w_blocks, self.grid)
        else:
            values, _ = fake_quantized(w_blocks, self.grid, with_mask=False)
        values = values.view(self.source.shape)
        return values.t() if self.transposed else values

    def _view(self, transposed: bool) -> "FakeQuantizedWeight":
        view = FakeQuantizedWeight(self.source, self.grid, self.group_size, transposed)
        view._version_at_creation = self._version_at_creation
        return view

    def __repr__(self) -> str:
        return f"FakeQuantizedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, transposed={self.transposed})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, FakeQuantizedWeight):
            if func in _TRANSPOSES and _is_2d_swap(func, args):
                return first._view(not first.transposed)
            if func in _ALIASES:
                return first._view(first.transposed)
        args, kwargs = tree_map_only(FakeQuantizedWeight, FakeQuantizedWeight.materialize, (args, kwargs))
        return func(*args, **kwargs)
