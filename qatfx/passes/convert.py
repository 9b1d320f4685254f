"""Convert pass: fake-quant -> real quantize / dequantize with quantized weights.

Matches:     every qatfx.fake_quantize node (enabled or not).
Rewrites to:
    weight (input is a parameter, or the transpose of one), stored in the weight format
    the spec maps to (qatfx/formats/: format_for(spec)):
        before: fq_w = qatfx.fake_quantize(w, qmin=-8, qmax=7, group_size=32, ...)
        after:  fq_w = <format's dequantize op>(w_<part>, ..., 32, torch.float32)
                e.g. symmetric int4 (int4_packed, what the int8 x int4 kernel reads):
                fq_w = qatfx.dequantize_int4(w_packed, w_scales, w_group_sums, 32, torch.float32)
        with one buffer `<layer>.weight_<part>` per part the format stores, computed from
        the parameter's current value; node.meta["qatfx_format"] names the format.
        A learnable spec's weight is quantized with its trained qparams (the fake-quant's
        scale / zero inputs, as the fake-quant cast and rounded them), which are deleted.
        An embedding table is a weight like any other: aten.embedding then reads the
        format's dequantize of the packed table; a table tied to a linear has one
        fake-quant, so it is packed once and both read the one dequantize node.
    activation:
        before: fq_x = qatfx.fake_quantize(x, qmin=-128, qmax=127, group_size=-1, ...)
        after:  q = qatfx.quantize_dynamic(x, -128, 127, -1, False, eps, torch.float32)
                fq_x = qatfx.dequantize(q[0], q[1], q[2], -1, x.dtype)
        (a spec whose scale_rule is not "torchao" adds scale_rule=... as a keyword; weights
        are quantized with the spec's rule too)
Requires:    insert_fake_quant ran.
Ensures:     converted output == prepared output bit for bit (both use qatfx.reference;
             a weight group holding NaN/inf stores codes 0 and dequantizes to NaN, as its
             fake-quant does, with a NonFiniteWarning naming the layer);
             a float parameter no other node reads is deleted, with its unread aliases
             (a tied one still read elsewhere stays).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx

from qatfx import reference
from qatfx.formats import format_for
from qatfx.graph.linear_sites import get_attr_value
from qatfx.graph.meta import FORMAT_META_KEY, INPUT, ROLE_META_KEY, SPEC_META_KEY, WEIGHT
from qatfx.ops import dequantize, quantize_dynamic
from qatfx.passes.finite_check import warn_non_finite_weight, zero_codes_of_non_finite_groups
from qatfx.passes.infra import PassResult, requires
from qatfx.passes.insert_fake_quant import fake_quant_nodes
from qatfx.spec import QuantSpec

aten = torch.ops.aten


def _weight_param(node: torch.fx.Node) -> tuple[torch.fx.Node, bool]:
    """The get_attr feeding a weight fake-quant, and whether a transpose sits between
    (insert_fake_quant writes t(w) then a contiguous clone)."""
    source = node.args[0]
    if source.op == "call_function" and source.target is aten.clone.default:
        source = source.args[0]
    if source.op == "call_function" and source.target is aten.t.default:
        return source.args[0], True
    return source, False


def _register_buffer(gm: torch.fx.GraphModule, qualified_name: str, value: torch.Tensor) -> None:
    owner_path, _, name = qualified_name.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    owner.register_buffer(name, value)


def _call(graph: torch.fx.Graph, target, args: tuple, name: str, kwargs: Optional[dict] = None) -> torch.fx.Node:
    return graph.create_node("call_function", target, args, kwargs, name=name)


def _rule_kwargs(spec: QuantSpec) -> dict:
    """quantize_dynamic's keyword-only `scale_rule`, only when not the default: a
    torchao-rule node is the one the lowering patterns were written for."""
    return {key: value for key, value in spec.op_kwargs().items() if key == "scale_rule"}


def _convert_weight(gm: torch.fx.GraphModule, fq: torch.fx.Node, spec: QuantSpec) -> None:
    graph = gm.graph
    param_node, transposed = _weight_param(fq)
    weight = get_attr_value(gm, param_node.target).detach()
    if transposed:
        weight = weight.t()
    learned = [n for n in fq.args[1:] if n is not None]
    if learned:
        q, scale, zero = _quantize_learned(gm, weight, learned, spec)
    else:
        q, scale, zero = reference.quantize_dynamic(
            weight, spec.qmin, spec.qmax, spec.group_size, spec.symmetric, spec.eps, spec.scale_dtype, spec.scale_rule
        )
    base = param_node.target
    if warn_non_finite_weight(base.removesuffix(".weight"), weight, "convert_pt2e"):
        q = zero_codes_of_non_finite_groups(q, scale)
    fmt = format_for(spec)
    buffers = {part: value for part, value in fmt.pack(q, scale, zero, spec).items() if value is not None}
    for part, value in buffers.items():
        _register_buffer(gm, f"{base}_{part}", value.contiguous())

    with graph.inserting_before(fq):
        inputs = {part: graph.get_attr(f"{base}_{part}") for part in buffers}
        dq = _call(graph, fmt.dequantize_op, fmt.op_args(inputs, spec.group_size, weight.dtype), f"dq_{param_node.name}")
    dq.meta.update(val=fq.meta.get("val"), **{ROLE_META_KEY: WEIGHT, SPEC_META_KEY: spec, FORMAT_META_KEY: fmt.name})
    source = fq.args[0]
    fq.replace_all_uses_with(dq)
    graph.erase_node(fq)
    _drop_unused(gm, source)
    for read in learned:
        _drop_unused(gm, read)


@torch.no_grad()
def _quantize_learned(gm: torch.fx.GraphModule, weight: torch.Tensor, reads: list, spec: QuantSpec):
    """Codes and qparams of a learnable spec: its trained values, cast and rounded exactly as
    its fake-quant uses them (reference.learned_qparams), so prepared == converted."""
    values = [get_attr_value(gm, n.target).detach() for n in reads]
    scale, zero = values[0], (values[1] if len(values) > 1 else None)
    scale, zero = reference.learned_qparams(scale, zero, spec.qmin, spec.qmax, spec.eps, spec.scale_dtype, weight.dtype)
    return reference.quantize(weight, scale, zero, spec.qmin, spec.qmax, spec.group_size), scale, zero


def _drop_unused(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Erase now-dead transpose/get_attr chains; delete a parameter no node reads."""
    graph = gm.graph
    while node is not None and not node.users:
        source = node.args[0] if node.op == "call_function" else None
        if node.op == "get_attr":
            target = node.target
            value = get_attr_value(gm, target)
            graph.erase_node(node)
            if not any(n.op == "get_attr" and n.target == target for n in graph.nodes):
                _delete_attr(gm, target)
                _drop_unread_aliases(gm, value)
            return
        graph.erase_node(node)
        node = source


