"""The quantizer protocol and its annotations. A quantizer decides, for each linear site of
an exported graph (and each embedding lookup, when given an `embedding_spec`), which specs
apply (or why the layer is skipped) and writes that as a frozen annotation into
`node.meta[ANNOTATION_KEY]`. Prepare and convert read annotations generically.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Union

import torch
import torch.fx

from qatfx.formats import format_for
from qatfx.graph.embedding_sites import EmbeddingSite, embedding_layer_name, find_embedding_sites
from qatfx.graph.linear_sites import LinearSite, find_linear_sites, get_attr_value
from qatfx.graph.meta import ANNOTATION_KEY
from qatfx.graph.regions import layer_path, region_of
from qatfx.spec import PerGroup, QuantSpec

SUPPORTED_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LinearAnnotation:
    """A linear site to quantize (input_spec None: weight-only)."""

    layer: str
    input_spec: Optional[QuantSpec]
    weight_spec: QuantSpec


@dataclass(frozen=True)
class SkipAnnotation:
    """A linear site left in float, with the reason the summary reports."""

    layer: str
    reason: str


@dataclass(frozen=True)
class EmbeddingAnnotation:
    """An embedding table to fake-quantize with `weight_spec` (groups along D)."""

    layer: str
    weight_spec: QuantSpec


Annotation = Union[LinearAnnotation, EmbeddingAnnotation, SkipAnnotation]


class Quantizer:
    """Applies `input_spec` (None: weights only) and `weight_spec` to every linear site.

    skip: layer names (fnmatch patterns, e.g. "lm_head", "*.mlp.down_proj") left in float.
    skip_types: module class names (e.g. "Conv1D") left in float.
    embedding_spec: quantize embedding tables (`aten.embedding` of a parameter) with this
        spec (spec.int4_per_group_embedding / int8_per_row_embedding); None (default) leaves
        them in float. A table tied to a quantized linear's weight must use that linear's
        weight spec (one fake-quant, one stored table); prepare refuses otherwise.
    learnable_scales: train the weights' (and embeddings') scales, and an asymmetric spec's
        zero points, as parameters (LSQ; `QuantSpec.learnable`), initialised by the spec's
        rule; convert stores the trained values. Activations keep their per-token rule.
    """

    def __init__(
        self,
        input_spec: Optional[QuantSpec],
        weight_spec: QuantSpec,
        *,
        skip: Iterable[str] = (),
        skip_types: Iterable[Union[str, type]] = (),
        embedding_spec: Optional[QuantSpec] = None,
        learnable_scales: bool = False,
    ) -> None:
        if input_spec is not None and input_spec.learnable:
            raise ValueError(
                "an activation's qparams are computed per token at run time and cannot be learned; "
                "learnable=True (learnable_scales=True) applies to weight and embedding specs"
            )
        if input_spec is not None and not input_spec.dynamic:
            raise ValueError(
                "static activation quantization (dynamic=False) needs observers, which qatfx "
                "does not have; use a dynamic activation spec"
            )
        if isinstance(weight_spec.granularity, PerGroup) and weight_spec.granularity.group_size % 2:
            raise ValueError(f"weight group size must be even, got {weight_spec.granularity.group_size}")
        if embedding_spec is not None and not isinstance(embedding_spec, QuantSpec):
            raise TypeError(
                f"embedding_spec must be a QuantSpec, got {type(embedding_spec).__name__}; "
                "use qatfx.spec.int4_per_group_embedding(32) or int8_per_row_embedding()"
            )
        if learnable_scales:
            weight_spec = replace(weight_spec, learnable=True)
            embedding_spec = None if embedding_spec is None else replace(embedding_spec, learnable=True)
        self.input_spec = input_spec
        self.weight_spec = weight_spec
        self.embedding_spec = embedding_spec
        self.skip = tuple(skip)
        # compared by class name: nn_module_stack records a dotted path, not the class
        self.skip_types = tuple((t if isinstance(t, str) else t.__qualname__).split(".")[-1] for t in skip_types)

    @property
    def quantizes_embeddings(self) -> bool:
        """Whether some embedding table may be quantized (region capture then captures them)."""
        return self.embedding_spec is not None

    def with_learnable_scales(self) -> "Quantizer":
        """A copy that trains its weight and embedding scales (as `learnable_scales=True`),
        e.g. of a preset: `qatfx.presets.executorch_llama().with_learnable_scales()`."""
        learned = copy.copy(self)
        learned.weight_spec = replace(self.weight_spec, learnable=True)
        if self.embedding_spec is not None:
            learned.embedding_spec = replace(self.embedding_spec, learnable=True)
        return learned

    def warn_unmatched_rules(self, graphs, other_layers=()) -> None:
        """Warn about rules that matched no layer (MixedQuantizer); a single-scheme
        quantizer has none."""

    def describe_choice(self, layer: str) -> str:
        """Why `layer` got its scheme, for error messages ("" for a single-scheme quantizer)."""
        return ""

    def __repr__(self) -> str:
        act = self.input_spec.describe() if self.input_spec else "float"
        emb = f", embeddings={self.embedding_spec.describe()}" if self.embedding_spec else ""
        return f"{type(self).__name__}(activations={act}, weights={self.weight_spec.describe()}{emb}, skip={self.skip})"

    def annotate(self, gm: torch.fx.GraphModule) -> list[Annotation]:
        """Write one annotation per linear site into node.meta; return them in graph order."""
        annotations = []
        for site in find_linear_sites(gm):
            annotation = self.annotate_site(gm, site)
            site.node.meta[ANNOTATION_KEY] = annotation
            annotations.append(annotation)
        if self.quantizes_embeddings:
            for site in find_embedding_sites(gm):
                annotation = self.annotate_embedding(gm, site)
                site.node.meta[ANNOTATION_KEY] = annotation
                annotations.append(annotation)
        return annotations

    def annotate_embedding(self, gm: torch.fx.GraphModule, site: EmbeddingSite) -> Annotation:
        layer = embedding_layer_name(gm, site)
        reason = self.embedding_skip_reason(gm, site, layer)
        if reason is not None:
            return SkipAnnotation(layer, reason)
        _check_tied(gm, site, layer, self.embedding_spec)
        return EmbeddingAnnotation(layer, self.embedding_spec)

    def embedding_skip_reason(self, gm: torch.fx.GraphModule, site: EmbeddingSite, layer: str) -> Optional[str]:
        for pattern in self.skip:
            if fnmatch.fnmatchcase(layer, pattern):
                return f"excluded by the quantizer's skip pattern {pattern!r}"
        if site.module_type is not None and site.module_type.split(".")[-1] in self.skip_types:
            return f"excluded by the quantizer's skip_types ({site.module_type})"
        table = get_attr_value(gm, site.param_name)
        if table.dim() != 2 or table.dtype not in SUPPORTED_WEIGHT_DTYPES:
            return f"embedding table {tuple(table.shape)} {table.dtype} is not a 2-D float32/bfloat16/float16 table"
        return _layout_problem(self.embedding_spec, table.shape[1], "embedding dim")

    def annotate_site(self, gm: torch.fx.GraphModule, site: LinearSite) -> Annotation:
        layer = model_layer_name(gm, site)
        reason = self.skip_reason(gm, site)
        if reason is not None:
            return SkipAnnotation(layer, reason)
        return LinearAnnotation(layer, self.input_spec, self.weight_spec)

    def skip_reason(self, gm: torch.fx.GraphModule, site: LinearSite) -> Optional[str]:
        layer = model_layer_name(gm, site)  # as named in the model, for skip patterns
        for pattern in self.skip:
            if fnmatch.fnmatchcase(layer, pattern):
                return f"excluded by the quantizer's skip pattern {pattern!r}"
        if site.module_type is not None and site.module_type.split(".")[-1] in self.skip_types:
            return f"excluded by the quantizer's skip_types ({site.module_type})"
        if site.param_node is None:
            return "weight is computed in the graph, not a module parameter"
        weight = get_attr_value(gm, site.param_name)
        if weight.dim() != 2:
            return f"weight has {weight.dim()} dims; only 2-D weights are quantized"
        if weight.dtype not in SUPPORTED_WEIGHT_DTYPES:
            return (
                f"weight dtype {weight.dtype} is not supported (float32, bfloat16, float16); "
                "cast the model, e.g. model.to(torch.float32)"
            )
        k = weight.shape[0] if site.param_is_k_by_n else weight.shape[1]
        if self.input_spec is not None:
            # the activation's groups run along the same K as the weight's
            reason = _group_problem(self.input_spec, k, "in_features", "activation ")
            if reason is not None:
                return reason
        return _layout_problem(self.weight_spec, k, "in_features")


def _group_problem(spec: QuantSpec, length: int, what: str, whose: str = "") -> Optional[str]:
    """Why groups of `spec` cannot tile a dim of `length` elements, or None."""
    granularity = spec.granularity
    if isinstance(granularity, PerGroup) and length % granularity.group_size:
        return (
            f"{what} {length} is not divisible by {whose}group size {granularity.group_size}; "
            "left in float (qatfx skips rather than pads); choose a group size dividing it"
        )
    return None


def _layout_problem(spec: QuantSpec, length: int, what: str) -> Optional[str]:
    """Why a weight whose quantized dim has `length` elements cannot take `spec`, or None."""
    return _group_problem(spec, length, what) or format_for(spec).layout_problem(spec, length)


def model_layer_name(gm: torch.fx.GraphModule, site: LinearSite) -> str:
    """The layer's name in the user's model; a region that is itself the linear (lm_head)
    gives its own path."""
    region = region_of(gm)
    if not region:
        return site.layer_name
    return layer_path(region, site.param_name or site.node.name).removesuffix(".weight")


def tied_linear(gm: torch.fx.GraphModule, site: EmbeddingSite) -> Optional[tuple[LinearSite, LinearAnnotation]]:
    """The quantized linear (already annotated) whose weight is this embedding's table, if any."""
    for linear in find_linear_sites(gm):
        annotation = linear.node.meta.get(ANNOTATION_KEY)
        if linear.param_node is site.param_node and isinstance(annotation, LinearAnnotation):
            return linear, annotation
    return None


