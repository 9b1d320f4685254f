"""LoRA passes: add low-rank adapters to quantized linear sites, and fold them back.

Matches:     linear sites (N, K weight, `aten.linear`) annotated with a LinearAnnotation
             whose layer name matches `LoRA.targets`.
Rewrites to: (s = alpha / rank; A is (r, K), B is (N, r), B starts at zero)
    merge_consistent (deploys exactly what trains):
        fq_w = qatfx.fake_quantize(add(w, mul(mm(w_lora_b, w_lora_a), s)), ...)
    torchtune (QATLoRALinear: adapters read the un-fake-quantized input):
        linear = aten.linear(fq_x, w_fq_frozen, b)       # fq(W) computed once, a buffer
        out = add(linear, mul(linear(linear(dropout(x), w_lora_a), w_lora_b), s))
Requires:    insert_fake_quant ran.
Ensures:     only the adapters require grad; every node made carries
             node.meta["qatfx_lora"] = layer, so `merge_lora` finds and removes them;
             merge_lora folds W <- add(W, mul(mm(B, A), s)) with the graph's own ops, so
             for merge_consistent convert(merge_lora(p)) == p bit for bit.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.fx

from qatfx.graph.linear_sites import SITE_OPERANDS, LinearSite, find_linear_sites, get_attr_value
from qatfx.graph.meta import (
    ANNOTATION_KEY,
    LEARNED_SCALE_SUFFIX,
    LEARNED_ZERO_SUFFIX,
    ROLE_META_KEY,
    SPEC_META_KEY,
    WEIGHT,
)
from qatfx.ops import fake_quantize
from qatfx.passes.infra import PassResult, requires
from qatfx.quantizer import LinearAnnotation, SkipAnnotation

log = logging.getLogger("qatfx.passes")
aten = torch.ops.aten

MODES = ("merge_consistent", "torchtune")
LORA_NODE_KEY = "qatfx_lora"  # node.meta: the layer a LoRA node belongs to
LORA_META_KEY = "qatfx_lora"  # GraphModule.meta: {"config": LoRA, "layers": {layer: weight target}}
FROZEN_ROLE = "lora_frozen_weight"  # ROLE_META_KEY of the get_attr reading fq(W) (torchtune mode)
# node.meta of that get_attr: whether its buffer holds fq(W) or W. Kept on the node because
# the graph may have no fake-quant left to read it from (a weight-only quantizer with every
# quantized layer adapted: the weight fake-quants are gone and there are no activation ones)
FROZEN_ENABLED_KEY = "qatfx_lora_fq_enabled"


@dataclass(frozen=True)
class LoRA:
    """Low-rank adapters for `prepare_pt2e(..., lora=LoRA(...))`.

    targets: fnmatch patterns over layer names (the names the quantizer's skip= uses),
        e.g. ("*.q_proj", "*.v_proj"). Every matched layer must be quantized.
    mode: "merge_consistent" trains fq(W + sBA), which is exactly what convert deploys;
        "torchtune" trains linear(fq(x), fq(W)) + s*B(A(x)) like torchtune's QATLoRALinear
        (merge_lora reports the gap to the deployed fq(W + sBA)).
    """

    rank: int
    alpha: float
    targets: Sequence[str] = ()
    dropout: float = 0.0
    mode: str = "merge_consistent"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # one pattern, not its characters
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.mode not in MODES:
            raise ValueError(f"LoRA mode must be one of {MODES}, got {self.mode!r}")
        if self.dropout and self.mode == "merge_consistent":
            # the adapter lives in weight space there: it has no input to drop
            raise ValueError('LoRA dropout needs mode="torchtune" (adapters on the input); use dropout=0.0 with merge_consistent')
        if not self.targets:
            raise ValueError('LoRA targets is empty; name the layers to adapt, e.g. targets=("*.q_proj", "*.v_proj")')

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_state(gm: torch.fx.GraphModule) -> Optional[dict]:
    return gm.meta.get(LORA_META_KEY)


# ---- add_lora ----------------------------------------------------------------------------


def _selected_sites(gm: torch.fx.GraphModule, config: LoRA) -> list[tuple[str, torch.fx.Node]]:
    """(layer, site node) for every annotated linear site the targets match; raises on
    skipped layers or when nothing matches. Reads annotations, not operands: after
    insert_fake_quant a matmul site's weight is no longer a bare parameter."""
    chosen, names = [], []
    for node in gm.graph.nodes:
        annotation = node.meta.get(ANNOTATION_KEY)
        if node.target not in SITE_OPERANDS or not isinstance(annotation, (LinearAnnotation, SkipAnnotation)):
            continue
        names.append(annotation.layer)
        if not any(fnmatch.fnmatchcase(annotation.layer, p) for p in config.targets):
            continue
        if isinstance(annotation, SkipAnnotation):
            raise ValueError(
                f"LoRA target {annotation.layer!r} is not quantized ({annotation.reason}); drop it from LoRA targets "
                "or stop the quantizer skipping it"
            )
        chosen.append((annotation.layer, node))
    if not chosen:
        raise ValueError(f"LoRA targets {list(config.targets)} match no linear layer; the layers are: {names}")
    return chosen


@dataclass
class _Target:
    """A matched site after insert_fake_quant: its weight fake-quant and the parameter it reads."""

    layer: str
    site: LinearSite
    fq: torch.fx.Node
    param: torch.fx.Node  # get_attr of W

    @property
    def weight_name(self) -> str:
        return self.param.target


def _target(site: Optional[LinearSite], layer: str) -> _Target:
    """The site's weight fake-quant over an (N, K) parameter, refusing layouts not supported yet."""
    fq = site.weight_operand if site is not None else None
    param = fq.args[0] if fq is not None and fq.op == "call_function" and fq.target is fake_quantize else None
    if site is None or site.node.target is not aten.linear.default or param is None or param.op != "get_attr":
        raise NotImplementedError(
            f"LoRA on {layer!r}: only aten.linear with an (N, K) weight is supported (not a (K, N) Conv1D "
            "weight or a matmul); drop it from LoRA targets"
        )
    if len(fq.users) > 1 or len(param.users) > 1:
        raise NotImplementedError(f"LoRA on {layer!r}: its weight is shared (tied); drop it from LoRA targets")
    return _Target(layer, site, fq, param)


def _owner(gm: torch.fx.GraphModule, target: str) -> tuple[torch.nn.Module, str]:
    path, _, name = target.rpartition(".")
    return (gm.get_submodule(path) if path else gm), name


def _new_adapters(weight: torch.Tensor, rank: int) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """A kaiming-uniform (a=sqrt(5), as peft / torchtune), B zeros: the adapted model starts
    equal to the base model."""
    n, k = weight.shape
    a = torch.empty(rank, k, dtype=weight.dtype, device=weight.device)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros(n, rank, dtype=weight.dtype, device=weight.device)
    return torch.nn.Parameter(a), torch.nn.Parameter(b)


def _call(graph: torch.fx.Graph, target, args: tuple, layer: str, val=None) -> torch.fx.Node:
    node = graph.call_function(target, args)
    node.meta[LORA_NODE_KEY] = layer
    if val is not None:
        node.meta["val"] = val
    return node


def _get_attr(graph: torch.fx.Graph, target: str, layer: str, val) -> torch.fx.Node:
    node = graph.get_attr(target)
    node.meta[LORA_NODE_KEY] = layer
    node.meta["val"] = val
    return node


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + s * (B @ A) with the exact aten ops the merge_consistent graph runs."""
    return aten.add.Tensor(weight, aten.mul.Tensor(aten.mm.default(b, a), scale))


def _rewrite_merge_consistent(gm, t: _Target, a_target: str, b_target: str, config: LoRA) -> None:
    graph, w, fq, layer = gm.graph, t.param, t.fq, t.layer
    val = w.meta.get("val")
    with graph.inserting_before(fq):
        a = _get_attr(graph, a_target, layer, None)
        b = _get_attr(graph, b_target, layer, None)
        ba = _call(graph, aten.mm.default, (b, a), layer, val)
        sba = _call(graph, aten.mul.Tensor, (ba, config.scale), layer, val)
        merged = _call(graph, aten.add.Tensor, (w, sba), layer, val)
    fq.replace_input_with(w, merged)


def frozen_fake_quant(weight: torch.Tensor, spec, enabled: bool) -> torch.Tensor:
    """fq(W) for the torchtune mode's buffer (W itself while fake-quant is disabled)."""
    with torch.no_grad():
        return (fake_quantize(weight, **spec.op_kwargs()) if enabled else weight).detach().clone()


def _rewrite_torchtune(gm, t: _Target, a_target: str, b_target: str, config: LoRA) -> None:
    graph, node, fq, layer = gm.graph, t.site.node, t.fq, t.layer
    spec = fq.meta[SPEC_META_KEY]
    weight = get_attr_value(gm, t.weight_name)
    owner, name = _owner(gm, t.weight_name)
    enabled = fq.kwargs.get("enabled", True)
    # non-persistent: state_dict is unchanged; refresh_frozen_weights recomputes it on load
    owner.register_buffer(f"{name}_fq", frozen_fake_quant(weight, spec, enabled), persistent=False)
    x = t.site.input_node
    raw_x = x.args[0] if x.op == "call_function" and x.target is fake_quantize else x
    with graph.inserting_before(node):
        frozen = _get_attr(graph, f"{t.weight_name}_fq", layer, fq.meta.get("val"))
    frozen.meta.update({ROLE_META_KEY: FROZEN_ROLE, SPEC_META_KEY: spec, "qatfx_lora_weight": t.weight_name, FROZEN_ENABLED_KEY: enabled})
    node.replace_input_with(fq, frozen)
    graph.erase_node(fq)
    out_val = node.meta.get("val")
    with graph.inserting_before(node.next):  # keeps the nodes below in order, after the site
        a = _get_attr(graph, a_target, layer, None)
        b = _get_attr(graph, b_target, layer, None)
        h = raw_x
        if config.dropout > 0:  # train_eval flips its flag with .train() / .eval()
            h = _call(graph, aten.dropout.default, (raw_x, config.dropout, gm.training), layer, raw_x.meta.get("val"))
        xa = _call(graph, aten.linear.default, (h, a), layer, None)
        xab = _call(graph, aten.linear.default, (xa, b), layer, out_val)
        scaled = _call(graph, aten.mul.Tensor, (xab, config.scale), layer, out_val)
        out = _call(graph, aten.add.Tensor, (node, scaled), layer, out_val)
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)


