"""How users install the lowering: `backend="qatfx"` or `options=inductor_options()`.

    torch.compile(converted, backend="qatfx")                      # Dynamo backend
    torch.compile(converted, options=inductor_options(my_options))  # keep Inductor, add ours

Both install `QATFXGraphPass` as Inductor's `post_grad_custom_pre_pass` for that compile
only. A pass already there (in the options given or in the global config) is kept and
runs first: from torch 2.13 the slot takes a list; before, one pass, so we chain.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from qatfx.lean.compiled import compile_options
from qatfx.lowering.graph_pass import LoweringConfig, QATFXGraphPass

SLOT = "post_grad_custom_pre_pass"


def _slot_takes_list() -> bool:
    try:
        from torch._inductor.custom_graph_pass import get_custom_graph_passes  # noqa: F401  torch >= 2.13
    except ImportError:
        return False
    return True


class ChainedGraphPass(CustomGraphPass):
    """Runs several passes in order in the single pass slot of torch <= 2.12."""

    def __init__(self, passes: list[Any]) -> None:
        self.passes = passes

    def __call__(self, graph: torch.fx.Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def uuid(self) -> Optional[tuple]:
        uuids = tuple(p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.passes)
        # A pass without a uuid cannot be cached safely; None makes Inductor bypass the cache.
        return None if None in uuids else uuids


def _existing_passes(options: dict[str, Any]) -> list[Any]:
    current = options.get(SLOT, torch._inductor.config.post_grad_custom_pre_pass)
    if current is None:
        return []
    if isinstance(current, (list, tuple)):
        current = list(current)
    elif isinstance(current, ChainedGraphPass):
        current = list(current.passes)
    else:
        current = [current]
    return [p for p in current if not isinstance(p, QATFXGraphPass)]


def inductor_options(
    options: Optional[dict[str, Any]] = None,
    config: LoweringConfig = LoweringConfig(),
    *,
    dump_dir: Optional[Union[str, os.PathLike]] = None,
) -> dict[str, Any]:
    """A copy of `options` (Inductor config for one compile) with qatfx's pass added;
    `dump_dir` sends the pass's stage dumps there (see QATFXGraphPass)."""
    merged = dict(options or {})
    passes = [*_existing_passes(merged), QATFXGraphPass(config, dump_dir)]
    if len(passes) == 1:
        merged[SLOT] = passes[0]
    elif _slot_takes_list():
        merged[SLOT] = passes
    else:
        merged[SLOT] = ChainedGraphPass(passes)
    return merged


def qatfx_backend(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any):
    """Dynamo backend "qatfx": Inductor with the qatfx lowering pass for this compile.

    Accepts torch.compile's `options=` (Inductor config, merged as in `inductor_options`;
    they override qatfx's defaults, and two keys are qatfx's own: "qatfx", a
    LoweringConfig, and "qatfx_dump_dir", the folder the lowering stages dump to) and
    `mode=` (an Inductor mode such as "reduce-overhead" or "max-autotune").
    """
    from torch._inductor.compile_fx import compile_fx

    options = dict(kwargs.pop("options", None) or {})
    config = options.pop("qatfx", LoweringConfig())
    dump_dir = options.pop("qatfx_dump_dir", None)
    mode = kwargs.pop("mode", None)
    if kwargs:
        raise TypeError(f"backend 'qatfx' got unexpected arguments {sorted(kwargs)}; pass Inductor settings in options=")
    # compile_options: a prepared model trained through this backend recomputes its
    # weights' fake quantization in backward (qatfx/lean/compiled.py); in a graph without
    # a backward (a converted model) its marks go unread: only the partitioner reads them
    patches = {**_NUMERICS, **compile_options(), **_mode_options(mode), **inductor_options(options, config, dump_dir=dump_dir)}
    return compile_fx(gm, example_inputs, config_patches=patches)


# Round low-precision intermediates where eager rounds them, so a compiled bf16 model's
# activation scales are those of the eager converted model (without it, Inductor keeps
# them in fp32: 0.98% relative RMS difference on a bf16 MLP against 0.32% with it).
_NUMERICS = {"emulate_precision_casts": True}


def _mode_options(mode: Optional[str]) -> dict[str, Any]:
    if mode is None:
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))
