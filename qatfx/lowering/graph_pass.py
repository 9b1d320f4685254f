"""The Inductor post-grad pass that lowers a converted qatfx graph.

Matches:     qatfx::dequantize(activation) + qatfx::dequantize_int4(weight) + mm/addmm,
             then relu/gelu/silu, residual add and casts after it; leftover qatfx ops.
Rewrites to: qatfx::w4a8_linear(x_q, x_scale, x_zero, w_packed, w_scales, w_group_sums,
             bias, residual, group_size, activation, compute_dtype, out_dtype), and the
             aten math of qatfx::quantize_dynamic / dequantize / dequantize_int4.
Requires:    a normalized, functional post-grad graph (Inductor's post_grad_custom_pre_pass).
Ensures:     no torchao-rule qatfx quantize/dequantize op is left for Inductor to call
             eagerly (a scale_rule="ggml" quantize_dynamic, LlamaCppQuantizer's, is left as
             the op: its fp16 scale rounding must not be fused away); every rewrite is
             counted in counters["qatfx"]; numerics as in w4a8_linear.py.

    before: dq_x = qatfx.dequantize(q, s, z, -1, f32)       after: y = qatfx.w4a8_linear(
            w = qatfx.dequantize_int4(p, ws, wsum, 32, f32)            q, s, z, p, ws, wsum,
            y = mm(reshape(dq_x), permute(w))                          None, None, 32, 'silu',
            y = silu(reshape(y))                                       f32, f32)

Installed per compile through `inductor_options()` or `backend="qatfx"`, never by assigning
Inductor's global config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from qatfx.instrument.lowering import LoweringRecorder
from qatfx.instrument.settings import resolve_dump_dir
from qatfx.graph.metadata_asserts import remove_metadata_asserts
from qatfx.lowering import patterns
from qatfx.lowering.rewrite import apply_until_fixed_point, build_pass
from qatfx.ops import dequantize

log = logging.getLogger("qatfx.lowering")


@dataclass(frozen=True)
class LoweringConfig:
    """What the pass rewrites. Part of the FX graph cache key (see `uuid`)."""

    fuse_linear: bool = True  # q/dq + linear -> qatfx::w4a8_linear
    fuse_epilogue: bool = True  # activation, residual add, cast -> the fused op's epilogue
    decompose: bool = True  # leftover qatfx ops -> aten math Inductor can fuse


@functools.cache
def _compiled_patterns(stage: str):
    # Tracing the patterns takes a moment: do it on first use, once per process.
    return build_pass(f"qatfx_{stage.lower()}", getattr(patterns, stage))


def _source_files() -> tuple[str, ...]:
    """Every qatfx source whose change changes compiled code (patterns, formats, ops, kernels)."""
    package = Path(__file__).resolve().parents[1]
    sources = sorted(str(p) for folder in ("lowering", "formats") for p in (package / folder).rglob("*.py"))
    return (*sources, str(package / "ops.py"), str(package / "reference.py"), str(package / "spec.py"))


def duplicate_shared_dequantize(graph: torch.fx.Graph) -> int:
    """Give each consumer of an activation dequantize its own copy (q/k/v share one), so a
    linear pattern owns its dequantize; the copies are fused away or dead-code eliminated."""
    copies = 0
    for node in list(graph.nodes):
        if node.target is not dequantize or len(node.users) < 2:
            continue
        for user in list(node.users)[1:]:
            with graph.inserting_before(user):
                clone = graph.call_function(dequantize, node.args, node.kwargs)
            clone.meta.update(node.meta)
            user.replace_input_with(node, clone)
            copies += 1
    return copies


def _is_qatfx_op(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "qatfx"


class QATFXGraphPass(CustomGraphPass):
    """`dump_dir`: dump the stages into this folder; None dumps where a `qatfx.debug.dump()`
    block or QATFX_DUMP_DIR says while the compile runs, or nowhere."""

    def __init__(self, config: LoweringConfig = LoweringConfig(), dump_dir: Optional[Union[str, os.PathLike]] = None) -> None:
        self.config = config
        self.dump_dir = dump_dir

    def __call__(self, graph: torch.fx.Graph) -> None:
        if not any(_is_qatfx_op(n.target) for n in graph.nodes):
            return
        record = LoweringRecorder(graph, self.dump_dir)  # logs, dumps, TORCH_TRACE: each only when on
        if self.config.fuse_linear:
            with record.stage("fuse_linear"):
                duplicate_shared_dequantize(graph)
                apply_until_fixed_point(_compiled_patterns("FUSE_LINEAR"), graph)
        if self.config.fuse_epilogue:
            with record.stage("fuse_epilogue"):
                remove_metadata_asserts(graph)
                apply_until_fixed_point(_compiled_patterns("FUSE_EPILOGUE"), graph)
        if self.config.decompose:
            with record.stage("decompose"):
                apply_until_fixed_point(_compiled_patterns("DECOMPOSE"), graph)
        with record.stage("eliminate_dead_code"):
            graph.eliminate_dead_code()
        graph.lint()

    def uuid(self) -> Optional[bytes]:
        if resolve_dump_dir(self.dump_dir) is not None:
            # No key: Inductor bypasses its FX graph cache, so the pass runs and is dumped
            # (a cache hit would skip it).
            return None
        extra = json.dumps(dataclasses.asdict(self.config), sort_keys=True)
        return get_hash_for_files(_source_files(), extra)