def _check_rank(weight: torch.Tensor, layer: str, rank: int) -> None:
    n, k = weight.shape
    if rank > min(n, k):
        raise ValueError(f"LoRA rank {rank} > min(N, K) = {min(n, k)} for layer {layer!r} ({n}x{k}); lower the rank")


def _freeze_own_copies(gm: torch.fx.GraphModule) -> None:
    """Frozen base: only the adapters train. Each parameter is re-registered as a new frozen
    Parameter on the same storage (no copy), so the user's model, which shares the tensors,
    keeps its own requires_grad; a parameter registered under two names stays one. Learned
    scales (a learnable spec's) are quantization parameters, not the base: they keep training."""
    frozen: dict = {}
    for module in gm.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and not name.endswith((LEARNED_SCALE_SUFFIX, LEARNED_ZERO_SUFFIX)):
                if id(param) not in frozen:
                    frozen[id(param)] = torch.nn.Parameter(param.detach(), requires_grad=False)
                module._parameters[name] = frozen[id(param)]


def add_lora(config: LoRA):
    @requires("insert_fake_quant")
    def add(gm: torch.fx.GraphModule) -> PassResult:
        layers = {}
        # check every target before touching any: W is shared with the user's model
        sites = {site.node: site for site in find_linear_sites(gm)}
        targets = [_target(sites.get(node), layer) for layer, node in _selected_sites(gm, config)]
        for t in targets:
            _check_rank(get_attr_value(gm, t.weight_name), t.layer, config.rank)
            if config.mode == "torchtune" and len(t.fq.args) > 1:
                raise ValueError(
                    f"LoRA on {t.layer!r}: torchtune mode caches fq(W) as a buffer, so learned scales would never "
                    "train; use mode='merge_consistent' (which trains fq(W + sBA) with them) or learnable_scales=False"
                )
        _freeze_own_copies(gm)
        for t in targets:
            weight = get_attr_value(gm, t.weight_name)
            owner, name = _owner(gm, t.weight_name)
            a, b = _new_adapters(weight, config.rank)
            owner.register_parameter(f"{name}_lora_a", a)
            owner.register_parameter(f"{name}_lora_b", b)
            rewrite = _rewrite_merge_consistent if config.mode == "merge_consistent" else _rewrite_torchtune
            rewrite(gm, t, f"{t.weight_name}_lora_a", f"{t.weight_name}_lora_b", config)
            layers[t.layer] = t.weight_name
        gm.meta[LORA_META_KEY] = {"config": config, "layers": layers}
        log.info("qatfx: LoRA (%s, rank %d) on %d layers", config.mode, config.rank, len(layers))
        return PassResult(gm, True)

    return add


