"""`qatfx.export.verify_pte(pte, converted, inputs)`: does a `.pte` compute what the converted
qatfx model computes?

Both run on held-out inputs (not the export's example inputs): the program in ExecuTorch's
runtime (`executorch.runtime`), the converted model in PyTorch. Their logits are compared by
max |difference|, relative error ||pte - converted|| / ||converted|| over all inputs, and
next-token agreement (argmax over the last dim, the fraction of positions that agree).
Below a threshold, `VerificationError` says by how much and how to change the threshold.

Why two thresholds: agreement alone can miss a wrong program (an untrained model with tied
embeddings predicts its input token whatever its weights), and relative error alone says
nothing about the decision the model serves. docs/export_executorch.md gives the figures.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch.utils import _pytree as pytree

from qatfx.export.xnnpack_patterns import load_quantized_kernels
from qatfx.serialization import default_example_inputs

log = logging.getLogger("qatfx.export")

DEFAULT_MIN_NEXT_TOKEN_AGREEMENT = 0.9
# The runtime and the converted model compute the same int4 weight grid and the same int8
# per-token activation scheme; what differs is float accumulation order, XNNPACK's own
# activation rounding (a code can differ by one) and, for scales trained in float32, the
# bfloat16 rounding of the weight scales. Measured on CPU here: 1.6e-7 (toy, bf16 scales),
# 0.24% (4-layer charlm-size model, bf16 scales), 0.5% / 1.4% (the same two, float32 scales);
# 8da4w's own error vs float is 7.9% / 24% on those models, a .pte from another model ~110%.
# 0.1 leaves 7x room over the largest legitimate difference and flags any program whose
# error is of the order of the quantization error itself.
DEFAULT_MAX_RELATIVE_ERROR = 0.1
HELD_OUT_BATCHES = 4  # x the example's positions: 64 positions for a (2, 8) example
HELD_OUT_SEED = 0

# ExecuTorch's ScalarType codes (c10's numbering) for the input dtypes a model takes.
_SCALAR_TYPES = {
    0: torch.uint8, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.int64, 5: torch.float16,
    6: torch.float32, 7: torch.float64, 11: torch.bool, 15: torch.bfloat16,
}


class ExportError(RuntimeError):
    """The model cannot be exported for this runtime; the message names what and the fix.

    Defined here, below executorch.py (which imports it from this module), so the export and
    its verification raise one class without an import cycle."""


class VerificationError(ExportError):
    """The `.pte` does not compute what the converted model computes; `.report` has the numbers."""

    def __init__(self, message: str, report: "VerifyReport") -> None:
        super().__init__(message)
        self.report = report
        self.export = None  # qatfx.export.executorch sets it to its ExecuTorchExport (the file stays written)


@dataclass
class VerifyReport:
    path: Path
    batches: int  # held-out inputs run
    positions: int  # logit vectors compared (all dims but the last, over all batches)
    max_abs_error: float
    relative_error: float  # ||pte - converted|| / ||converted|| over all batches
    next_token_agreement: float  # fraction of positions whose argmax agrees
    min_next_token_agreement: float = DEFAULT_MIN_NEXT_TOKEN_AGREEMENT
    max_relative_error: float = DEFAULT_MAX_RELATIVE_ERROR

    @property
    def failures(self) -> list[str]:
        """One line per threshold missed (NaN misses every threshold)."""
        found = []
        if not self.next_token_agreement >= self.min_next_token_agreement:
            found.append(f"next-token agreement {self.next_token_agreement:.2%} < min_next_token_agreement {self.min_next_token_agreement:.2%}")
        if not self.relative_error <= self.max_relative_error:
            found.append(f"relative logit error {self.relative_error:.3g} > max_relative_error {self.max_relative_error:.3g}")
        return found

    @property
    def passed(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        agreement_ok = self.next_token_agreement >= self.min_next_token_agreement
        relative_ok = self.relative_error <= self.max_relative_error
        rows = [
            ("next-token agreement", f"{self.next_token_agreement:.2%}", f">= {self.min_next_token_agreement:.2%}", agreement_ok),
            ("relative logit error", f"{self.relative_error:.3g}", f"<= {self.max_relative_error:.3g}", relative_ok),
            ("max |logit difference|", f"{self.max_abs_error:.3g}", "(reported)", None),
        ]
        lines = [f"verify {self.path} vs the converted model: {self.batches} held-out inputs, {self.positions} positions"]
        lines += [f"  {name:<23} {value:>10}  {limit:<12} {'' if ok is None else 'ok' if ok else 'FAILED'}".rstrip() for name, value, limit, ok in rows]
        return "\n".join(lines)


def check_thresholds(min_next_token_agreement: float, max_relative_error: float) -> None:
    """Refuse thresholds no result can be judged against, before any work."""
    if not 0.0 <= min_next_token_agreement <= 1.0:
        raise ValueError(f"min_next_token_agreement={min_next_token_agreement} must be a fraction in [0, 1] (0.9: 90% of positions)")
    if not max_relative_error >= 0.0:
        raise ValueError(f"max_relative_error={max_relative_error} must be >= 0 (0.1: ||pte - converted|| <= 10% of ||converted||)")


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model output: a tensor, an HF-style output's `.logits`, or the first
    element of a tuple / list (HF models called with return_dict=False)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(
        f"cannot find logits in the model's output ({type(output).__name__}); verify compares a tensor, an output "
        "with .logits or a tuple whose first element is the logits: wrap the model so that it returns one"
    )


def load_method(pte_path: Union[str, os.PathLike]):
    """The `forward` method of a `.pte`, loaded in ExecuTorch's runtime."""
    path = Path(pte_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .pte file; pass the file qatfx.export.executorch (or `qatfx export`) wrote")
    try:
        from executorch.runtime import Runtime
    except ImportError as exc:
        raise ExportError(
            f"verifying a .pte needs the executorch package ({exc}); install it with "
            "`pip install -e \".[executorch]\"` (executorch 1.5.1 with torch 2.13 / torchao 0.18)"
        ) from exc
    try:
        # a program with a quantized embedding needs ExecuTorch's quantized kernels, which the
        # Python runtime does not link; without them, loading says which operator is missing
        load_quantized_kernels()
    except FileNotFoundError as exc:
        log.debug("qatfx: %s", exc)
    try:
        return Runtime.get().load_program(str(path)).load_method("forward")
    except Exception as exc:
        raise ExportError(
            f"{path} is not an ExecuTorch program with a forward method ({type(exc).__name__}: {exc}); "
            "pass a .pte written by qatfx.export.executorch (or `qatfx export`)"
        ) from exc


def verify_pte(
    pte_path: Union[str, os.PathLike],
    converted: torch.nn.Module,
    inputs: Sequence[tuple],
    *,
    kwargs: Optional[dict] = None,
    min_next_token_agreement: float = DEFAULT_MIN_NEXT_TOKEN_AGREEMENT,
    max_relative_error: float = DEFAULT_MAX_RELATIVE_ERROR,
) -> VerifyReport:
    """Run the `.pte` and `converted` on each argument tuple in `inputs` (with the same
    `kwargs` each time, e.g. {"use_cache": False}) and compare their logits. Returns the
    report; raises VerificationError when agreement or relative error misses its threshold.

    The program takes the leaves of (args, kwargs) in order, as torch.export flattened them:
    give the arguments the export was given, with the sizes the program was planned for."""
    check_thresholds(min_next_token_agreement, max_relative_error)
    if not inputs:
        raise ValueError("verify_pte needs at least one input: a list of argument tuples, e.g. [(tokens,)]")
    method = load_method(pte_path)
    kwargs = dict(kwargs or {})
    got, want = [], []
    for args in inputs:
        args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
        flat = pytree.tree_leaves((args, kwargs))
        _check_inputs(method, flat, pte_path)
        try:
            outputs = method.execute(flat)
        except RuntimeError as exc:
            raise ValueError(
                f"{pte_path} refused the inputs {_describe(flat)} ({exc}); it takes {_expected(method)}: "
                "give verify inputs of those sizes (an export with fixed shapes takes exactly its example's)"
            ) from exc
        with torch.no_grad():
            reference = converted(*args, **kwargs)
        got.append(_runtime_logits(outputs, reference, pte_path))
        want.append(logits_of(reference).detach())
    report = compare_logits(Path(pte_path), got, want, min_next_token_agreement, max_relative_error)
    log.info("qatfx: verified %s on %d positions: next-token agreement %.2f%%, relative logit error %.3g",
             pte_path, report.positions, 100 * report.next_token_agreement, report.relative_error)
    if not report.passed:
        raise VerificationError(
            mismatch_message(
                f"{pte_path} does not compute what the converted model computes", report,
                "Was the .pte exported from this converted model? If the difference is expected, change the threshold: "
                "min_next_token_agreement= / max_relative_error= (verify_pte, qatfx.export.executorch) or "
                "--min-agreement / --max-relative-error (qatfx export, qatfx verify)",
            ),
            report,
        )
    return report


def mismatch_message(what: str, report: "VerifyReport", advice: str) -> str:
    """A failed comparison, worded the same for every runtime: the numbers, then the advice."""
    return (
        f"{what} ({report.batches} held-out inputs, {report.positions} positions):\n"
        + "\n".join(f"  {line}" for line in report.failures)
        + f"\n  (max |logit difference| {report.max_abs_error:.3g})\n" + advice
    )


def compare_logits(
    path: Path,
    runtime: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor],
    min_next_token_agreement: float = DEFAULT_MIN_NEXT_TOKEN_AGREEMENT,
    max_relative_error: float = DEFAULT_MAX_RELATIVE_ERROR,
) -> VerifyReport:
    """The report for runtime vs reference logits, one pair per held-out input."""
    for a, b in zip(runtime, reference):
        if a.shape != b.shape:
            raise VerificationError(
                f"{path} returns logits of shape {tuple(a.shape)}, the converted model {tuple(b.shape)}: "
                "the .pte was not exported from this model (or with other inputs)",
                VerifyReport(path, len(reference), 0, math.inf, math.inf, 0.0, min_next_token_agreement, max_relative_error),
            )
    # float64: the sums of squares over many logits must not add their own rounding
    a = torch.cat([t.detach().reshape(-1, t.shape[-1]).double() for t in runtime])
    b = torch.cat([t.detach().reshape(-1, t.shape[-1]).double() for t in reference])
    diff = a - b
    norm = b.norm().item()
    relative = diff.norm().item() / norm if norm > 0 else (0.0 if diff.norm().item() == 0 else math.inf)
    return VerifyReport(
        path=path,
        batches=len(reference),
        positions=b.shape[0],
        max_abs_error=diff.abs().max().item(),
        relative_error=relative,
        next_token_agreement=(a.argmax(-1) == b.argmax(-1)).double().mean().item(),
        min_next_token_agreement=min_next_token_agreement,
        max_relative_error=max_relative_error,
    )