@dataclass(frozen=True)
class QuantizedTable:
    """A parameter a quantized layer fake-quantizes: the key says which tensor it is across
    graphs (a region capture exports each region separately, sharing the model's tensors)."""

    key: tuple  # (storage pointer, offset, shape)
    layer: str
    op: str  # "linear" or "embedding"
    spec: QuantSpec


def quantized_tables(gm: torch.fx.GraphModule) -> list[QuantizedTable]:
    """The parameters the annotations of `gm` quantize, before insert_fake_quant."""
    found = []
    sites = [(s, "linear") for s in find_linear_sites(gm)] + [(s, "embedding") for s in find_embedding_sites(gm)]
    for site, op in sites:
        annotation = site.node.meta.get(ANNOTATION_KEY)
        if not isinstance(annotation, (LinearAnnotation, EmbeddingAnnotation)) or site.param_name is None:
            continue
        tensor = get_attr_value(gm, site.param_name)
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        found.append(QuantizedTable(key, annotation.layer, op, annotation.weight_spec))
    return found


def check_one_grid_per_table(seen: dict, tables: list[QuantizedTable], describe=lambda layer: "") -> None:
    """A tensor shared by layers of different graphs (a tied embedding and lm_head in two
    regions) must get one spec from all of them: one table, one grid. `seen` maps keys to the
    first table found; `describe(layer)` adds which rule chose the layer's scheme."""
    for table in tables:
        first = seen.setdefault(table.key, table)
        if first.spec != table.spec:
            raise ValueError(
                f"{first.op} {first.layer}{describe(first.layer)} and {table.op} {table.layer}{describe(table.layer)} "
                f"share one weight tensor (tied), but are quantized as {first.spec.describe()} and "
                f"{table.spec.describe()}: one table must have one grid; give both the same spec (an embedding_spec "
                "equal to the linear's weight spec), leave one in float, or untie the weights"
            )


def _check_tied(gm: torch.fx.GraphModule, site: EmbeddingSite, layer: str, spec: QuantSpec) -> None:
    """A table that is also a quantized linear's weight gets one fake-quant, so both must
    quantize it the same way (same spec, groups along the same dim)."""
    found = tied_linear(gm, site)
    if found is not None:
        linear, annotation = found
        if linear.param_is_k_by_n:
            raise ValueError(
                f"embedding {layer} is tied to {annotation.layer}, which reads the table transposed (groups would "
                f"run along V there, along D here); skip one of them (skip=[{annotation.layer!r}]) or untie the weights"
            )
        if annotation.weight_spec != spec:
            raise ValueError(
                f"embedding {layer} is tied to linear {annotation.layer}: one table must have one grid, but the "
                f"embedding spec is {spec} and the linear's weight spec is {annotation.weight_spec}; pass the "
                "linear's spec as embedding_spec (e.g. int4_per_group_embedding(group_size, scale_dtype) with "
                "the linear's group size and scales_precision), skip one of them, or untie the weights"
            )
