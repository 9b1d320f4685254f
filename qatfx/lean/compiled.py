"""The compiled counterpart of the lean weight fake-quant: a joint-graph pass for Inductor.

Traced by torch.compile, fake quantization is plain aten math, and AOTAutograd's min-cut
partitioner chooses what the forward keeps for backward. It keeps fq(W)^T (the matmul's
backward reads it) and the clamp's mask: a copy of every quantized weight plus a byte per
weight element. This pass marks the forward nodes computed from weights alone (fq(W), its
transposes, its mask; LoRA's W + sBA) MUST_RECOMPUTE, the policy selective activation
checkpointing uses, so backward recomputes them from W, which the model holds anyway.
Reductions (the per-group scales) are left to the partitioner: they are small to keep.

`qatfx.compile_regions` installs it (options={"joint_custom_post_pass": ...}: after
Inductor's own joint-graph rewrites, whose new nodes would not carry the mark); for
`torch.compile(prepared)` pass `options=qatfx.compile_options()`.
"""

from __future__ import annotations

import hashlib
import inspect

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import CheckpointPolicy


def _is_weight_input(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return (
        node.op == "placeholder"
        and node.name.startswith("primals")
        and isinstance(val, torch.Tensor)
        and val.dim() == 2
        and val.dtype.is_floating_point
    )


def _numel(node: torch.fx.Node) -> int:
    val = node.meta.get("val")
    return val.numel() if isinstance(val, torch.Tensor) else 0


def mark_weight_recompute(graph: torch.fx.Graph) -> int:
    """Mark the forward nodes whose inputs are weights or such nodes; returns how many."""
    from_weights: set[torch.fx.Node] = set()
    marked = 0
    for node in graph.nodes:
        if _is_weight_input(node):
            from_weights.add(node)
            continue
        if node.op != "call_function":
            continue
        inputs = node.all_input_nodes
        if not inputs:  # a constant (full, scalar_tensor): free to recompute with its users
            from_weights.add(node)
            continue
        if not all(i in from_weights for i in inputs):
            continue
        from_weights.add(node)
        largest_input = max(_numel(i) for i in inputs)
        if 4 * _numel(node) < largest_input:  # a reduction: its small output may be kept
            continue
        node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        marked += 1
    return marked


class RecomputeWeightFakeQuant(CustomGraphPass):
    def __call__(self, graph: torch.fx.Graph) -> None:
        mark_weight_recompute(graph)

    def uuid(self) -> bytes:
        # FX graph cache key: changes when the marking rule changes
        return hashlib.sha256(inspect.getsource(mark_weight_recompute).encode()).digest()


def compile_options() -> dict:
    """torch.compile `options` for training a prepared model: weights' fake quantization
    recomputed in backward, never kept from forward."""
    return {"joint_custom_post_pass": RecomputeWeightFakeQuant()}
