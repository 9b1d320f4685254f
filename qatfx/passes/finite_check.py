"""Non-finite (NaN / inf) values: qatfx never fails on them, it lets them propagate and says
where they are (docs/bad_input.md).

What the numerics do (qatfx/reference.py): a NaN or inf anywhere in a quantization group
makes that group's scale (and zero point) NaN or inf, and every value of the group
dequantizes to NaN. So a non-finite activation value turns its whole token row NaN (one
group per token), hence that token's output row; a non-finite weight value turns its group
NaN, hence that output channel, for every token.

Weights are checked when it is free: `warn_non_finite_weights` at prepare_pt2e and
`warn_non_finite_weight` at convert_pt2e, one NonFiniteWarning per layer.

Activations are checked only on request (QATFX_CHECK_FINITE=1 or
prepare_pt2e(check_finite=True)), because the check costs a pass over each linear input
per step. The check_finite pass:

Matches:     every activation fake-quant (qatfx.fake_quantize with role "input").
Rewrites to:
    before: fq_x = qatfx.fake_quantize(x, ...)
    after:  x_checked = qatfx.check_finite(x, "layers.0.q_proj, layers.0.k_proj, ...")
            fq_x = qatfx.fake_quantize(x_checked, ...)
    `qatfx::check_finite` returns a copy of x (an opaque op, so torch.compile keeps it and
    Inductor cannot fuse across it) and warns, naming the layers x feeds, when x holds a
    NaN or inf. Its gradient is the identity. convert_pt2e keeps the checks.
Requires:    insert_fake_quant ran.
Ensures:     values are unchanged bit for bit; other users of x still read x.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import torch.fx

from qatfx.passes.infra import PassResult, requires
from qatfx.passes.insert_fake_quant import fake_quant_nodes
from qatfx.graph.linear_sites import find_linear_sites, get_attr_value
from qatfx.graph.meta import ANNOTATION_KEY, INPUT, ROLE_META_KEY
from qatfx.quantizer import LinearAnnotation

CHECK_FINITE_ENV = "QATFX_CHECK_FINITE"


class NonFiniteWarning(RuntimeWarning):
    """A weight or (with the opt-in check) an activation holds NaN or inf."""


def check_finite_requested(check_finite: Optional[bool]) -> bool:
    """The explicit argument, else QATFX_CHECK_FINITE (1 / true / yes)."""
    if check_finite is not None:
        return check_finite
    return os.environ.get(CHECK_FINITE_ENV, "").strip().lower() in ("1", "true", "yes")


# ---- weights --------------------------------------------------------------------------------


def warn_non_finite_weight(layer: str, weight_n_by_k: torch.Tensor, stage: str) -> int:
    """Warn if the (N, K) weight of `layer` holds NaN/inf; return how many values do."""
    if weight_n_by_k.is_meta:  # no values yet (a model built on the meta device); convert checks again
        return 0
    bad = ~torch.isfinite(weight_n_by_k.detach())
    count = int(bad.sum())
    if count:
        channels = bad.any(-1).nonzero().flatten().tolist()
        shown = ", ".join(map(str, channels[:8])) + (", ..." if len(channels) > 8 else "")
        warnings.warn(
            f"qatfx {stage}: the weight of layer {layer} holds {count} non-finite value(s) (NaN/inf) "
            f"in output channel(s) [{shown}]; each weight group holding one quantizes to NaN, so "
            "those output channels are NaN for every token",
            NonFiniteWarning,
            stacklevel=3,
        )
    return count


def warn_non_finite_weights(gm: torch.fx.GraphModule, stage: str) -> None:
    """One warning per layer annotated for quantization whose weight holds NaN/inf (run
    after annotate, before insert_fake_quant, while sites still read their parameter)."""
    for site in find_linear_sites(gm):
        annotation = site.node.meta.get(ANNOTATION_KEY)
        if isinstance(annotation, LinearAnnotation) and site.param_node is not None:
            weight = get_attr_value(gm, site.param_name)
            warn_non_finite_weight(annotation.layer, weight.t() if site.param_is_k_by_n else weight, stage)


def zero_codes_of_non_finite_groups(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Integer codes with every group whose scale is NaN/inf set to 0. Such a group
    dequantizes to NaN whatever its codes (0 * inf and q * NaN are NaN), as in fake-quant;
    but its codes came from casting NaN to int8, whose value the platform decides (and may
    fall outside int4), so store a defined value instead."""
    bad = ~torch.isfinite(scale)
    if not bool(bad.any()):
        return q
    if scale.dim() != q.dim():  # one scale for the whole tensor
        return torch.zeros_like(q)
    return q.masked_fill(bad.repeat_interleave(q.shape[-1] // scale.shape[-1], dim=-1), 0)


# ---- activations (opt-in) -------------------------------------------------------------------


@torch.library.custom_op("qatfx::check_finite", mutates_args=())
def check_finite(x: torch.Tensor, layers: str) -> torch.Tensor:
    """A copy of `x`; warns (NonFiniteWarning) naming `layers` if x holds NaN or inf."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = bad.reshape(-1, x.shape[-1]).any(-1) if x.dim() else bad.reshape(1)
        warnings.warn(
            f"qatfx: the input of {layers} holds NaN/inf in {int(rows.sum())} of {rows.numel()} "
            "token(s); their output rows are NaN",
            NonFiniteWarning,
            stacklevel=2,
        )
    return x.clone()


@check_finite.register_fake
def _(x, layers):
    return torch.empty_like(x)


def _identity_backward(ctx, grad):
    return grad, None


check_finite.register_autograd(_identity_backward)

check_finite_op = torch.ops.qatfx.check_finite.default


def _layers_fed_by(fq: torch.fx.Node) -> str:
    names = [
        u.meta[ANNOTATION_KEY].layer
        for u in fq.users
        if isinstance(u.meta.get(ANNOTATION_KEY), LinearAnnotation)
    ]
    return ", ".join(names) or fq.name


@requires("insert_fake_quant")
def insert_finite_checks(gm: torch.fx.GraphModule) -> PassResult:
    graph = gm.graph
    modified = False
    for fq in fake_quant_nodes(gm):
        if fq.meta.get(ROLE_META_KEY) != INPUT:
            continue
        x = fq.args[0]
        with graph.inserting_before(fq):
            check = graph.create_node("call_function", check_finite_op, (x, _layers_fed_by(fq)), name=f"check_{x.name}")
        check.meta["val"] = x.meta.get("val")
        fq.replace_input_with(x, check)
        modified = True
    return PassResult(gm, modified)