def _frozen_reads(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "get_attr" and n.meta.get(ROLE_META_KEY) == FROZEN_ROLE]


def frozen_fake_quant_flags(gm: torch.fx.GraphModule) -> list[bool]:
    """The enabled flag of each torchtune-mode fq(W) buffer (the fake-quants the graph no
    longer runs as nodes)."""
    return [n.meta[FROZEN_ENABLED_KEY] for n in _frozen_reads(gm)]


def refresh_frozen_weights(gm: torch.fx.GraphModule, enabled: Optional[bool] = None) -> None:
    """Recompute the torchtune mode's fq(W) buffers from the current W (after a load or a
    fake-quant toggle). `enabled` records a toggle (fq(W) if True, W if False); None keeps
    each buffer's recorded flag (a load)."""
    for node in _frozen_reads(gm):
        if enabled is not None:
            node.meta[FROZEN_ENABLED_KEY] = enabled
        weight = get_attr_value(gm, node.meta["qatfx_lora_weight"])
        fresh = frozen_fake_quant(weight, node.meta[SPEC_META_KEY], node.meta[FROZEN_ENABLED_KEY])
        get_attr_value(gm, node.target).copy_(fresh)


# ---- merge_lora --------------------------------------------------------------------------


def _sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    ref, err = reference.double(), (reference.double() - other.double())
    noise = err.pow(2).sum()
    return math.inf if noise == 0 else float(10 * torch.log10(ref.pow(2).sum() / noise))


