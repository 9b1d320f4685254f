"""Fake-quant toggle pass.

Matches:     every qatfx.fake_quantize node.
Rewrites to: the same node with `enabled=<flag>`; a disabled fake-quant is an exact
             identity, so the module computes the float model bit for bit.
Requires:    insert_fake_quant ran.
Ensures:     only the `enabled` kwarg changes; specs and provenance are kept.
"""

from __future__ import annotations

import torch.fx

from qatfx.passes.infra import PassResult, requires
from qatfx.passes.insert_fake_quant import fake_quant_nodes


def set_fake_quant_enabled(enabled: bool):
    @requires("insert_fake_quant")
    def toggle(gm: torch.fx.GraphModule) -> PassResult:
        modified = False
        for node in fake_quant_nodes(gm):
            if node.kwargs.get("enabled", True) != enabled:
                node.update_kwarg("enabled", enabled)
                modified = True
        return PassResult(gm, modified)

    return toggle
