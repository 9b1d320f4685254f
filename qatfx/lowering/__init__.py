"""Inductor lowering for converted qatfx models.

    compiled = torch.compile(qatfx.convert_pt2e(prepared), backend="qatfx")

fuses each per-token int8 quantize/dequantize + packed-int4 weight + linear into one
`qatfx::w4a8_linear` (a Triton int8 x int4 kernel on GPU) with its bias, activation,
residual and cast, and turns the activation quantization into aten math Inductor fuses
with the op before it. `inductor_options()` adds the same pass to your own Inductor options.
"""

from qatfx.lowering import w4a8_linear as _w4a8_linear  # noqa: F401  registers qatfx::w4a8_linear
from qatfx.lowering.backend import inductor_options, qatfx_backend
from qatfx.lowering.graph_pass import LoweringConfig, QATFXGraphPass

__all__ = ["LoweringConfig", "QATFXGraphPass", "inductor_options", "qatfx_backend"]
