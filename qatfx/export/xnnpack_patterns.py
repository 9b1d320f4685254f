"""Rewrite a converted graph's qatfx ops into the quantize/dequantize patterns ExecuTorch's
XNNPACK partitioner delegates (executorch 1.5, backends/xnnpack/partition/config/gemm_configs.py
and utils/quant_utils.py):

- an int4 weight (format `int4_packed`) -> `quantized_decomposed.dequantize_per_channel_group`
  of the int8 codes convert produced (unpacked, not recomputed: the trained grid), the
  format's scales (as float32, exact) and zero points of 0, codes in [-8, 7];
- an int8 symmetric per-channel weight (format `int_codes`: 8da8w's weights) whose linears
  all read a rewritten per-token activation ->
  `quantized_decomposed.dequantize_per_channel` on axis 0 of convert's codes as they are,
  one float32 scale per output channel (exact from float32 / bfloat16 / float16), zero
  points of 0, the spec's grid as qmin / qmax ([-128, 127]; [-127, 127] when narrow).
  XNNPACK runs it as a dynamically quantized linear with per-channel int8 weights (qc8w),
  whose scales it keeps in float32. Other int_codes weights (other widths, per group,
  asymmetric, or read by a float activation) are left, with the reason;
- an int8 per-token asymmetric dynamic activation (`qatfx::quantize_dynamic` ->
  `qatfx::dequantize`) -> `choose_qparams_per_token_asymmetric` -> `quantize_per_token` ->
  `dequantize_per_token`. That op divides by the scale in float64 where qatfx rounds in
  float32: a value at a rounding tie can get the neighbouring code (rare; the export report says so).

- a quantized embedding table (`aten.embedding` of a weight dequantize) -> ExecuTorch's
  quantized embedding op, which its quantized kernels run (not XNNPACK): int4 symmetric
  (`int4_packed`) -> `quantized_decomposed.embedding_4bit` (codes + 8, two per byte, the
  even element in the high nibble: executorch exir/passes/_quant_patterns_and_replacements.py),
  int8 symmetric codes (`int_codes`) -> `embedding_byte`; same codes, scales as float32
  (exact from bfloat16), no zero points. A table tied to a linear is stored twice in the
  program: for the embedding op (4-bit packed; embedding_byte's table is the int8 codes) and
  as the int8 codes in XNNPACK's delegate data for the linear.

Any other qatfx op is left as it is and listed with the reason (`RewriteReport.left`);
ExecuTorch has no kernel for a qatfx op, so `qatfx.export.executorch` refuses such a model
before lowering and names each.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx

from qatfx import reference
from qatfx.formats.int4_packed import tile
from qatfx.graph.linear_sites import get_attr_value
from qatfx.graph.meta import FORMAT_META_KEY, SPEC_META_KEY
from qatfx.ops import dequantize, quantize_dynamic
from qatfx.spec import PerChannel

CODES_SUFFIX = "_codes"  # the unpacked int8 codes: `<weight>_codes`, beside `<weight>_packed`
ZEROS_SUFFIX = "_zero_points"


def _quantized_decomposed():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

    return torch.ops.quantized_decomposed


@dataclass
class RewriteReport:
    weights: list = field(default_factory=list)  # `<weight>` attribute paths rewritten
    embeddings: list = field(default_factory=list)  # `<weight>` paths of tables rewritten
    activations: int = 0
    left: list = field(default_factory=list)  # (node name, reason) of qatfx ops kept


def _register(gm: torch.fx.GraphModule, target: str, value: torch.Tensor) -> str:
    owner_path, _, name = target.rpartition(".")
    (gm.get_submodule(owner_path) if owner_path else gm).register_buffer(name, value)
    return target


def _rewrite_weight(gm: torch.fx.GraphModule, node: torch.fx.Node, qd) -> str:
    packed_node, scales_node, _sums, group_size, out_dtype = node.args
    packed = get_attr_value(gm, packed_node.target)
    scales = get_attr_value(gm, scales_node.target)
    k = 2 * packed.shape[-1]
    codes = reference.unpack_int4(packed, tile(group_size, k))  # exactly convert's codes
    weight = packed_node.target.removesuffix("_packed")
    codes_target = _register(gm, weight + CODES_SUFFIX, codes)
    scales_target = _register(gm, weight + "_scales_fp32", scales.to(torch.float32))  # bf16 -> fp32 is exact
    zeros_target = _register(gm, weight + ZEROS_SUFFIX, torch.zeros(scales.shape, dtype=torch.int8))
    graph = gm.graph
    with graph.inserting_before(node):
        args = [graph.get_attr(t) for t in (codes_target, scales_target, zeros_target)]
        new = graph.call_function(
            qd.dequantize_per_channel_group.default,
            (*args, -8, 7, torch.int8, elements_per_scale(group_size, k), out_dtype),
        )
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return weight


def _executorch_embedding_ops():
    """Registers quantized_decomposed.embedding_* (their Python kernels and fake kernels)."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401

    return torch.ops.quantized_decomposed