def held_out_inputs(
    converted: torch.nn.Module,
    example_inputs: Optional[tuple] = None,
    example_kwargs: Optional[dict] = None,
    *,
    batches: int = HELD_OUT_BATCHES,
    seed: int = HELD_OUT_SEED,
) -> list[tuple]:
    """`batches` argument tuples shaped like `example_inputs` (default: the sizes the model was
    captured with), drawn from a generator seeded with `seed` (the global RNG is untouched):
    an integer tensor gets token ids in [0, vocab), vocab being the last dim of the model's
    logits on the example (the example's own ids say nothing: the default example is zeros);
    a float tensor gets randn; anything else is passed as given. A model whose integer inputs
    are not token ids of its output vocabulary needs its own verify inputs."""
    if example_inputs is None:
        example_inputs, recorded = default_example_inputs(converted)
        example_kwargs = recorded if example_kwargs is None else example_kwargs
    args = tuple(example_inputs)
    vocab = None
    if any(_is_integer(x) for x in args):
        with torch.no_grad():
            vocab = logits_of(converted(*args, **(example_kwargs or {}))).shape[-1]
    generator = torch.Generator().manual_seed(seed)
    drawn = []
    for _ in range(batches):
        drawn.append(tuple(_draw(x, vocab, generator) for x in args))
    return drawn


