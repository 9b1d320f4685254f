"""Annotate pass.

Matches:     every linear site (see linear_sites.py); with a quantizer's embedding_spec,
             every embedding lookup of a parameter table (embedding_sites.py).
Rewrites to: nothing in the graph; writes the quantizer's frozen LinearAnnotation,
             EmbeddingAnnotation or SkipAnnotation into node.meta["qatfx_annotation"].
Requires:    a graph from torch.export (node.meta["val"] present).
Ensures:     every linear site (and embedding site, with embedding_spec) carries exactly
             one annotation; a table tied to a quantized linear has that linear's weight
             spec (else a ValueError naming both specs); the graph is unchanged.
"""

from __future__ import annotations

import torch.fx

from qatfx.passes.infra import PassResult
from qatfx.quantizer import Quantizer


def annotate_pass(quantizer: Quantizer):
    def annotate(gm: torch.fx.GraphModule) -> PassResult:
        annotations = quantizer.annotate(gm)
        return PassResult(gm, modified=bool(annotations))

    return annotate
