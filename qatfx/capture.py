"""Capture a model as an exported GraphModule, with clear errors for what cannot be."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from typing import Any, Iterator, Optional

import torch
import torch.fx
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree

from qatfx.graph.linear_sites import SITE_OPERANDS
from qatfx.ops import fake_quantize

log = logging.getLogger("qatfx.capture")


class CaptureError(RuntimeError):
    """torch.export could not capture the model (or captured a graph that cannot run); the
    message carries the exporter's reason, where in the model it failed, and what to try.
    The exporter's own exception is chained as `__cause__`."""


def automatic_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict, *, warn_size_one: bool = True):
    """Every dim of every tensor input is Dim.AUTO: batch and sequence length stay dynamic
    unless the model pins them (hidden sizes get specialized without error). The warning
    about size-1 dims is for the user's own example inputs; a region's inputs come from the
    model (a RoPE table broadcast over batch) and are fixed on purpose."""

    def spec(value):
        if not isinstance(value, torch.Tensor):
            return None
        if 1 in value.shape and warn_size_one:
            log.warning(
                "qatfx: an example input of shape %s has a dim of size 1; torch.export fixes "
                "size-1 dims, so that dim will not accept other sizes. Use example inputs with "
                "batch and sequence length >= 2 to keep them dynamic.",
                tuple(value.shape),
            )
        return {d: Dim.AUTO for d in range(value.dim())}

    spec_args, spec_kwargs = pytree.tree_map(spec, (args, kwargs))
    return by_parameter_name(model, args, kwargs, spec_args, spec_kwargs) if kwargs else spec_args


def by_parameter_name(model: torch.nn.Module, args, kwargs, spec_args, spec_kwargs) -> dict:
    """Dynamic shapes keyed by forward's parameter names: how export matches them when
    some inputs are keyword arguments."""
    signature = inspect.signature(model.forward)
    names = signature.bind(*args, **kwargs).arguments
    shapes = signature.bind(*spec_args, **spec_kwargs).arguments
    return {name: shapes[name] for name in names}


@contextlib.contextmanager
def explicit_keywords(model: torch.nn.Module, kwargs: dict) -> Iterator[None]:
    """Within the block, `model.forward` names the keyword arguments it gets through
    `**kwargs` as keyword-only parameters. torch.export (2.11 to 2.13) lists such arguments
    twice when it matches dynamic shapes (once under the `**kwargs` name, once by their own
    names) and fails with "Must provide a tree_name"; a torchtune or GPT-2 decoder block is
    called that way."""
    forward = model.forward
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):
        signature = None
    params = list(signature.parameters.values()) if signature else []
    if not params or params[-1].kind is not inspect.Parameter.VAR_KEYWORD:
        yield
        return
    named = {p.name for p in params}
    extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in kwargs if k not in named]

    def call(*args, **kw):
        return forward(*args, **kw)

    call.__signature__ = signature.replace(parameters=params[:-1] + extra)
    model.forward = call
    try:
        yield
    finally:
        del model.forward