def merge_gap(weight, a, b, spec, scale) -> float:
    """Weight-space SQNR (dB) of the deployed fq(W + sBA) against the trained effective
    weight fq(W) + s*B@A (torchtune mode; its adapters also see the un-fake-quantized input,
    which a weight-space number leaves out)."""
    with torch.no_grad():
        trained = fake_quantize(weight, **spec.op_kwargs()) + scale * (b @ a)
        deployed = fake_quantize(merged_weight(weight, a, b, scale), **spec.op_kwargs())
    return _sqnr_db(trained, deployed)


def _erase_lora_nodes(graph: torch.fx.Graph) -> None:
    for fq in [n for n in graph.nodes if n.target is fake_quantize and LORA_NODE_KEY in n.args[0].meta]:
        fq.replace_input_with(fq.args[0], fq.args[0].args[0])  # merge_consistent: fq(W + sBA) -> fq(W)
    for node in reversed(list(graph.nodes)):
        if LORA_NODE_KEY in node.meta:
            graph.erase_node(node)


def _restore_site(gm: torch.fx.GraphModule, frozen: torch.fx.Node) -> None:
    """torchtune mode: the site reads fq(W) again, and its output no longer gets the adapter."""
    graph = gm.graph
    target = frozen.meta["qatfx_lora_weight"]
    # the W read add_lora left in place (unused), else a new one
    w = next((n for n in graph.nodes if n.op == "get_attr" and n.target == target and LORA_NODE_KEY not in n.meta), None)
    if w is None:
        with graph.inserting_before(frozen):
            w = graph.get_attr(target)
            w.meta["val"] = frozen.meta.get("val")
    spec = frozen.meta[SPEC_META_KEY]
    kwargs = spec.op_kwargs()
    if not frozen.meta[FROZEN_ENABLED_KEY]:  # merged while fake-quant was off: stays off, like the other sites
        kwargs["enabled"] = False
    with graph.inserting_after(w):
        fq = graph.create_node("call_function", fake_quantize, (w,), kwargs, name=f"fq_{w.name}")
    fq.meta.update(val=frozen.meta.get("val"), **{SPEC_META_KEY: spec, ROLE_META_KEY: WEIGHT})
    for site in list(frozen.users):
        site.replace_input_with(frozen, fq)
        add = next(u for u in site.users if LORA_NODE_KEY in u.meta and u.target is aten.add.Tensor)
        add.replace_all_uses_with(site)
    delattr(*_owner(gm, frozen.target))


