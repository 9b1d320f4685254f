"""`qatfx.export.hf_verify.verify_hf(out_dir, converted)`: does a directory `qatfx.export.hf`
wrote hold the converted model's grid, and does transformers compute what the converted model
computes from it? Every packed weight unpacked with compressed-tensors' `unpack_from_int32`
(every int8 W8A8 weight as it is) must equal convert's codes, every scale its scale, bit for
bit; the directory is loaded with `transformers.AutoModelForCausalLM.from_pretrained` and its
logits compared with the converted model's on held-out tokens. Activation quantization the
file does not keep (8da4w, Q8_0: written weight-only) is removed from the reference
(`float_activation_copy`), and the measured difference from the model itself is reported; a
W8A8 layer's activations are quantized by compressed-tensors in transformers, and the
reference keeps qatfx's.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from qatfx.export.hf_layout import (
    FORMATS,
    QUANT_METHOD,
    WEIGHTS_FILE,
    _converted_module,
    _quantized_by_hf_name,
    config_group_of,
)
from qatfx.export.llama_layout import LlamaHParams, llama_hparams
from qatfx.export.verify import (
    DEFAULT_MAX_RELATIVE_ERROR,
    DEFAULT_MIN_NEXT_TOKEN_AGREEMENT,
    ExportError,
    VerificationError,
    VerifyReport,
    check_thresholds,
    compare_logits,
    held_out_inputs,
    logits_of,
    mismatch_message,
)
from qatfx.graph.regions import graph_regions, is_regional, layer_path
from qatfx.module import copy_model_sharing_tensors, copy_sharing_tensors
from qatfx.ops import dequantize, quantize_dynamic
from qatfx.serialization import default_example_inputs
from qatfx.summary import summary

log = logging.getLogger("qatfx.export")

# The checkpoint against the converted model it was written from, weight-only: both multiply
# by the same weights (checked bit for bit: the loader's decompressed weights equal convert's
# dequantized ones) and differ at most in the order of their float operations (two
# implementations of RMSNorm, RoPE, attention and the residual adds). A sum of K terms
# computed in another order moves by at most gamma_K ~= K * u relative to sum |terms| (u =
# eps / 2, the unit roundoff; Higham, "Accuracy and Stability of Numerical Algorithms", 3.1).
# A Llama layer has REDUCTIONS_PER_LAYER such sums in sequence (input norm; q/k/v; q.k;
# softmax normalizer; p.v; o; post-attention norm; gate/up; down: parallel ones counted
# once), the head 2 more (final norm, lm_head). RMSNorm renormalizes and the residual adds do
# not amplify relative errors, so to first order the relative logit error is at most
# (9 L + 2) * K_max * u, K_max the longest sum (hidden, intermediate or sequence length).
# float32, the test models (L = 2, K_max = 128): 20 * 128 * 2^-24 = 1.5e-4; a wrong code or
# scale moves logits by a quantization step (~1e-1 relative). Measured here: 0 (bit-identical
# logits) on every model in tests/export/test_hf.py. The bound is capped at
# DEFAULT_MAX_RELATIVE_ERROR (bfloat16's u makes it vacuous for any real model).
REDUCTIONS_PER_LAYER = 9


@dataclass
class HfVerifyReport:
    path: Path
    weights: int  # quantized weights (packed, or int8 W8A8) equal to convert's codes and scales, bit for bit
    decompressed: int  # of those, transformers' decompressed weight == convert's dequantized weight, bit for bit
    float_grids: int  # quantized tables written in float (embedding, a float lm_head) == their dequantized grid
    logits: VerifyReport  # the checkpoint in transformers vs `reference`
    reference: str  # what the logits were compared with
    activation_drop: Optional[VerifyReport] = None  # activations dropped: the checkpoint vs the converted model itself (reported)
    dropped: str = "8da4w"  # the schemes whose activation quantization the file drops (their layers are written weight-only)

    def __str__(self) -> str:
        lines = [
            f"verify {self.path}: {self.weights} quantized weights hold convert's codes and scales bit for bit; "
            f"{self.decompressed} decompressed by transformers equal convert's dequantized weights"
            + (f"; {self.float_grids} float tables equal their dequantized grid" if self.float_grids else ""),
            f"  logits in transformers vs {self.reference}:",
            *("  " + line for line in str(self.logits).splitlines()[1:]),
        ]
        if self.activation_drop is not None:
            d = self.activation_drop
            lines.append(
                f"  vs the converted {self.dropped} model (activations quantized there, float here; reported, not a failure): "
                f"relative logit error {d.relative_error:.3g}, next-token agreement {d.next_token_agreement:.2%}, "
                f"max |logit difference| {d.max_abs_error:.3g}"
            )
        return "\n".join(lines)


def verify_hf(
    out_dir: Union[str, os.PathLike],
    converted: torch.nn.Module,
    inputs: Optional[Sequence] = None,
    *,
    kwargs: Optional[dict] = None,
    min_next_token_agreement: float = DEFAULT_MIN_NEXT_TOKEN_AGREEMENT,
    max_relative_error: Optional[float] = None,
) -> HfVerifyReport:
    """Does the directory `hf` wrote hold `converted`'s grid, and does transformers compute
    what `converted` computes from it?

    1. Every `weight_packed` unpacks (compressed-tensors' `unpack_from_int32`, with its config
       group's bits) to convert's codes, every int8 `weight` of a W8A8 group is convert's
       codes, and every `weight_scale` equals convert's scale, bit for bit; a quantized table
       written in float (the embedding, a float lm_head) equals its dequantized grid.
    2. `AutoModelForCausalLM.from_pretrained(out_dir)` (compressed-tensors decompresses on the
       first forward, on CPU too): each decompressed weight equals convert's dequantized
       weight bit for bit, and its logits on `inputs` (argument tuples whose first element is
       the token ids; default `held_out_inputs`) are compared with the converted model's
       (called with `kwargs`) by relative error, next-token agreement and max |difference|.
       Activation quantization the file drops (layers written weight-only) is removed from
       the converted model first (the computation the checkpoint describes; W8A8 layers keep
       theirs), and the model itself is compared too, reported only.

    Raises VerificationError when a weight differs or a logit threshold is missed:
    `max_relative_error` None is `float_error_bound` (see REDUCTIONS_PER_LAYER)."""
    path = Path(out_dir)
    module = _converted_module(converted, "qatfx.export.verify_hf")
    AutoModelForCausalLM, unpack_from_int32, load_file = _loaders()
    if not (path / WEIGHTS_FILE).is_file() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} / config.json; pass the directory qatfx.export.hf wrote")
    config = json.loads((path / "config.json").read_text())
    q = config.get("quantization_config")
    _check_quantization_config(q, path)
    file = load_file(str(path / WEIGHTS_FILE))
    quantized = _quantized_by_hf_name(module)
    weights, float_grids = _check_file(path, file, quantized, unpack_from_int32, q, tied=bool(config.get("tie_word_embeddings")))
    # the layers whose activations the file keeps (W8A8): their inputs stay quantized in the reference
    groups = {name: config_group_of(name.removesuffix(".weight"), q["config_groups"], q.get("ignore", ())) for name in quantized}
    keep = {
        qw.name for name, qw in quantized.items()
        if _stored(file, name.removesuffix(".weight")) and groups[name] is not None
        and q["config_groups"][groups[name]].get("input_activations")
    }

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_checkpoint_dtype(config, file)).eval()
    except Exception as exc:
        raise ExportError(
            f"transformers could not load {path} ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}); "
            "is the compressed-tensors package installed (pip install -e '.[hf]')?"
        ) from exc
    if inputs is None:
        example, recorded = default_example_inputs(module)
        kwargs = recorded if kwargs is None else kwargs
        inputs = held_out_inputs(module, example, kwargs)
    if not inputs:
        raise ValueError("verify_hf needs at least one input: a list of argument tuples whose first element is the token ids")
    kwargs = dict(kwargs or {})
    reference, removed = float_activation_copy(module, keep)
    got, want, quantized_acts = [], [], []
    decompressed = None
    for args in inputs:
        args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
        with torch.no_grad():
            got.append(logits_of(model(input_ids=args[0])).detach())
            if decompressed is None:  # compressed-tensors decompresses on the first forward
                decompressed = _check_decompressed(path, model, quantized, file)
            want.append(logits_of(reference(*args, **kwargs)).detach())
            if removed:
                quantized_acts.append(logits_of(module(*args, **kwargs)).detach())
    bound = max_relative_error
    if bound is None:
        bound = float_error_bound(llama_hparams(model.config), model.dtype, max(int(a[0].shape[-1]) for a in map(_as_tuple, inputs)))
    check_thresholds(min_next_token_agreement, bound)
    logits = compare_logits(path, got, want, min_next_token_agreement, bound)
    what = "the converted model"
    if removed:
        weight_only = sorted({f"W{g.get('weights', {}).get('num_bits', 8)}A16" for g in q["config_groups"].values()
                              if not g.get("input_activations")})
        what += (" with its activation quantization removed where the file is weight-only (the W8A8 layers keep theirs)" if keep else
                 f" with its activation quantization removed (what {'/'.join(weight_only) or 'a weight-only file'} computes)")
    dropped = sorted({r.scheme for r in summary(module).layers if r.quantized and r.input_spec is not None and r.op != "embedding"
                      and r.layer + ".weight" not in keep})
    report = HfVerifyReport(
        path=path, weights=weights, decompressed=decompressed or 0, float_grids=float_grids, logits=logits, reference=what,
        activation_drop=compare_logits(path, got, quantized_acts, 0.0, math.inf) if removed else None,
        dropped=", ".join(dropped) or "8da4w",
    )
    log.info("qatfx: %s", report)
    if not logits.passed:
        raise VerificationError(
            mismatch_message(
                f"{path} in transformers does not compute what {what} computes", logits,
                "The weights match bit for bit, so the difference is in the float computation around them (a config "
                "field the converted model does not follow: rope, norm eps, head dim?). If it is expected, pass "
                "max_relative_error= / min_next_token_agreement=",
            ),
            report,
        )
    return report


def float_error_bound(hp: LlamaHParams, dtype: torch.dtype, seq_len: int = 1) -> float:
    """The relative logit error two float implementations of one Llama with identical weights
    may show (derivation above REDUCTIONS_PER_LAYER), capped at DEFAULT_MAX_RELATIVE_ERROR."""
    u = torch.finfo(dtype).eps / 2
    k_max = max(hp.hidden_size, hp.intermediate_size, seq_len)
    return min((REDUCTIONS_PER_LAYER * hp.num_hidden_layers + 2) * k_max * u, DEFAULT_MAX_RELATIVE_ERROR)


def float_activation_copy(converted: torch.nn.Module, keep=()) -> tuple[torch.nn.Module, int]:
    """A copy of `converted` (sharing its tensors) whose activation quantization
    (`qatfx::quantize_dynamic` -> `qatfx::dequantize`) is removed: the dequantized activation
    is replaced by the float activation it was computed from, for every linear but those whose
    weight is named in `keep` (model names, e.g. "lm_head.weight": layers a file keeps W8A8).
    With the weights as convert stored them, that is the model a file with those layers
    weight-only describes. Returns (copy, number of activation dequantizes bypassed for at
    least one linear); 0 returns `converted` itself."""
    module = getattr(converted, "_orig_mod", converted)
    keep = set(keep)

    def bypassed(region, node) -> list:
        return [user for user in node.users if _linear_weight_name(region, user) not in keep]

    if not any(_is_activation_dequantize(n) and bypassed(r, n) for r, gm in graph_regions(module) for n in gm.graph.nodes):
        return converted, 0
    copy = copy_model_sharing_tensors(module) if is_regional(module) else copy_sharing_tensors(module)
    removed = 0
    for region, gm in graph_regions(copy):
        for node in list(gm.graph.nodes):
            if _is_activation_dequantize(node) and (users := bypassed(region, node)):
                source = node.args[0].args[0].args[0]  # dequantize(getitem(quantize_dynamic(x), 0))
                for user in users:
                    user.replace_input_with(node, source)
                removed += 1
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return copy, removed


def _linear_weight_name(region: str, node: torch.fx.Node) -> Optional[str]:
    """The model name of the weight a linear node multiplies by (a dequantize of a stored
    weight: `<layer>.weight_packed` for every weight format), else None."""
    if node.op != "call_function" or node.target is not torch.ops.aten.linear.default or len(node.args) < 2:
        return None
    weight = node.args[1]
    if getattr(weight, "op", None) != "call_function" or not weight.args or getattr(weight.args[0], "op", None) != "get_attr":
        return None
    return layer_path(region, weight.args[0].target.removesuffix("_packed"))


def _loaders():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise ExportError(
            f"verifying a compressed-tensors checkpoint needs transformers and compressed-tensors ({exc}); install the "
            "hf extra: pip install -e '.[hf]'"
        ) from exc
    return AutoModelForCausalLM, unpack_from_int32, load_file


def _is_activation_dequantize(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target is not dequantize or not node.args:
        return False
    item = node.args[0]
    return (
        getattr(item, "op", None) == "call_function" and item.target is operator.getitem
        and getattr(item.args[0], "target", None) is quantize_dynamic
    )


def _as_tuple(args) -> tuple:
    return tuple(args) if isinstance(args, (tuple, list)) else (args,)


def _check_quantization_config(q: Optional[dict], path: Path) -> None:
    if not q or q.get("quant_method") != QUANT_METHOD or q.get("format") not in FORMATS or not q.get("config_groups"):
        raise ExportError(
            f"{path}/config.json has no compressed-tensors {' / '.join(FORMATS)} quantization_config; pass a directory "
            "qatfx.export.hf wrote"
        )


def _stored(file: dict, module: str) -> bool:
    """Whether the file holds `module` quantized: packed, or int8 codes as they are (W8A8)."""
    return f"{module}.weight_packed" in file or (f"{module}.weight" in file and file[f"{module}.weight"].dtype == torch.int8)


def _checkpoint_dtype(config: dict, file: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return next((t.dtype for t in file.values() if t.is_floating_point()), torch.float32)


def _check_file(path: Path, file: dict, quantized: dict, unpack_from_int32, q: dict, tied: bool = False) -> tuple[int, int]:
    """(quantized weights checked, float tables checked); raises VerificationError on a mismatch.
    q: the quantization_config, whose config group gives a packed weight's bits. tied: the
    checkpoint ties lm_head to the embedding, so a quantized head written in float is the
    embedding's table."""
    problems, packed, tables = [], 0, 0
    for name, qw in quantized.items():
        module = name.removesuffix(".weight")
        if _stored(file, module):
            group = config_group_of(module, q["config_groups"], q.get("ignore", ()))
            scale = file[f"{module}.weight_scale"]
            if group is None:
                problems.append(f"{module}: quantized in {WEIGHTS_FILE} but no config group targets it (or it is ignored)")
                continue
            if f"{module}.weight_packed" in file:
                shape = file[f"{module}.weight_shape"]
                bits = q["config_groups"][group].get("weights", {}).get("num_bits", 8)
                codes = unpack_from_int32(file[f"{module}.weight_packed"], bits, torch.Size(shape.tolist()))
            else:
                shape, codes = torch.tensor(file[f"{module}.weight"].shape), file[f"{module}.weight"]
            if tuple(shape.tolist()) != tuple(qw.codes.shape) or not torch.equal(codes, qw.codes.to(torch.int8)):
                problems.append(f"{module}: weight_packed does not unpack to convert's codes" if f"{module}.weight_packed" in file
                                else f"{module}: the int8 weight differs from convert's codes")
            elif scale.shape != qw.scales.shape or not torch.equal(scale.double(), qw.scales.double()):
                problems.append(f"{module}: weight_scale differs from convert's scales")
            packed += 1
        elif name in file or tied and name == "lm_head.weight" and "model.embed_tokens.weight" in file:
            name = name if name in file else "model.embed_tokens.weight"
            if not torch.equal(file[name], qw.dequantized(file[name].dtype)):
                problems.append(f"{name}: the float table differs from convert's dequantized grid")
            tables += 1
        else:
            problems.append(f"{module}: quantized in the converted model, absent from {WEIGHTS_FILE}")
    if problems:
        raise VerificationError(
            f"{path}/{WEIGHTS_FILE} does not hold the converted model's weights:\n" + "\n".join(f"  {p}" for p in problems[:8])
            + "\nWas the directory written from this converted model?",
            None,
        )
    return packed, tables


def _check_decompressed(path: Path, model: torch.nn.Module, quantized: dict, file: dict) -> int:
    """After the first forward: each quantized linear's weight in transformers (decompressed by
    compressed-tensors) against convert's dequantized weight, in the model's dtype."""
    problems, checked = [], 0
    for name, qw in quantized.items():
        module_name = name.removesuffix(".weight")
        if not _stored(file, module_name):
            continue
        weight = getattr(model.get_submodule(module_name), "weight", None)
        if weight is None or weight.shape != qw.codes.shape:
            problems.append(f"{module_name}: transformers holds no decompressed weight of shape {tuple(qw.codes.shape)}")
        elif not torch.equal(weight.detach(), qw.dequantized(weight.dtype)):
            problems.append(f"{module_name}: the decompressed weight differs from convert's dequantized weight")
        checked += 1
    if problems:
        raise VerificationError(
            f"{path} loaded in transformers does not multiply by the converted model's weights:\n"
            + "\n".join(f"  {p}" for p in problems[:8]),
            None,
        )
    return checked