def unviewed(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The inputs with views cloned: export guards on a view's ._base, which every later
    plain (non-view) input would then fail."""
    return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) and v._is_view() else v, (args, kwargs))


@contextlib.contextmanager
def kv_cache_off(model: Any) -> Iterator[None]:
    """Within the block, a Hugging Face model's config says use_cache=False: a program cannot
    return the KV cache object (DynamicCache), and a model built with the default config
    (use_cache=True) would otherwise fail torch.export. Restored afterwards; a model without
    a `config.use_cache` is left alone."""
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    if not cached:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = cached


# ---- explaining an export failure ---------------------------------------------------------

_MAX_REASON_LINES = 6
# A frame of the user's model in the exporter's message (strict: "# File ..., code: ...",
# non-strict: 'File "...", line N, in f' then the code line).
_FRAME = re.compile(r'File "?([^",]+)"?, line (\d+), in (\w+)(?:, code: (.*)|\n\s+(\S.*))?')
_VIOLATED = re.compile(r"Constraints violated \((.*?)\)!")
_SOURCE_DIM = re.compile(r"L\['(\w+)'\]\.size\(\)\[(\d+)\]")
# non-strict: "Found <class 'pkg.Box'> in output", strict: "UserDefinedObjectVariable(Box) at output 0"
_UNKNOWN_TYPE = re.compile(r"<class '([\w.]+)'>|Variable\((\w+)\)")


def _reason(text: str) -> str:
    """The first line of the exporter's message plus the lines that say what to change
    (constraint bullets, suggested fixes), without its debugging boilerplate."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    keep = lines[:1]
    in_fixes = False
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("- ") or stripped.startswith("Suggested fixes"):
            keep.append(line)
            in_fixes = stripped.startswith("Suggested fixes") or in_fixes
        elif in_fixes and line.startswith("  ") and stripped:
            keep.append(line)
        else:
            in_fixes = False
    return "\n".join(keep[:_MAX_REASON_LINES])


def _user_frame(text: str, *, innermost: bool = False) -> Optional[str]:
    """`file:line in function: code` of the first (or innermost) frame outside torch, if
    the text has one."""
    frames = []
    for match in _FRAME.finditer(text):
        path, line, function, code_a, code_b = match.groups()
        if "/torch/" not in path:
            code = (code_a or code_b or "").strip()
            frames.append(f"{path}:{line} in {function}" + (f": {code}" if code else ""))
    return (frames[-1] if innermost else frames[0]) if frames else None


def _readable_dims(names: str) -> str:
    """"L['x'].size()[1], seq" -> "x dim 1, seq"."""
    return _SOURCE_DIM.sub(lambda m: f"{m.group(1)} dim {m.group(2)}", names)


def _forward_signature(model: torch.nn.Module) -> str:
    try:
        return f"{type(model).__name__}.forward{inspect.signature(model.forward)}"
    except (TypeError, ValueError):
        return f"{type(model).__name__}.forward"


def _hints(model: torch.nn.Module, exc: BaseException, text: str, strict: bool) -> list[str]:
    """Hints for the failure classes users hit most, the specific one first."""
    name = type(exc).__name__
    error_type = str(getattr(exc, "error_type", ""))
    hints = []
    violated = _VIOLATED.search(text)
    if violated or "CONSTRAINT_VIOLATION" in error_type:
        dims = _readable_dims(violated.group(1)) if violated else "a dynamic dim"
        hints.append(
            f"the dynamic shapes asked for cannot hold: {dims} cannot take every size (the model "
            "fixes it or ties it to another dim; the exporter's suggested fix is above). Pass "
            "dynamic_shapes= with that dim Dim.STATIC or Dim.AUTO, or with the suggested min/max "
            "or relation; leaving dynamic_shapes unset (qatfx's default, Dim.AUTO everywhere) "
            "specializes such dims instead of failing"
        )
    elif "not in range" in text:
        hints.append(
            "an example input's size lies outside the min/max of its Dim in dynamic_shapes: "
            "widen the Dim's range or pick example inputs inside it"
        )
    elif "data-dependent" in text or "Data-dependent" in text or name == "GuardOnDataDependentSymNode":
        hints.append(
            "forward branches on, or sizes a tensor by, the *values* of a tensor (data-dependent "
            "control flow, .item(), nonzero), which torch.export cannot trace: make it "
            "branchless (torch.where / clamp), use torch.cond, compute the value outside the "
            "model and pass it in, or assert what holds with torch._check(...)"
        )
    elif "in output" in text or "at output" in text:
        found = _UNKNOWN_TYPE.search(text)
        what = (found.group(1) or found.group(2)) if found else "an object torch.export does not know"
        hints.append(
            f"forward returns {what}, which torch.export cannot return: wrap the model so "
            "forward returns tensors (e.g. `return self.lm(input_ids, use_cache=False).logits`); "
            "for Hugging Face models pass use_cache=False (the KV cache object is the usual "
            "culprit); or register the class with torch.utils._pytree.register_pytree_node"
        )
    elif "input type" in text or "inputs with type" in text:
        hints.append(
            "an example input is an object torch.export cannot flatten: pass tensors (and "
            "ints/floats/strings), or register the class with torch.export.register_dataclass"
        )
    elif isinstance(exc, TypeError):
        hints.append(f"example_inputs / example_kwargs must match {_forward_signature(model)}")
    hints.append(
        ("try strict=False (tracing with fake tensors, accepts more Python)" if strict else
         "try strict=True (Dynamo tracing, sometimes gets further or names a more precise location)")
        + "; or export the model yourself with torch.export.export and pass the ExportedProgram"
    )
    return hints


def export_error(model: torch.nn.Module, exc: BaseException, *, strict: bool = False) -> CaptureError:
    """A CaptureError for `exc` raised by torch.export on `model`: the exporter's reason,
    the model line it points at, and hints."""
    text = str(exc).strip()
    parts = [f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {_reason(text) if text else repr(exc)}"]
    frame = _user_frame(text)
    if frame:
        parts.append(f"At: {frame}")
    parts.append("Hints:\n" + "\n".join(f"  - {hint}" for hint in _hints(model, exc, text, strict)))
    return CaptureError("\n".join(parts))


# ---- checking the captured graph ----------------------------------------------------------


def _check_runnable(gm: torch.fx.GraphModule, model_name: str) -> None:
    """torch.export's fake kernels do not check operand dtypes, so a model that fails in
    eager (an int64 input into a float32 linear) exports fine and would fail at its first
    call, after qatfx inserted fake-quant on the integer input; say so at capture."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SITE_OPERANDS:
            continue
        a, b = (node.args[i] for i in SITE_OPERANDS[node.target])
        vals = [x.meta.get("val") if isinstance(x, torch.fx.Node) else None for x in (a, b)]
        if all(isinstance(v, torch.Tensor) for v in vals) and vals[0].dtype != vals[1].dtype:
            stack = node.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else ""
            frame = _user_frame(node.meta.get("stack_trace") or "", innermost=True)
            raise CaptureError(
                f"{model_name} does not run: {f'layer {path!r}' if path else 'the model'} "
                f"({node.target}) multiplies a {vals[0].dtype} operand by a {vals[1].dtype} one; "
                "eager PyTorch refuses that, torch.export's fake kernels do not check it."
                + (f"\nAt: {frame}" if frame else "")
                + "\nHints:\n  - pass example_inputs of the dtypes the model expects (token ids "
                "into an embedding, floats into a linear), or cast inside forward"
            )


def _check_exported(gm: torch.fx.GraphModule) -> None:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    if any(n.target is fake_quantize for n in nodes):
        raise ValueError(
            "this module is already prepared (it contains qatfx.fake_quantize nodes); "
            "prepare_pt2e must run once, on the float model"
        )
    if any(n.op == "call_module" and not n.target.startswith("_guards") for n in gm.graph.nodes) or any(
        "val" not in n.meta for n in nodes
    ):
        raise ValueError(
            "this GraphModule does not come from torch.export (it lacks node.meta['val'] or "
            "calls submodules, as torch.fx.symbolic_trace graphs do); pass the nn.Module with "
            "example_inputs, an ExportedProgram, or torch.export.export(...).module()"
        )


def capture(
    model: Any,
    example_inputs: Optional[tuple] = None,
    *,
    example_kwargs: Optional[dict] = None,
    dynamic_shapes: Any = None,
    strict: bool = False,
    warn_size_one: bool = True,
) -> torch.fx.GraphModule:
    """An exported GraphModule for an nn.Module (exported here), an ExportedProgram, or the
    GraphModule of `ep.module()`."""
    if isinstance(model, ExportedProgram):
        gm = model.module()
    elif isinstance(model, torch.fx.GraphModule):
        gm = model
    elif isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise ValueError(
                "prepare_pt2e(model, quantizer, example_inputs): example_inputs (a tuple of "
                "tensors the model accepts) is required to export an nn.Module"
            )
        if not isinstance(example_inputs, tuple):
            example_inputs = (example_inputs,)
        example_inputs, kwargs = unviewed(example_inputs, example_kwargs or {})
        try:
            with explicit_keywords(model, kwargs), kv_cache_off(model):
                if dynamic_shapes is None:
                    dynamic_shapes = automatic_dynamic_shapes(model, example_inputs, kwargs, warn_size_one=warn_size_one)
                ep = torch.export.export(model, example_inputs, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
        except Exception as exc:
            raise export_error(model, exc, strict=strict) from exc
        gm = ep.module()
    else:
        raise TypeError(
            f"prepare_pt2e expects an nn.Module, an ExportedProgram or an exported GraphModule, "
            f"got {type(model).__name__}"
        )
    _check_exported(gm)
    _check_runnable(gm, type(model).__name__)
    return gm
