"""Quantizers: policy only (which layer gets which specs, or why it stays float).

    base.py     the Quantizer protocol, its annotations, the per-site checks
    schemes.py  one scheme each: 8da4w, 8da8w, weight-only int8 / int4, llama.cpp's Q4_0
    mixed.py    MixedQuantizer: a quantizer per layer, chosen by rules
"""

from qatfx.quantizer.base import (
    Annotation,
    EmbeddingAnnotation,
    LinearAnnotation,
    Quantizer,
    SkipAnnotation,
    model_layer_name,
)
from qatfx.quantizer.mixed import MixedQuantizer, UnmatchedRuleWarning
from qatfx.quantizer.schemes import (
    Int4WeightOnlyQuantizer,
    Int8DynActInt4WeightQuantizer,
    Int8DynActInt8WeightQuantizer,
    Int8WeightOnlyQuantizer,
    LlamaCppQuantizer,
)

__all__ = [
    "Annotation",
    "EmbeddingAnnotation",
    "Int4WeightOnlyQuantizer",
    "Int8DynActInt4WeightQuantizer",
    "Int8DynActInt8WeightQuantizer",
    "Int8WeightOnlyQuantizer",
    "LinearAnnotation",
    "LlamaCppQuantizer",
    "MixedQuantizer",
    "Quantizer",
    "SkipAnnotation",
    "UnmatchedRuleWarning",
    "model_layer_name",
]
