"""MixedQuantizer: a quantizer per layer, chosen by rules, as every deploy recipe mixes
schemes (ExecuTorch's 8da4w body with an 8da8w output layer, llama.cpp's Q4_0 body with
Q8_0 output and embeddings, vLLM's W4A16 with a float lm_head).

A rule is `(pattern, quantizer_or_None)`. A pattern is an fnmatch pattern on layer names
(as `skip=` reads them), a tuple of such patterns (any one matches), or a module class. The
first matching rule wins; layers no rule matches take `default`. A linear is matched by its
layer name and by its module's path, which differ for a tied output projection (its weight
is the embedding's parameter: "model.embed_tokens" and "lm_head"). Embedding lookups follow
the same rules, quantized with the chosen quantizer's `embedding_spec`.
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence

import torch
import torch.fx

from qatfx.graph.embedding_sites import EmbeddingSite, embedding_layer_name, find_embedding_sites, module_path_of
from qatfx.graph.linear_sites import LinearSite, find_linear_sites
from qatfx.graph.regions import layer_path, region_of
from qatfx.quantizer.base import (
    Annotation,
    EmbeddingAnnotation,
    Quantizer,
    SkipAnnotation,
    model_layer_name,
    tied_linear,
)
from qatfx.spec import scheme_name

_MATCHABLE = "qatfx_mixed_matchable"  # gm.meta key: each site's (names, module type)


class UnmatchedRuleWarning(UserWarning):
    """A MixedQuantizer rule matched no layer of the prepared model (a typo, or another
    model family's names)."""


@dataclass(frozen=True)
class Rule:
    index: Optional[int]  # None: the default
    patterns: tuple  # fnmatch strings, or one module class
    quantizer: Optional[Quantizer]

    def matches(self, names: Iterable[str], module_type: Optional[str]) -> bool:
        if self.index is None:
            return True
        if isinstance(self.patterns[0], type):
            return module_type is not None and _same_class(self.patterns[0], module_type)
        return any(fnmatch.fnmatchcase(name, p) for name in names for p in self.patterns)

    @property
    def scheme(self) -> str:
        q = self.quantizer
        return "float" if q is None else scheme_name(q.input_spec, q.weight_spec)

    def __str__(self) -> str:
        if self.index is None:
            return f"the default ({self.scheme})"
        shown = self.patterns[0].__qualname__ if isinstance(self.patterns[0], type) else " | ".join(map(repr, self.patterns))
        return f"rule {self.index} ({shown} -> {self.scheme})"


def _learnable(rule: Rule) -> Rule:
    return replace(rule, quantizer=None if rule.quantizer is None else rule.quantizer.with_learnable_scales())


def _same_class(cls: type, module_type: str) -> bool:
    """nn_module_stack records "package.module.Class" (or a bare qualname)."""
    return module_type in (f"{cls.__module__}.{cls.__qualname__}", cls.__qualname__)


def _rule(index: int, rule) -> Rule:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
        raise TypeError(f"MixedQuantizer rule {index} is {rule!r}; a rule is (pattern, quantizer or None)")
    pattern, quantizer = rule
    if quantizer is not None and (not isinstance(quantizer, Quantizer) or isinstance(quantizer, MixedQuantizer)):
        raise TypeError(
            f"MixedQuantizer rule {index} ({pattern!r}) gives {type(quantizer).__name__}; give a qatfx Quantizer "
            "(one scheme, e.g. Int8DynActInt8WeightQuantizer()) or None to leave the layers in float"
        )
    if isinstance(pattern, type):
        if not issubclass(pattern, torch.nn.Module):
            raise TypeError(f"MixedQuantizer rule {index}: {pattern.__qualname__} is not an nn.Module class")
        return Rule(index, (pattern,), quantizer)
    patterns = (pattern,) if isinstance(pattern, str) else tuple(pattern) if isinstance(pattern, (tuple, list)) else ()
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(
            f"MixedQuantizer rule {index}: the pattern {pattern!r} is not a layer-name pattern (e.g. \"lm_head\", "
            "\"*.mlp.down_proj\"), a tuple of them, or an nn.Module class"
        )
    return Rule(index, patterns, quantizer)


class MixedQuantizer(Quantizer):
    """A quantizer per layer: `rules` is a list of `(pattern, quantizer_or_None)`, the first
    match wins, None leaves the layer in float, unmatched layers take `default` (a
    Quantizer, or None for float). See the module docstring for what a pattern matches.

        MixedQuantizer(
            [("lm_head", Int8DynActInt8WeightQuantizer()), ("*.mlp.down_proj", None)],
            default=Int8DynActInt4WeightQuantizer(32),
        )

    A table tied to a linear must get one scheme from both rules (one table, one grid);
    prepare refuses otherwise, naming both rules. prepare_pt2e warns (UnmatchedRuleWarning)
    for a rule that matched no layer, naming the closest layer names. Each quantizer's own
    `skip` / `skip_types` and layout checks still apply to the layers it gets.
    learnable_scales: every rule's quantizer (and the default) trains its scales (see
    `Quantizer`).
    """

    def __init__(self, rules: Sequence, *, default: Optional[Quantizer], learnable_scales: bool = False) -> None:
        if isinstance(rules, (str, bytes)) or not isinstance(rules, (list, tuple)):
            raise TypeError(f"MixedQuantizer rules must be a list of (pattern, quantizer) pairs, got {rules!r}")
        self.rules = tuple(_rule(i, r) for i, r in enumerate(rules))
        if default is not None and (not isinstance(default, Quantizer) or isinstance(default, MixedQuantizer)):
            raise TypeError(f"MixedQuantizer default must be a qatfx Quantizer or None, got {type(default).__name__}")
        if learnable_scales:
            self.rules = tuple(_learnable(r) for r in self.rules)
            default = default and default.with_learnable_scales()
        self.default = Rule(None, (), default)
        schemes = [r.quantizer for r in (*self.rules, self.default) if r.quantizer is not None]
        if not schemes:
            raise ValueError("MixedQuantizer quantizes nothing: every rule and the default are None")
        # the protocol's single-scheme attributes name the default, as torchao's set_global does
        first = default or schemes[0]
        super().__init__(first.input_spec, first.weight_spec, embedding_spec=first.embedding_spec)

    def with_learnable_scales(self) -> "MixedQuantizer":
        learned = super().with_learnable_scales()
        learned.rules = tuple(_learnable(r) for r in self.rules)
        learned.default = _learnable(self.default)
        return learned

    @property
    def quantizes_embeddings(self) -> bool:
        return any(r.quantizer is not None and r.quantizer.embedding_spec is not None for r in (*self.rules, self.default))

    def __repr__(self) -> str:
        rules = ", ".join(f"{r}: {r.quantizer!r}" for r in (*self.rules, self.default))
        return f"MixedQuantizer({rules})"

    def rule_for(self, names: Sequence[str], module_type: Optional[str]) -> Rule:
        return next((r for r in self.rules if r.matches(names, module_type)), self.default)

    def annotate(self, gm: torch.fx.GraphModule) -> list[Annotation]:
        # what the rules could match, kept for warn_unmatched_rules: after prepare the
        # weights are fake-quant outputs and the sites no longer name them
        gm.meta[_MATCHABLE] = [(_linear_names(gm, s), s.module_type) for s in find_linear_sites(gm)] + [
            ([embedding_layer_name(gm, s)], s.module_type) for s in find_embedding_sites(gm)
        ]
        return super().annotate(gm)

    def annotate_site(self, gm: torch.fx.GraphModule, site: LinearSite) -> Annotation:
        rule = self.rule_for(_linear_names(gm, site), site.module_type)
        if rule.quantizer is None:
            return SkipAnnotation(model_layer_name(gm, site), f"left in float by MixedQuantizer {rule}")
        return rule.quantizer.annotate_site(gm, site)

    def annotate_embedding(self, gm: torch.fx.GraphModule, site: EmbeddingSite) -> Annotation:
        layer = embedding_layer_name(gm, site)
        rule = self.rule_for([layer], site.module_type)
        quantizer = rule.quantizer
        if quantizer is None:
            return SkipAnnotation(layer, f"left in float by MixedQuantizer {rule}")
        if quantizer.embedding_spec is None:
            return SkipAnnotation(layer, f"MixedQuantizer {rule}: its quantizer has no embedding_spec")
        reason = quantizer.embedding_skip_reason(gm, site, layer)
        if reason is not None:
            return SkipAnnotation(layer, reason)
        found = tied_linear(gm, site)
        if found is not None:
            linear, annotation = found
            linear_rule = self.rule_for(_linear_names(gm, linear), linear.module_type)
            if linear.param_is_k_by_n or annotation.weight_spec != quantizer.embedding_spec:
                raise ValueError(
                    f"embedding {layer} is tied to linear {annotation.layer} (one table, one grid), but MixedQuantizer "
                    f"{rule} quantizes the embedding as {quantizer.embedding_spec.describe()} and {linear_rule} quantizes "
                    f"the linear's weight as {annotation.weight_spec.describe()}"
                    + (" (read transposed, groups along V)" if linear.param_is_k_by_n else "")
                    + "; give both the same scheme (the linear's quantizer with embedding_spec equal to its weight "
                    "spec, e.g. Int8DynActInt8WeightQuantizer(embedding_spec=int8_per_row_embedding())), leave both "
                    "in float, or untie the weights"
                )
        return EmbeddingAnnotation(layer, quantizer.embedding_spec)

    def describe_choice(self, layer: str) -> str:
        """Which rule gives `layer` its scheme, for error messages (by name: module-class rules
        are not seen here)."""
        return f" (MixedQuantizer {self.rule_for([layer], None)})"

    def warn_unmatched_rules(self, graphs: Sequence[torch.fx.GraphModule], other_layers: Sequence[str] = ()) -> None:
        """Warn for each rule that matched no layer (linear or embedding) of `graphs`;
        `other_layers` names layers prepare saw outside them (outside every region)."""
        layers: list[tuple[list[str], Optional[str]]] = [([name], None) for name in other_layers]
        for gm in graphs:
            layers += gm.meta.get(_MATCHABLE, [])
        names = sorted({name for layer_names, _ in layers for name in layer_names})
        for rule in self.rules:
            if any(rule.matches(layer_names, module_type) for layer_names, module_type in layers):
                continue
            if isinstance(rule.patterns[0], type):
                types = sorted({t for _, t in layers if t})
                closest = difflib.get_close_matches(rule.patterns[0].__qualname__, [t.split(".")[-1] for t in types], n=3, cutoff=0.3)
            else:
                closest = difflib.get_close_matches(rule.patterns[0], names, n=3, cutoff=0.3)
            warnings.warn(
                f"MixedQuantizer {rule} matched no layer of the model; closest: {', '.join(closest) or 'none'}"
                f" (layers are named as in the model, e.g. {names[0] if names else '?'})",
                UnmatchedRuleWarning,
                stacklevel=3,
            )


def _linear_names(gm: torch.fx.GraphModule, site: LinearSite) -> list[str]:
    """The layer name (from its weight) and the module path of a linear, when they differ."""
    names = [model_layer_name(gm, site)]
    path = module_path_of(site.node)
    if path:
        region = region_of(gm)
        path = layer_path(region, path) if region else path
        if path not in names:
            names.append(path)
    return names
