"""Model-level summary: which linears (and embedding tables, with a quantizer's
embedding_spec) are quantized, which were skipped and why, and the weight bytes before and
after conversion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx

from qatfx.formats import WeightFormat, format_for
from qatfx.graph.embedding_sites import find_embedding_sites
from qatfx.graph.linear_sites import find_linear_sites, get_attr_value
from qatfx.graph.meta import ANNOTATION_KEY
from qatfx.graph.regions import graph_regions
from qatfx.quantizer import EmbeddingAnnotation, LinearAnnotation
from qatfx.spec import QuantSpec, scheme_name


@dataclass(frozen=True)
class LayerReport:
    layer: str
    op: str
    shape: tuple  # (out_features N, in_features K); an embedding's (V, D)
    weight_dtype: torch.dtype
    input_spec: Optional[QuantSpec]
    weight_spec: Optional[QuantSpec]
    skip_reason: Optional[str]
    # An embedding whose table is a quantized linear's weight: that linear's layer. The
    # table is stored once and counted there, so this report counts 0 bytes.
    tied_to: Optional[str] = None

    @property
    def quantized(self) -> bool:
        return self.skip_reason is None

    @property
    def scheme(self) -> str:
        """The layer's scheme by torchao's short names (8da4w, 8da8w, 4w, ...), or "float"."""
        return scheme_name(self.input_spec, self.weight_spec) if self.quantized else "float"

    @property
    def float_bytes(self) -> int:
        if self.tied_to is not None:
            return 0
        n, k = self.shape
        return n * k * self.weight_dtype.itemsize

    @property
    def weight_format(self) -> Optional[WeightFormat]:
        """How convert stores the weight (qatfx/formats/); None for a float layer."""
        return format_for(self.weight_spec) if self.quantized else None

    @property
    def quantized_bytes(self) -> int:
        """Bytes of the converted weight: every part its format stores."""
        if not self.quantized or self.tied_to is not None:
            return self.float_bytes
        return self.weight_format.nbytes(self.weight_spec, self.shape, self.weight_dtype)


@dataclass(frozen=True)
class QuantizationSummary:
    layers: tuple

    @property
    def quantized(self) -> list:
        return [r for r in self.layers if r.quantized]

    @property
    def skipped(self) -> list:
        return [r for r in self.layers if not r.quantized]

    @property
    def float_bytes(self) -> int:
        return sum(r.float_bytes for r in self.layers)

    @property
    def quantized_bytes(self) -> int:
        return sum(r.quantized_bytes for r in self.layers)

    def __str__(self) -> str:
        rows = [("layer", "op", "N x K", "scheme", "activations", "weights", "bytes float", "bytes quantized", "note")]
        for r in self.layers:
            rows.append((
                r.layer, r.op, f"{r.shape[0]}x{r.shape[1]}", r.scheme,
                r.input_spec.describe() if r.quantized and r.input_spec else "float",
                r.weight_spec.describe() if r.quantized else "float",
                str(r.float_bytes), str(r.quantized_bytes),
                r.skip_reason or (f"table tied to {r.tied_to} (stored once, counted there)" if r.tied_to else ""),
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        ratio = self.float_bytes / max(self.quantized_bytes, 1)
        kind = "linear and embedding" if any(r.op == "embedding" for r in self.layers) else "linear"
        lines.append(
            f"{len(self.quantized)} quantized, {len(self.skipped)} skipped; {kind} weight bytes "
            f"{self.float_bytes} -> {self.quantized_bytes} ({ratio:.2f}x smaller)"
        )
        return "\n".join(lines)


def layer_reports(gm: torch.fx.GraphModule) -> list[LayerReport]:
    """One report per annotated linear site of `gm`, in graph order."""
    reports = []
    for site in find_linear_sites(gm):
        annotation = site.node.meta.get(ANNOTATION_KEY)
        if annotation is None:
            continue
        weight = get_attr_value(gm, site.param_name) if site.param_node is not None else site.weight_operand.meta["val"]
        shape = tuple(weight.shape)[::-1] if site.param_is_k_by_n else tuple(weight.shape)
        quantized = isinstance(annotation, LinearAnnotation)
        reports.append(
            LayerReport(
                layer=annotation.layer,
                op=str(site.node.target).replace("aten.", "").removesuffix(".default"),
                shape=shape,
                weight_dtype=weight.dtype,
                input_spec=annotation.input_spec if quantized else None,
                weight_spec=annotation.weight_spec if quantized else None,
                skip_reason=None if quantized else annotation.reason,
            )
        )
    return reports + _embedding_reports(gm, reports)


def _embedding_reports(gm: torch.fx.GraphModule, linear_reports: list) -> list[LayerReport]:
    """One report per annotated embedding site (annotated only with an embedding_spec)."""
    quantized_tables = {
        site.param_node: site.node.meta[ANNOTATION_KEY].layer
        for site in find_linear_sites(gm)
        if isinstance(site.node.meta.get(ANNOTATION_KEY), LinearAnnotation)
    }
    reports = []
    for site in find_embedding_sites(gm):
        annotation = site.node.meta.get(ANNOTATION_KEY)
        if annotation is None:
            continue
        table = get_attr_value(gm, site.param_name)
        quantized = isinstance(annotation, EmbeddingAnnotation)
        reports.append(
            LayerReport(
                layer=annotation.layer, op="embedding", shape=tuple(table.shape), weight_dtype=table.dtype,
                input_spec=None, weight_spec=annotation.weight_spec if quantized else None,
                skip_reason=None if quantized else annotation.reason,
                tied_to=quantized_tables.get(site.param_node) if quantized else None,
            )
        )
    return reports


def outside_report(linear, model_class: str) -> LayerReport:
    """The report of a linear computed outside every region (region_capture.OutsideLinear)."""
    return LayerReport(
        layer=linear.weight.removesuffix(".weight"), op=linear.op, shape=linear.shape, weight_dtype=linear.dtype,
        input_spec=None, weight_spec=None,
        skip_reason=(
            f"computed by {model_class}.forward outside every captured region (e.g. a tied output projection); "
            "capture the whole model (regions=None) or name a module that computes it in regions= to quantize it"
        ),
    )


def summary(module) -> QuantizationSummary:
    """The summary of a module returned by prepare_pt2e or convert_pt2e (whole-model or
    region capture: the layers of every region, in module order)."""
    regions = graph_regions(module)
    if regions and regions[0][0]:  # a region capture: the regions' layers and those outside them
        layers = [*getattr(module, "qatfx_outside_layers", []), *(r for _, gm in regions for r in gm.qatfx_layers)]
    else:
        layers = getattr(module, "qatfx_layers", None)
    if layers is None:
        raise TypeError(
            f"{type(module).__name__} was not produced by qatfx.prepare_pt2e / convert_pt2e; "
            "call prepare_pt2e(model, quantizer, example_inputs) first"
        )
    return QuantizationSummary(tuple(layers))
