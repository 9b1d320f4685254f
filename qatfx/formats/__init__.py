"""Stored weight formats, one module each, and the registry convert, summary,
serialization and the lowering look them up in.

    format_for(spec)   the format convert stores a weight quantized with `spec` in:
                       the first registered format that accepts it
    format_named(name) the format a saved manifest or a graph node names

Adding a format: one module defining a `WeightFormat` subclass (and its dequantize op),
plus one line in FORMATS below; see docs/architecture.md, "How to add a weight format".
"""

from __future__ import annotations

from qatfx.formats.base import WeightFormat
from qatfx.formats.int4_packed import Int4Packed
from qatfx.formats.int4_zp_packed import Int4ZeroPointPacked
from qatfx.formats.int_codes import IntCodes
from qatfx.spec import QuantSpec

# Most specific first: IntCodes accepts every spec.
FORMATS: tuple[WeightFormat, ...] = (Int4Packed(), Int4ZeroPointPacked(), IntCodes())

_BY_NAME = {fmt.name: fmt for fmt in FORMATS}


def format_for(spec: QuantSpec) -> WeightFormat:
    return next(fmt for fmt in FORMATS if fmt.accepts(spec))


def format_named(name: str) -> WeightFormat:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown qatfx weight format {name!r}; this qatfx knows {sorted(_BY_NAME)}") from None


__all__ = ["FORMATS", "WeightFormat", "format_for", "format_named"]
