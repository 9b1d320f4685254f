"""The demo's last step: its QAT model as an ExecuTorch program (XNNPACK), verified against
the converted model, and its next-token rate next to the float model's; and, on request,
as files for other runtimes (GGUF for llama.cpp, a compressed-tensors directory for
transformers / vLLM), each with its verifier's lines."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("qatfx.recipes")


@dataclass
class DeployResult:
    scheme: str
    pte_bytes: int
    delegated: str  # "15/15"
    relative_error: float  # the verifier's, against the converted model
    next_token_agreement: float
    window: tuple  # the (batch, tokens) window each forward reads
    float_tokens_per_s: float  # next tokens per second: float model, eager torch
    pte_tokens_per_s: float  # the same, the .pte in executorch.runtime


def _rate(forward, window: tuple, seconds: float = 2.0) -> float:
    """Next tokens per second when every forward reads the whole window (no KV cache): one
    new token per sequence per call, timed for about `seconds` after a warm-up call."""
    forward()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        forward()
        calls += 1
    return calls * window[0] / (time.perf_counter() - started)


def export_and_time(
    scheme: str, converted: torch.nn.Module, float_model: torch.nn.Module, example: torch.Tensor, out_dir: Path,
    file_name: str = "qat.pte",
) -> Optional[DeployResult]:
    """None (with the reason logged) when the executorch extra is not installed."""
    try:
        import qatfx.export
        from qatfx.export.verify import load_method
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        log.warning("qatfx demo: skipping the ExecuTorch step (%s); pip install -e \".[executorch]\"", exc)
        return None
    # The float model is timed first: once an XNNPACK program has run in this process (the
    # export's verification does), its worker threads compete with torch's for the 2 cores
    # and eager torch measured up to 10x slower, which would overstate the ratio.
    float_model = float_model.eval()
    with torch.no_grad():
        float_rate = _rate(lambda: float_model(example), tuple(example.shape))
    try:
        report = qatfx.export.executorch(converted, out_dir / file_name)
    except qatfx.export.ExportError as exc:
        log.warning("qatfx demo: skipping the ExecuTorch step: %s", exc)
        return None
    method = load_method(report.path)
    pte_rate = _rate(lambda: method.execute([example]), tuple(example.shape))
    return DeployResult(
        scheme=scheme, pte_bytes=report.bytes, delegated=f"{report.delegated}/{report.quantized_layers}",
        relative_error=report.verification.relative_error, next_token_agreement=report.verification.next_token_agreement,
        window=tuple(example.shape), float_tokens_per_s=float_rate, pte_tokens_per_s=pte_rate,
    )


FILE_FORMATS = ("gguf", "hf")


def export_files(formats, converted: torch.nn.Module, config, vocabulary, out_dir: Path) -> dict:
    """{format: the export report's lines} for each requested file format; a format whose
    extra is missing, or that cannot write this model, gets the reason instead."""
    import qatfx.export

    lines = {}
    for fmt in formats:
        try:
            if fmt == "gguf":
                # The demo trains float32 scales, which Q4_0 stores in fp16: written rounded, with
                # the count of weights that moved (LlamaCppQuantizer trains an exact file).
                report = qatfx.export.gguf(converted, out_dir / "qat.gguf", config=config, vocabulary=vocabulary, allow_rounding=True)
                lines[fmt] = report.lines()
            elif fmt == "hf":
                # W4A16: the weights exactly; the 8da4w activation quantization is dropped (reported)
                lines[fmt] = qatfx.export.hf(converted, out_dir / "qat_hf", config=config).lines()
        except qatfx.export.ExportError as exc:
            log.warning("qatfx demo: skipping the %s export: %s", fmt, exc)
            lines[fmt] = [f"skipped: {exc}"]
    return lines
