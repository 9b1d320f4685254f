"""Pattern-matcher rules written as pairs of plain functions, and their registration.

A `Rewrite` holds a `pattern` function and a `replacement` function over the same tensor
arguments. The pattern is traced with Inductor's `fwd_only` (so it is written in the same
normalized aten form as the post-grad graph) and turned into a pattern in which int, float,
dtype and list literals match anything; the literals a replacement needs (a group size, a
dtype) are read back from the matched nodes by `constants`. Strings and None stay literal,
so `activation="none"` in a pattern only matches a fused linear with no activation yet.

Every rewrite that fires bumps `torch._dynamo.utils.counters["qatfx"][name]`; every match
refused by `check` bumps `counters["qatfx"]["skipped:" + name]` and logs the reason.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch._dynamo.utils import counters
from torch._inductor.pattern_matcher import (
    Match,
    PatternMatcherPass,
    fwd_only,
    gen_pattern,
    register_graph_pattern,
)

from qatfx.instrument.provenance import plumbing_module, rewrite_scope

log = logging.getLogger("qatfx.lowering")

COUNTER = "qatfx"

plumbing_module(__name__)  # dumps name the rule's replacement as a node's source, not this driver


def _no_constants(match: Match) -> dict[str, Any]:
    return {}


def _always(match: Match) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Rewrite:
    """One rule. `check` returns None to accept a match, or the reason it is refused."""

    name: str
    pattern: Callable[..., Any]
    replacement: Callable[..., Any]
    example_inputs: Callable[[], Sequence[Any]]
    constants: Callable[[Match], dict[str, Any]] = field(default=_no_constants)
    check: Callable[[Match], Optional[str]] = field(default=_always)

    @property
    def argnames(self) -> list[str]:
        return list(inspect.signature(self.pattern).parameters)


def _trace_normalized(fn: Callable[..., Any], args: Sequence[Any], **kwargs: Any) -> torch.fx.GraphModule:
    """fwd_only, then the post-grad view -> reshape normalization the real graph has had."""
    from torch._inductor.fx_passes.post_grad import view_to_reshape

    gm = fwd_only(fn, args, **kwargs)
    view_to_reshape(gm)
    gm.recompile()
    return gm


def _accept(rewrite: Rewrite, match: Match) -> bool:
    reason = rewrite.check(match)
    if reason is None:
        return True
    counters[COUNTER][f"skipped:{rewrite.name}"] += 1
    log.info("qatfx lowering: %s not applied at %s: %s", rewrite.name, match.output_node().name, reason)
    return False


def _apply(rewrite: Rewrite, match: Match, *args: Any, **kwargs: Any) -> None:
    replacement = functools.partial(rewrite.replacement, **rewrite.constants(match))
    with rewrite_scope(rewrite.name, rewrite.replacement):  # dumps name the rule behind each new node
        match.replace_by_example(replacement, [match.kwargs[name] for name in rewrite.argnames])
    counters[COUNTER][rewrite.name] += 1


def build_pass(name: str, rewrites: Sequence[Rewrite]) -> PatternMatcherPass:
    """A PatternMatcherPass holding `rewrites` (traced now: call this lazily, once)."""
    patterns = PatternMatcherPass(pass_name=name)
    for rewrite in rewrites:
        pattern = gen_pattern(rewrite.pattern, list(rewrite.example_inputs()), _trace_normalized)
        register_graph_pattern(
            pattern, extra_check=functools.partial(_accept, rewrite), pass_dict=patterns
        )(functools.partial(_apply, rewrite))
    return patterns


def apply_until_fixed_point(patterns: PatternMatcherPass, graph: torch.fx.Graph, limit: int = 8) -> int:
    """Apply until nothing matches (an epilogue can enable another); returns the count."""
    total = 0
    for _ in range(limit):
        count = patterns.apply(graph)
        total += count
        if not count:
            break
    return total
