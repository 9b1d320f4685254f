"""Regional compilation: compile each region of a region capture, once per distinct graph.

    prepared = qatfx.prepare_pt2e(model, quantizer, example_inputs, regions="auto")
    qatfx.compile_regions(prepared)                        # Inductor, in place
    qatfx.compile_regions(converted, backend="qatfx")      # the qatfx lowering

`torch.compile(model)` of a regional model inlines every block into one graph, so compile
time grows with the depth. PyTorch's regional compilation compiles each repeated block
instead (`block.compile()`): Dynamo caches compiled code on the code object it runs and,
with `inline_inbuilt_nn_modules`, takes the block's parameters as graph inputs, so the
second block reuses the first block's code. An fx GraphModule defeats that: every instance
gets its own class (`GraphModuleImpl`) and its own generated `forward`, and Dynamo guards
on the module's type, so N identical region graphs are N compiles (and past
`torch._dynamo.config.recompile_limit` the rest would run eagerly).

`compile_regions` puts regions whose graphs are the same (same generated code, same
parameter and buffer shapes) into one shared class holding one `forward`: Dynamo compiles
each such group once. A pass that later changes one region's graph (`disable_fake_quant`,
`.train()`) recompiles it into a class of its own first, so the other regions keep their
code, and then it joins the regions whose new code matches (a toggle over the whole model
recompiles each group once, not each region).
"""

from __future__ import annotations

import inspect
import logging
import weakref
from typing import Any, Hashable

import torch
import torch.fx

from qatfx.graph.regions import graph_regions, is_qatfx_graph, is_regional
from qatfx.lean.compiled import compile_options

log = logging.getLogger("qatfx.regional_compile")

# The shared class of each group of regions, by _group_key; an entry goes once no region uses the class.
_GROUPS: "weakref.WeakValueDictionary[Hashable, type]" = weakref.WeakValueDictionary()


def compile_regions(model: torch.nn.Module, **compile_kwargs: Any) -> torch.nn.Module:
    """Compile every region of a region capture in place (`region.compile(**compile_kwargs)`,
    torch.compile's arguments: backend=, mode=, options=, dynamic=, fullgraph=), identical
    regions sharing one compiled code. Returns `model`, which runs compiled from then on
    (train it as usual; `loss.backward()` goes through the compiled regions).

    With Inductor (the default backend) the weights' fake quantization is recomputed in
    backward rather than kept from forward (`qatfx.compile_options()`), unless `options`
    sets its own joint_custom_post_pass or `mode` is given (torch.compile takes one of the two)."""
    _check_regional(model)
    if compile_kwargs.get("backend", "inductor") == "inductor" and "mode" not in compile_kwargs:
        compile_kwargs["options"] = {**compile_options(), **(compile_kwargs.get("options") or {})}
    regions = graph_regions(model)
    for _, gm in regions:
        _join_group(gm)
        gm.compile(**compile_kwargs)
    groups = {type(gm) for _, gm in regions}
    log.info("qatfx: compiling %d regions as %d distinct graphs", len(regions), len(groups))
    return model


def _check_regional(model: Any) -> None:
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(
            "compile_regions: this model is already wrapped by torch.compile; pass the model itself "
            "(compile_regions(model) replaces torch.compile(model), it does not go inside it)"
        )
    if is_qatfx_graph(model):
        raise ValueError(
            "compile_regions needs a region capture (prepare_pt2e(..., regions='auto')); this is a whole-model "
            "QATGraphModule (one graph, nothing to reuse): compile it with torch.compile(model) "
            "(backend='qatfx' for a converted model)"
        )
    if not isinstance(model, torch.nn.Module) or not is_regional(model):
        raise ValueError(
            f"compile_regions: {type(model).__name__} holds no qatfx regions; prepare it with "
            "qatfx.prepare_pt2e(model, quantizer, example_inputs, regions='auto') first"
        )


def _base_class(gm: torch.fx.GraphModule) -> type:
    """The class a GraphModule's per-instance class derives from (QATGraphModule), found as
    GraphModule.__new__ finds it: the first class not named GraphModuleImpl."""
    return next(t for t in type(gm).__mro__ if t.__qualname__.split(".")[-1] != "GraphModuleImpl")


def _group_key(gm: torch.fx.GraphModule) -> Hashable:
    """Regions with equal keys run the same Python code on tensors of the same shapes."""
    forward = type(gm).forward
    names = forward.__code__.co_names
    # The globals the code reads, by identity (two graphs calling different objects of one
    # name must not share), and each parameter's and buffer's shape: regions of one code but
    # other shapes get their own code object, so Dynamo's per-code recompile limit is not
    # shared among them.
    globals_read = tuple((n, id(forward.__globals__[n])) for n in names if n in forward.__globals__)
    tensors = tuple(
        (name, tuple(t.shape), t.dtype, t.device, t.requires_grad)
        for name, t in (*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False))
    )
    return (_base_class(gm), gm.code, globals_read, tensors, _instance_forwards(gm))


def _instance_forwards(gm: torch.fx.GraphModule) -> tuple:
    """Submodules whose forward is their own function, not their class's: torch.export's
    `_guards_fn` (its input checks, generated per graph). Dynamo guards on that function's
    code too, so equal ones must be one function in a group; compared by their code."""
    found = []
    for name, module in gm.named_modules():
        forward = module.__dict__.get("forward")
        if callable(forward):
            code = inspect.unwrap(forward).__code__
            found.append((name, code.co_code, code.co_consts, code.co_names, code.co_varnames))
    return tuple(found)


def _own_forwards(gm: torch.fx.GraphModule) -> dict[str, Any]:
    return {name: m.__dict__["forward"] for name, m in gm.named_modules() if callable(m.__dict__.get("forward"))}


def _join_group(gm: torch.fx.GraphModule) -> None:
    """Move `gm` into the class of the regions with its key, or make its own class that class."""
    if not getattr(type(gm), "_qatfx_region_class", False):
        _move_to_region_class(gm)
    key = _group_key(gm)
    group = _GROUPS.get(key)
    if group is None:
        group = _GROUPS[key] = type(gm)
        group._qatfx_shared_forwards = _own_forwards(gm)
    for name, forward in group._qatfx_shared_forwards.items():
        gm.get_submodule(name).forward = forward
    gm.__class__ = group


def _move_to_region_class(gm: torch.fx.GraphModule) -> None:
    """Give `gm` a class of compile_regions' kind (see _recompile_alone) with its forward."""
    cls = _new_region_class(gm)
    super(cls, gm).recompile()  # installs forward and the call wrapper on cls


def _new_region_class(gm: torch.fx.GraphModule) -> type:
    # Named GraphModuleImpl like the class GraphModule.__new__ makes, so a deepcopy (convert_pt2e)
    # skips it and gives the copy a plain per-instance class (the copy is not compiled).
    base = _base_class(gm)
    cls = type("GraphModuleImpl", (base,), {"recompile": _recompile_alone, "_qatfx_region_class": True})
    cls.__module__ = base.__module__
    gm.__class__ = cls
    return cls


def _recompile_alone(self: torch.fx.GraphModule):
    # GraphModule.recompile writes the new forward onto type(self): in a shared class it
    # would change every region of the group, so this region takes a class of its own first,
    # then joins the regions whose code is now the same as its own.
    cls = _new_region_class(self)
    code = super(cls, self).recompile()
    _join_group(self)
    return code
