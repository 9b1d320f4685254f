"""A pass that leaves an invalid graph, for the tests of what run_pass does on failure."""

import torch

from qatfx.passes.infra import PassResult


def breaks_graph(gm: torch.fx.GraphModule) -> PassResult:
    first, *_, last = gm.graph.nodes
    with gm.graph.inserting_before(first):
        gm.graph.call_function(torch.relu, (last.args[0],))  # used before it is defined
    return PassResult(gm, True)