def load_quantized_kernels() -> None:
    """Register ExecuTorch's quantized kernels (embedding_4bit / embedding_byte) with the
    Python runtime, which does not link them: `executorch.runtime` fails to load a program
    using them ("Missing operator: quantized_decomposed::embedding_4bit.dtype_out") until
    this shared library, shipped in the executorch wheel, is loaded. Idempotent."""
    import ctypes
    from pathlib import Path

    import executorch
    import executorch.runtime  # noqa: F401  (loads libexecutorch.so, whose registry the kernels join)

    library = Path(list(executorch.__path__)[0]) / "lib" / "libexecutorch_kernels_quantized.so"
    if not library.exists():
        raise FileNotFoundError(
            f"{library} is missing: this executorch build has no quantized kernels for the runtime; "
            "install the executorch wheel (1.5.1), which ships them"
        )
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)


def _embedding_table(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """(weight path, packed table, ExecuTorch op, qmin, qmax) for a weight dequantize
    whose users include aten.embedding, or None when ExecuTorch has no op for it."""
    packed_node, scales_node = node.args[0], node.args[1]
    if packed_node.op != "get_attr" or scales_node.op != "get_attr":
        return None
    codes_or_packed = get_attr_value(gm, packed_node.target)
    scales = get_attr_value(gm, scales_node.target)
    weight = packed_node.target.removesuffix("_packed")
    if node.target is torch.ops.qatfx.dequantize_int4.default:
        group_size = node.args[3]
        codes = reference.unpack_int4(codes_or_packed, tile(group_size, 2 * codes_or_packed.shape[-1]))
        unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)  # ExecuTorch stores code + 8
        table = (unsigned[:, 0::2] << 4) | unsigned[:, 1::2]
        return weight, table, "embedding_4bit", -8, 7, scales
    if node.target is dequantize and node.args[2] is None and codes_or_packed.dtype == torch.int8:
        return weight, codes_or_packed, "embedding_byte", -128, 127, scales
    return None


