"""Eager fake quantization that costs what it must: in-place values, and autograd that keeps
only what the straight-through gradient needs.

`qatfx::fake_quantize` runs `fake_quantize` below in eager mode (the HF Trainer's, a plain
training loop's) and the reference math (`qatfx.reference`) wherever it is traced
(torch.compile, torch.export), so Inductor still sees and fuses plain aten ops there.
Values and gradients are the reference's bit for bit: the same aten ops in the same dtypes,
run in place (`values.py`).

- An activation (any operand that is not 2-D) gives back fq(x) and keeps a bool mask of
  its in-range codes for backward (`autograd.ActivationFakeQuant`).
- A weight (a 2-D operand: a parameter, an embedding table, LoRA's W + sBA) gives back a
  `FakeQuantizedWeight` that holds W and its qparams and recomputes fq(W) inside each
  matmul that reads it (`lazy_weight.py`): what autograd saves for backward is W, which
  the model holds anyway, never a copy of fq(W).
"""

from qatfx.lean.dispatch import applies, fake_quantize

__all__ = ["applies", "fake_quantize"]
