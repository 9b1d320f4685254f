"""Train/eval pass: switch the mode-dependent ops of an exported graph.

Matches:     aten.dropout / feature_dropout / alpha_dropout (`train` arg), aten.batch_norm
             (`training` arg), and the `add_(num_batches_tracked, 1)` batch norm emits in
             training.
Rewrites to: the same ops with the flag set to the requested mode; the counter increment is
             removed in eval and restored in train.
Requires:    a graph from torch.export's training IR (torch >= 2.11).
Ensures:     dropout p and batch-norm eps / momentum are kept exactly (torchao's
             move_exported_model_to_train/eval resets them: torchao issues 2980, 4107).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx

from qatfx.passes.infra import PassResult

aten = torch.ops.aten

# op -> index of its training flag
_MODE_FLAG_INDEX = {
    aten.dropout.default: 2,
    aten.feature_dropout.default: 2,
    aten.alpha_dropout.default: 2,
    aten.feature_alpha_dropout.default: 2,
    aten.batch_norm.default: 5,
}


def _mode_nodes(graph: torch.fx.Graph):
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _MODE_FLAG_INDEX:
            yield node, _MODE_FLAG_INDEX[node.target]


def graph_training_mode(graph: torch.fx.Graph) -> Optional[bool]:
    """The mode the graph's dropout / batch-norm ops run in; None if it has none."""
    for node, index in _mode_nodes(graph):
        return bool(node.args[index])
    return None


def _counter_increments(graph: torch.fx.Graph, counter: torch.fx.Node) -> list[torch.fx.Node]:
    return [u for u in counter.users if u.target is aten.add_.Tensor]


def _batch_norm_counters(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """get_attr nodes of `num_batches_tracked` buffers belonging to batch-norm modules."""
    getattrs = {n.target: n for n in graph.nodes if n.op == "get_attr"}
    counters = []
    for node in graph.nodes:
        if node.target is aten.batch_norm.default and isinstance(node.args[3], torch.fx.Node):
            prefix = node.args[3].target.removesuffix("running_mean")
            counter = getattrs.get(prefix + "num_batches_tracked")
            if counter is not None:
                counters.append(counter)
    return counters


def set_training_mode(training: bool):
    def switch(gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        modified = False
        for node, index in _mode_nodes(graph):
            if bool(node.args[index]) != training:
                node.update_arg(index, training)
                modified = True
        for counter in _batch_norm_counters(graph):
            increments = _counter_increments(graph, counter)
            if training and not increments:
                with graph.inserting_after(counter):
                    graph.call_function(aten.add_.Tensor, (counter, 1))
                modified = True
            elif not training:
                for inc in increments:
                    graph.erase_node(inc)
                    modified = True
        return PassResult(gm, modified)

    return switch