def _delete_attr(gm: torch.fx.GraphModule, target: str) -> None:
    owner_path, _, name = target.rpartition(".")
    delattr(gm.get_submodule(owner_path) if owner_path else gm, name)


def _drop_unread_aliases(gm: torch.fx.GraphModule, value: torch.Tensor) -> None:
    """Other names of a deleted parameter (a tied embedding's `embed.weight`, which
    torch.export leaves as an unused get_attr) that no node reads: deleted too, so the
    float table is not kept beside its packed form."""
    aliases = [name for name, p in gm.named_parameters(remove_duplicate=False) if p is value]
    for target in aliases:
        readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]
        if any(n.users for n in readers):
            continue
        for n in readers:
            gm.graph.erase_node(n)
        _delete_attr(gm, target)


def _convert_activation(gm: torch.fx.GraphModule, fq: torch.fx.Node, spec: QuantSpec) -> None:
    graph = gm.graph
    x = fq.args[0]
    val = fq.meta.get("val")
    if val is None:
        raise RuntimeError(f"qatfx convert: fake-quant node {fq.name} has no meta['val'] (dtype unknown)")
    with graph.inserting_before(fq):
        qparams = _call(
            graph,
            quantize_dynamic,
            (x, spec.qmin, spec.qmax, spec.group_size, spec.symmetric, spec.eps, spec.scale_dtype),
            f"quant_{x.name}",
            _rule_kwargs(spec),
        )
        q, scale, zero = (
            _call(graph, operator.getitem, (qparams, i), f"{part}_{x.name}")
            for i, part in enumerate(("q", "scale", "zero"))
        )
        dq = _call(graph, dequantize, (q, scale, zero, spec.group_size, val.dtype), f"dq_{x.name}")
    dq.meta.update(val=val, **{ROLE_META_KEY: INPUT, SPEC_META_KEY: spec})
    fq.replace_all_uses_with(dq)
    graph.erase_node(fq)


@requires("insert_fake_quant")
def convert(gm: torch.fx.GraphModule) -> PassResult:
    nodes = fake_quant_nodes(gm)
    for fq in nodes:
        spec = fq.meta[SPEC_META_KEY]
        if fq.meta[ROLE_META_KEY] == WEIGHT:
            _convert_weight(gm, fq, spec)
        else:
            _convert_activation(gm, fq, spec)
    return PassResult(gm, modified=bool(nodes))
