"""Debugging tools.

- `dump(dir)` / `dump_dir=` / QATFX_DUMP_DIR: every qatfx pass's graph before and after,
  as text and as HTML pages with an index (written by qatfx/instrument/, the layer below
  the passes); see docs/debugging.md.
- `compare(float_model, quantized, inputs)`: per-layer SQNR of a quantized model against
  the float one (compare.py).
- TORCH_TRACE artifacts and TORCH_LOGS=+qatfx (qatfx/instrument/trace.py).
"""

from qatfx.debug.compare import compare
from qatfx.instrument.dumping import current_dump_dir, dump, register_report

__all__ = ["compare", "current_dump_dir", "dump", "register_report"]
