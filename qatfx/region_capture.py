"""Region capture: which parts of a model to export separately, and what each one is called with.

`prepare_pt2e(model, quantizer, example_inputs, regions="auto")` keeps the user's model
object (its class, methods, `config`, parameter names) and replaces only its regions by
prepared graphs. The automatic choice is every repeated block (a ModuleList of two or more
modules of one class holding weight matrices: the decoder layers) plus every linear-like
module outside them (`lm_head`). A region must be exportable on its own, so it is recorded
with forward pre-hooks during one run of the model on the example inputs: the arguments it
really gets (attention masks, position embeddings, keyword arguments) become its example
inputs. A region called with an object torch.export cannot capture faithfully (a KV-cache
object the block mutates) is split into its children that hold weights, down to single
linears if need be, so the cache stays outside every captured graph.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Union

import torch

log = logging.getLogger("qatfx.regions")

AUTO = "auto"
Regions = Union[str, Iterable[str]]

# Values a captured graph takes as they are (tensors, constants) or as containers of them.
_PLAIN = (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device)


@dataclass
class RegionCall:
    """The first call of a region during the recording run, and how often it was called."""

    args: tuple
    kwargs: dict
    calls: int = 1


def _is_linear_like(module: torch.nn.Module) -> bool:
    """A module that multiplies by its own 2-D weight: nn.Linear, GPT-2's Conv1D."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.nn.Parameter) and weight.dim() == 2 and not isinstance(module, torch.nn.Embedding)


def _holds_linear(module: torch.nn.Module) -> bool:
    return any(_is_linear_like(m) for m in module.modules())


