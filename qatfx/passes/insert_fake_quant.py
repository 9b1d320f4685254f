"""Insert fake-quant pass.

Matches:     linear sites annotated with a LinearAnnotation, embedding sites annotated
             with an EmbeddingAnnotation.
Rewrites to: qatfx.fake_quantize on the activation input and on the weight parameter:

    before:  linear = aten.linear(x, w, b)
    after:   fq_x = qatfx.fake_quantize(x, qmin=-128, qmax=127, group_size=-1, ...)
             fq_w = qatfx.fake_quantize(w, qmin=-8, qmax=7, group_size=32, ...)
             linear = aten.linear(fq_x, fq_w, b)

             A (K, N) weight used directly by matmul/addmm is fake-quantized as its
             transpose (groups run along K), copied row-major first:
             t(fake_quantize(clone(t(w), contiguous_format))). The copy gives the
             fake-quantized weight the layout convert's dequantize produces; addmm's
             result depends on its operands' layout (BLAS picks another kernel), so
             without it prepared and converted GPT-2 differ in the last bits.
             An embedding table (V, D) is fake-quantized like an (N, K) weight (groups
             along D): embedding = aten.embedding(fake_quantize(table), indices).
Requires:    annotate ran.
Ensures:     one fake_quantize per (operand, spec): q/k/v projections reading the same x
             share one activation fake-quant; a table tied to a quantized linear has
             one fake-quant feeding both (annotate checked their specs agree); other
             users of a weight (a tied embedding without embedding_spec) still read the
             float parameter; node.meta["val"] set on new nodes.
             A learnable weight spec also gets its trained qparams: parameters
             `<weight>_learned_scale` (and `_learned_zero` when asymmetric), in the
             weight's dtype, initialised by the spec's rule from the current weight, read
             by the fake-quant:  fq_w = qatfx.fake_quantize(w, w_learned_scale, None, ...)
"""

from __future__ import annotations

import torch
import torch.fx

from qatfx import reference
from qatfx.ops import fake_quantize
from qatfx.passes.infra import PassResult, requires
from qatfx.graph.embedding_sites import find_embedding_sites
from qatfx.graph.linear_sites import find_linear_sites, get_attr_value
from qatfx.graph.meta import (
    ANNOTATION_KEY,
    INPUT,
    LEARNED_SCALE_SUFFIX,
    LEARNED_ZERO_SUFFIX,
    ROLE_META_KEY,
    SPEC_META_KEY,
    WEIGHT,
)
from qatfx.quantizer import EmbeddingAnnotation, LinearAnnotation
from qatfx.spec import GGML, QuantSpec

aten = torch.ops.aten


def _insert_fake_quant(graph: torch.fx.Graph, source: torch.fx.Node, spec: QuantSpec, role: str) -> torch.fx.Node:
    with graph.inserting_after(source):
        fq = graph.create_node("call_function", fake_quantize, (source,), spec.op_kwargs(), name=f"fq_{source.name}")
    fq.meta["val"] = source.meta.get("val")
    fq.meta[SPEC_META_KEY] = spec
    fq.meta[ROLE_META_KEY] = role
    return fq


def _register_parameter(gm: torch.fx.GraphModule, qualified_name: str, value: torch.Tensor) -> None:
    owner_path, _, name = qualified_name.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    owner.register_parameter(name, torch.nn.Parameter(value))


def _learn_qparams(gm: torch.fx.GraphModule, fq: torch.fx.Node, weight_name: str, transposed: bool) -> None:
    """Give a learnable weight fake-quant its trained qparams, initialised as the spec's rule
    computes them from the weight now (so training starts from the dynamic rule's grid). They
    are kept in the weight's dtype: FSDP2 shards trainable parameters of one dtype only."""
    spec = fq.meta[SPEC_META_KEY]
    weight = get_attr_value(gm, weight_name).detach()
    weight = weight.t() if transposed else weight
    if spec.scale_rule == GGML:
        scale, zero = reference.ggml_qparams(weight, spec.qmin, spec.qmax, spec.group_size, spec.eps, spec.scale_dtype)[0], None
    else:
        scale, zero = reference.choose_qparams(weight, spec.qmin, spec.qmax, spec.group_size, spec.symmetric, spec.eps, spec.scale_dtype)
    qparams = [(LEARNED_SCALE_SUFFIX, scale)] + ([] if zero is None else [(LEARNED_ZERO_SUFFIX, zero)])
    reads = []
    with gm.graph.inserting_before(fq):
        for suffix, value in qparams:
            _register_parameter(gm, weight_name + suffix, value.to(weight.dtype).contiguous())
            reads.append(gm.graph.get_attr(weight_name + suffix))
    fq.args = (fq.args[0], *reads)


def _transpose(graph: torch.fx.Graph, source: torch.fx.Node) -> torch.fx.Node:
    with graph.inserting_after(source):
        node = graph.call_function(aten.t.default, (source,))
    val = source.meta.get("val")
    if val is not None:
        node.meta["val"] = val.t()
    return node


def _contiguous(graph: torch.fx.Graph, source: torch.fx.Node) -> torch.fx.Node:
    with graph.inserting_after(source):
        node = graph.call_function(aten.clone.default, (source,), {"memory_format": torch.contiguous_format})
    val = source.meta.get("val")
    if val is not None:
        node.meta["val"] = val.contiguous()
    return node


@requires("annotate")
def insert_fake_quant(gm: torch.fx.GraphModule) -> PassResult:
    graph = gm.graph
    made: dict[tuple, torch.fx.Node] = {}
    modified = False
    for site in find_linear_sites(gm):
        annotation = site.node.meta.get(ANNOTATION_KEY)
        if not isinstance(annotation, LinearAnnotation):
            continue
        modified = True
        if annotation.input_spec is not None:
            key = (site.input_node, annotation.input_spec)
            if key not in made:
                made[key] = _insert_fake_quant(graph, site.input_node, annotation.input_spec, INPUT)
            site.node.replace_input_with(site.input_node, made[key])

        key = (site.param_node, annotation.weight_spec, site.param_is_k_by_n)
        if key not in made:
            if site.param_is_k_by_n:
                n_by_k = _contiguous(graph, _transpose(graph, site.param_node))
                fq = _insert_fake_quant(graph, n_by_k, annotation.weight_spec, WEIGHT)
                made[key] = _transpose(graph, fq)
            else:
                fq = made[key] = _insert_fake_quant(graph, site.param_node, annotation.weight_spec, WEIGHT)
            if annotation.weight_spec.learnable:
                _learn_qparams(gm, fq, site.param_name, site.param_is_k_by_n)
        site.param_user.replace_input_with(site.param_node, made[key])

    for site in find_embedding_sites(gm):
        annotation = site.node.meta.get(ANNOTATION_KEY)
        if not isinstance(annotation, EmbeddingAnnotation):
            continue
        modified = True
        key = (site.param_node, annotation.weight_spec, False)  # a tied linear's key: one node
        if key not in made:
            made[key] = _insert_fake_quant(graph, site.param_node, annotation.weight_spec, WEIGHT)
            if annotation.weight_spec.learnable:
                _learn_qparams(gm, made[key], site.param_name, False)
        site.node.replace_input_with(site.param_node, made[key])
    return PassResult(gm, modified)


def fake_quant_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fake_quantize]