def _unused_weight_reads(graph: torch.fx.Graph, targets: set) -> None:
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target in targets and not node.users:
            graph.erase_node(node)


def _frozen_specs(gm: torch.fx.GraphModule) -> dict:
    """{weight target: QuantSpec} of the torchtune mode's fq(W) reads."""
    return {
        n.meta["qatfx_lora_weight"]: n.meta[SPEC_META_KEY]
        for n in gm.graph.nodes if n.meta.get(ROLE_META_KEY) == FROZEN_ROLE
    }


def merge_adapters(gaps: dict):
    """The merge_lora pass: fold every adapter into its weight, W <- add(W, mul(mm(B, A), s)),
    on `gm` in place (the driver runs it on a copy) and restore plain fake-quant sites.
    Fills `gaps` with {layer: merge-gap SQNR dB} in torchtune mode."""

    @requires("add_lora")
    def merge(gm: torch.fx.GraphModule) -> PassResult:
        state = gm.meta.pop(LORA_META_KEY)
        config: LoRA = state["config"]
        spec_of = _frozen_specs(gm)
        for layer, target in state["layers"].items():
            owner, name = _owner(gm, target)
            weight, a, b = (getattr(owner, f"{name}{suffix}") for suffix in ("", "_lora_a", "_lora_b"))
            with torch.no_grad():
                merged = merged_weight(weight, a, b, config.scale)
            if target in spec_of:
                gaps[layer] = merge_gap(weight, a, b, spec_of[target], config.scale)
            # a new tensor: the unmerged model (sharing W) stays as it was; frozen like the rest
            owner.register_parameter(name, torch.nn.Parameter(merged, requires_grad=False))
            delattr(owner, f"{name}_lora_a")
            delattr(owner, f"{name}_lora_b")
        for frozen in [n for n in gm.graph.nodes if n.meta.get(ROLE_META_KEY) == FROZEN_ROLE]:
            _restore_site(gm, frozen)
        _erase_lora_nodes(gm.graph)
        _unused_weight_reads(gm.graph, set(state["layers"].values()))
        return PassResult(gm, True)

    return merge
