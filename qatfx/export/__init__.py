"""Exports of converted models to serving runtimes: `qatfx.export.executorch` (an XNNPACK
`.pte`). Each imports its runtime only when called."""

from qatfx.export.executorch import ExecuTorchExport, ExportError, executorch

__all__ = ["ExecuTorchExport", "ExportError", "executorch"]