def _rewrite_embeddings(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Optional[str]:
    """Rewrite the aten.embedding users of a weight dequantize into ExecuTorch's quantized
    embedding op; returns the weight path, or None when there were none to rewrite."""
    users = [u for u in node.users if u.target is torch.ops.aten.embedding.default and u.args[0] is node]
    if not users:
        return None
    found = _embedding_table(gm, node)
    if found is None:
        return None
    weight, table, op_name, qmin, qmax, scales = found
    # the program now needs the quantized kernels: register them so that this process's
    # runtime (the export's own check, then the user's) can load it
    load_quantized_kernels()
    out_dtype = node.args[-1]
    op = getattr(_executorch_embedding_ops(), op_name).dtype
    table_target = _register(gm, weight + "_embedding_table", table.contiguous())
    scales_target = _register(gm, weight + "_embedding_scales", scales.to(torch.float32).contiguous())
    graph = gm.graph
    for user in users:
        with graph.inserting_before(user):
            args = (graph.get_attr(table_target), graph.get_attr(scales_target), None, qmin, qmax, user.args[1])
            new = graph.call_function(op, args, {"dtype": out_dtype})
        new.meta.update(user.meta)
        user.replace_all_uses_with(new)
        graph.erase_node(user)
    return weight


def elements_per_scale(group_size: int, k: int) -> int:
    return k if group_size in (-1, 0) else group_size


def _rewrite_activation(gm: torch.fx.GraphModule, node: torch.fx.Node, qd) -> bool:
    x, qmin, qmax, group_size, symmetric, _eps, _scale_dtype = node.args
    if (qmin, qmax, group_size, symmetric) != (-128, 127, -1, False):
        return False
    items = {user.args[1]: user for user in node.users if user.target is operator.getitem}
    dequants = [u for u in items.get(0, ()).users] if 0 in items else []
    if len(dequants) == 0 or any(d.target is not dequantize for d in dequants):
        return False
    graph = gm.graph
    with graph.inserting_before(node):
        qparams = graph.call_function(qd.choose_qparams_per_token_asymmetric.default, (x, torch.int8))
        scale = graph.call_function(operator.getitem, (qparams, 0))
        zero = graph.call_function(operator.getitem, (qparams, 1))
        q = graph.call_function(qd.quantize_per_token.default, (x, scale, zero, -128, 127, torch.int8))
    for deq in dequants:
        with graph.inserting_before(deq):
            new = graph.call_function(qd.dequantize_per_token.default, (q, scale, zero, -128, 127, torch.int8, deq.args[4]))
        deq.replace_all_uses_with(new)
        graph.erase_node(deq)
    for item in items.values():
        if not item.users:
            graph.erase_node(item)
    if not node.users:
        graph.erase_node(node)
    return True


def _per_channel_problem(gm: torch.fx.GraphModule, node: torch.fx.Node, qd) -> Optional[str]:
    """Why the int_codes weight dequantize `node` has no per-channel int8 pattern (None: it has)."""
    spec = node.meta.get(SPEC_META_KEY)
    packed_node, scales_node, zeros, _group_size, _out_dtype = node.args
    described = spec.describe() if spec is not None else "int_codes"
    if spec is None or node.meta.get(FORMAT_META_KEY) != "int_codes":
        return "a weight dequantize without convert's spec and format"
    if not (spec.bits == 8 and spec.symmetric and isinstance(spec.granularity, PerChannel)) or zeros is not None:
        return f"{described} weights have no XNNPACK pattern (it takes int4 per-group and int8 per-channel symmetric weights)"
    codes = get_attr_value(gm, packed_node.target)
    scales = get_attr_value(gm, scales_node.target)
    if codes.dtype != torch.int8 or codes.dim() != 2 or tuple(scales.shape) not in ((codes.shape[0], 1), (codes.shape[0],)):
        return f"{described} weights stored as {codes.dtype} {tuple(codes.shape)} codes with {tuple(scales.shape)} scales"
    for user in node.users:
        if user.target is not torch.ops.aten.linear.default or user.args[1] is not node:
            return f"{described} weights read by {user.target} (XNNPACK's pattern is a linear's weight)"
        x = user.args[0]
        if not (isinstance(x, torch.fx.Node) and x.target is qd.dequantize_per_token.default):
            return (f"{described} weights under a float or non-per-token activation (XNNPACK delegates them "
                    "under int8 dynamic per-token activations only)")
    return None


def _rewrite_per_channel_weight(gm: torch.fx.GraphModule, node: torch.fx.Node, qd) -> str:
    """A symmetric per-channel int_codes weight dequantize -> dequantize_per_channel (axis 0)
    of the same codes (the tensor itself, registered as `<weight>_codes`)."""
    packed_node, scales_node, _zeros, _group_size, out_dtype = node.args
    spec = node.meta[SPEC_META_KEY]
    codes = get_attr_value(gm, packed_node.target)
    scales = get_attr_value(gm, scales_node.target)
    weight = packed_node.target.removesuffix("_packed")
    codes_target = _register(gm, weight + CODES_SUFFIX, codes)
    # one scale per row, (N,): float32 holds every float32 / bfloat16 / float16 value exactly
    scales_target = _register(gm, weight + "_scales_fp32", scales.reshape(-1).to(torch.float32).contiguous())
    zeros_target = _register(gm, weight + ZEROS_SUFFIX, torch.zeros(codes.shape[0], dtype=torch.int64))
    graph = gm.graph
    with graph.inserting_before(node):
        args = [graph.get_attr(t) for t in (codes_target, scales_target, zeros_target)]
        new = graph.call_function(
            qd.dequantize_per_channel.default,
            (*args, 0, spec.qmin, spec.qmax, torch.int8),
            {"out_dtype": out_dtype},
        )
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return weight


def _is_weight_dequantize(node: torch.fx.Node) -> bool:
    return node.target is dequantize and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "get_attr"


def rewrite_for_xnnpack(gm: torch.fx.GraphModule) -> RewriteReport:
    """Rewrite `gm` (a converted graph; modified in place) into XNNPACK's patterns.

    Activations first, so that a per-channel weight can see what its linear reads."""
    qd = _quantized_decomposed()
    report = RewriteReport()
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is quantize_dynamic:
            if _rewrite_activation(gm, node, qd):
                report.activations += 1
            else:
                report.left.append((node.name, f"activation spec {node.args[1:5]} is not int8 per-token asymmetric"))
        elif isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "qatfx" and node.target not in (
            dequantize, torch.ops.qatfx.dequantize_int4.default,
        ):
            report.left.append((node.name, f"{node.target} has no XNNPACK pattern"))
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.qatfx.dequantize_int4.default, dequantize):
            continue
        if node.target is dequantize and not _is_weight_dequantize(node):
            continue  # an activation's (rewritten above, or reported with its quantize_dynamic)
        table = _rewrite_embeddings(gm, node)
        if table is not None:
            report.embeddings.append(table)
        if not node.users:
            continue  # an embedding-only table: eliminate_dead_code drops the dequantize
        if node.target is torch.ops.qatfx.dequantize_int4.default:
            report.weights.append(_rewrite_weight(gm, node, qd))
            continue
        problem = _per_channel_problem(gm, node, qd)
        if problem is None:
            report.weights.append(_rewrite_per_channel_weight(gm, node, qd))
        else:
            report.left.append((node.args[0].target.removesuffix("_packed"), problem))
    gm.graph.eliminate_dead_code()
    _drop_unread_parts(gm, report.weights + report.embeddings)
    gm.graph.lint()
    gm.recompile()
    return report


def _drop_unread_parts(gm: torch.fx.GraphModule, weights: list) -> None:
    """The packed codes, scales and group sums the rewritten weights no longer read: left
    registered, torch.export would store them in the program beside the codes."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for weight in weights:
        for part in ("_packed", "_scales", "_group_sums", "_zeros"):
            target = weight + part
            owner_path, _, name = target.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            if target not in read and name in owner._buffers:
                del owner._buffers[name]
