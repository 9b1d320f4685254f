"""Train/eval pass: switch the mode-dependent ops of an exported graph.

Matches:     aten.dropout / feature_dropout / alpha_dropout (`train` arg), aten.batch_norm
             (`training` arg), the `add_(num_batches_tracked, 1)` batch norm emits in
             training, and aten.scaled_dot_product_attention's `dropout_p`.
Rewrites to: the same ops with the flag set to the requested mode; the counter increment is
             removed in eval and restored in train; attention dropout_p is set to 0 in eval
             and its exported value (kept in node.meta) restored in train. A model exported
             in eval mode has dropout_p == 0 in its graph, so .train() cannot bring back
             attention dropout it never saw (export in train mode to train with it).
Requires:    a graph from torch.export's training IR (torch >= 2.11).
Ensures:     dropout p and batch-norm eps / momentum are kept exactly (torchao's
             move_exported_model_to_train/eval resets them: torchao issues 2980, 4107).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx

from qatfx.graph.meta import TRAIN_DROPOUT_META_KEY
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


# scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, ...)
_SDPA = aten.scaled_dot_product_attention.default
_SDPA_DROPOUT_INDEX = 4


def _mode_nodes(graph: torch.fx.Graph):
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _MODE_FLAG_INDEX:
            yield node, _MODE_FLAG_INDEX[node.target]


def _attention_dropout_nodes(graph: torch.fx.Graph):
    """(node, exported train-mode dropout_p) for every attention op that has dropout."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _SDPA:
            train_p = node.meta.get(TRAIN_DROPOUT_META_KEY, _sdpa_dropout_p(node))
            if train_p:
                yield node, train_p


def _sdpa_dropout_p(node: torch.fx.Node) -> float:
    if len(node.args) > _SDPA_DROPOUT_INDEX:
        return node.args[_SDPA_DROPOUT_INDEX]
    return node.kwargs.get("dropout_p", 0.0)


def _set_sdpa_dropout_p(node: torch.fx.Node, p: float) -> None:
    if len(node.args) > _SDPA_DROPOUT_INDEX:
        node.update_arg(_SDPA_DROPOUT_INDEX, p)
    else:
        node.update_kwarg("dropout_p", p)


def graph_training_mode(graph: torch.fx.Graph) -> Optional[bool]:
    """The mode the graph's dropout / batch-norm / attention-dropout ops run in; None if it
    has none."""
    for node, index in _mode_nodes(graph):
        return bool(node.args[index])
    for node, _ in _attention_dropout_nodes(graph):
        return bool(_sdpa_dropout_p(node))
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
        for node, train_p in list(_attention_dropout_nodes(graph)):
            wanted = train_p if training else 0.0
            if _sdpa_dropout_p(node) != wanted:
                node.meta[TRAIN_DROPOUT_META_KEY] = train_p
                _set_sdpa_dropout_p(node, wanted)
                modified = True
        return PassResult(gm, modified)

    return switch