def _is_integer(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool


def _draw(x: Any, vocab: Optional[int], generator: torch.Generator) -> Any:
    if _is_integer(x):
        return torch.randint(0, vocab, x.shape, generator=generator, dtype=x.dtype).to(x.device)
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    return x


def _runtime_logits(outputs: Sequence[Any], reference: Any, pte_path) -> torch.Tensor:
    """The runtime's output at the position the reference's logits have among its leaves
    (the program returns the flattened leaves of what the model returns)."""
    leaves = pytree.tree_leaves(reference)
    if len(outputs) != len(leaves):
        raise ValueError(
            f"{pte_path} returns {len(outputs)} outputs, the converted model {len(leaves)} ({type(reference).__name__}); "
            "call verify with the kwargs the export was given (e.g. use_cache=False for an HF model)"
        )
    target = logits_of(reference)
    return outputs[next((i for i, leaf in enumerate(leaves) if leaf is target), 0)]


def _check_inputs(method, flat: list, pte_path) -> None:
    """Number, dtype and rank of the inputs, against the program's own metadata."""
    meta = method.metadata
    if meta.num_inputs() != len(flat):
        raise ValueError(
            f"{pte_path} takes {meta.num_inputs()} inputs, verify was given {len(flat)} ({_describe(flat)}): "
            "pass the positional inputs and kwargs the export was given"
        )
    for i, value in enumerate(flat):
        if not isinstance(value, torch.Tensor):
            continue
        info = meta.input_tensor_meta(i)
        dtype = _SCALAR_TYPES.get(int(info.dtype()))
        if (dtype is not None and value.dtype != dtype) or value.dim() != len(info.sizes()):
            raise ValueError(
                f"{pte_path} input {i} is {str(dtype).removeprefix('torch.')} of shape {tuple(info.sizes())}, "
                f"verify was given {str(value.dtype).removeprefix('torch.')} of shape {tuple(value.shape)}: "
                "give inputs of the dtype and rank the export was given"
            )


def _describe(flat: list) -> str:
    return ", ".join(f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}" if isinstance(v, torch.Tensor) else repr(v) for v in flat)


def _expected(method) -> str:
    meta = method.metadata
    found = []
    for i in range(meta.num_inputs()):
        try:
            info = meta.input_tensor_meta(i)
        except Exception:  # a non-tensor input (a bool or int the export was given)
            found.append("a non-tensor value")
            continue
        dtype = _SCALAR_TYPES.get(int(info.dtype()), info.dtype())
        found.append(f"{str(dtype).removeprefix('torch.')}{list(info.sizes())}")
    return ", ".join(found)