def _repeated_blocks(model: torch.nn.Module) -> list[str]:
    """Paths of the members of every ModuleList of >= 2 modules of one class holding linears."""
    found: list[str] = []
    for name, module in model.named_modules():
        if any(name == b or name.startswith(b + ".") for b in found):
            continue
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            if _holds_linear(module[0]):
                found += [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    return found


def _covered(name: str, regions: list[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in regions)


def auto_regions(model: torch.nn.Module, *, embeddings: bool = False) -> list[str]:
    """Every repeated block, then every linear-like module outside the blocks (and, when
    embeddings are quantized, every nn.Embedding outside them), in module order."""
    blocks = _repeated_blocks(model)
    return blocks + [
        name for name, m in model.named_modules()
        if (_is_linear_like(m) or (embeddings and isinstance(m, torch.nn.Embedding))) and not _covered(name, blocks)
    ]


def opaque_argument(args: tuple, kwargs: dict) -> Any:
    """The first argument value (searched through tuples, lists and dicts) that is not a
    tensor or a constant: an object a captured graph could not update (a KV cache). None
    when there is none."""
    stack = [*args, *kwargs.values()]
    while stack:
        value = stack.pop(0)
        if isinstance(value, (tuple, list)):
            stack[:0] = list(value)
        elif isinstance(value, dict):
            stack[:0] = list(value.values())
        elif not isinstance(value, _PLAIN):
            return value
    return None


@dataclass(frozen=True)
class OutsideLinear:
    """A linear the model computes from a parameter outside every region (torchtune's tied
    output projection is `F.linear(h, tok_embeddings.weight)` in the decoder's forward)."""

    weight: str  # the parameter's name in the model
    op: str
    shape: tuple  # (N, K)
    dtype: torch.dtype


_LINEAR_FUNCTIONS = {torch.nn.functional.linear: 1, torch.matmul: 1, torch.Tensor.matmul: 1, torch.mm: 1, torch.Tensor.mm: 1}


class _OutsideLinears(torch.overrides.TorchFunctionMode):
    """Notes every linear whose weight is a model parameter while no region is running."""

    def __init__(self, parameters: dict[int, str]) -> None:
        super().__init__()
        self.parameters = parameters
        self.depth = 0  # regions running now
        self.found: dict[str, OutsideLinear] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        index = _LINEAR_FUNCTIONS.get(func)
        if self.depth == 0 and index is not None and len(args) > index:
            weight = args[index]
            name = self.parameters.get(id(weight))
            if name is not None and weight.dim() == 2:
                shape = tuple(weight.shape) if func is torch.nn.functional.linear else tuple(weight.shape)[::-1]
                self.found.setdefault(name, OutsideLinear(name, func.__name__, shape, weight.dtype))
        return func(*args, **kwargs)


def record_calls(
    model: torch.nn.Module, names: list[str], args: tuple, kwargs: dict
) -> tuple[dict[str, RegionCall], list[OutsideLinear]]:
    """Run `model(*args, **kwargs)` once (no grad); return what each named module is called
    with, and the linears computed outside all of them."""
    calls: dict[str, RegionCall] = {}
    watcher = _OutsideLinears({id(p): n for n, p in model.named_parameters(remove_duplicate=False)})
    hooks = []

    def enter(name: str):
        def hook(module, call_args, call_kwargs):
            watcher.depth += 1
            if name in calls:
                calls[name].calls += 1
            else:
                calls[name] = RegionCall(tuple(call_args), dict(call_kwargs))

        return hook

    def leave(module, call_args, output):
        watcher.depth -= 1

    try:
        for name in names:
            module = model.get_submodule(name)
            hooks.append(module.register_forward_pre_hook(enter(name), with_kwargs=True))
            hooks.append(module.register_forward_hook(leave, always_call=True))
        with torch.no_grad(), watcher, _side_effects_undone(model):
            model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return calls, list(watcher.found.values())


@contextlib.contextmanager
def _side_effects_undone(model: torch.nn.Module) -> Iterator[None]:
    """The recording run leaves the user's state as it was: the random number generators
    (dropout draws) and the buffers (batch-norm running statistics in train mode)."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    cuda = sorted({t.device for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"}, key=str)
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if not torch.equal(b, buffers[name]):
                    b.copy_(buffers[name])


def _children_with_linears(model: torch.nn.Module, path: str) -> list[str]:
    module = model.get_submodule(path)
    return [f"{path}.{name}" for name, child in module.named_children() if _holds_linear(child)]


def _check_named(model: torch.nn.Module, names: list[str]) -> None:
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"regions: {type(model).__name__} has no submodule {name!r}; name modules as in "
                "model.named_modules() (e.g. 'model.layers.0', 'lm_head'), or pass regions='auto'"
            ) from None
        nested = [other for other in names if other != name and other.startswith(name + ".")]
        if nested:
            raise ValueError(f"regions: {nested[0]!r} lies inside {name!r}; name each region once, without overlaps")


def plan_regions(
    model: torch.nn.Module, regions: Regions, args: tuple, kwargs: dict, *, embeddings: bool = False
) -> tuple[dict[str, RegionCall], list[OutsideLinear]]:
    """The regions to capture (in module order), what each is called with, and the linears
    left outside them."""
    automatic = isinstance(regions, str)
    if automatic and regions != AUTO:
        raise ValueError(f"regions must be 'auto', a list of module names or None (whole model), got {regions!r}")
    names = auto_regions(model, embeddings=embeddings) if automatic else list(regions)
    _check_named(model, names)
    if not names:
        raise ValueError(
            f"regions='auto' found no linear layers in {type(model).__name__} to capture; pass regions= a list "
            "of the modules that hold them, or regions=None to capture the whole model"
        )
    while True:
        calls, outside = record_calls(model, names, args, kwargs)
        split = []
        for name in names:
            if name not in calls:
                continue
            opaque = opaque_argument(calls[name].args, calls[name].kwargs)
            if opaque is None:
                continue
            children = _children_with_linears(model, name)
            if not automatic or not children:
                raise ValueError(
                    f"region {name!r} ({type(model.get_submodule(name)).__name__}) is called with a "
                    f"{type(opaque).__name__}, which a captured graph cannot update; name smaller regions that "
                    "do not receive it (its linear layers), or pass regions='auto', which does so"
                )
            log.info("qatfx: region %s is called with a %s; capturing its children instead", name, type(opaque).__name__)
            split.append((name, children))
        if not split:
            break
        for name, children in split:
            at = names.index(name)
            names[at:at + 1] = children
    for name in names:
        if name not in calls:
            log.warning("qatfx: region %s was not called by the example inputs; left in float", name)
    return {_unwrapped(model, name): calls[name] for name in names if name in calls}, outside


def _unwrapped(model: torch.nn.Module, path: str) -> str:
    """The module to capture for a region: inside an activation-checkpointing wrapper
    (torch.distributed's CheckpointWrapper, as torchtune applies it before its quantizer's
    prepare), the wrapped module, so the wrapper keeps checkpointing the prepared graph.
    It is called with the wrapper's own arguments."""
    module = model.get_submodule(path)
    while hasattr(module, "_checkpoint_wrapped_module"):
        module = module._checkpoint_wrapped_module
        path += "._checkpoint_wrapped_module"
    return path


def replace_module(model: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
