import copy

import torch
import torch.nn as nn

import qatfx


class ConvNetHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.bn = nn.BatchNorm1d(32, eps=1e-3, momentum=0.3)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(32, 8)

    def forward(self, x):
        return self.out(self.drop(self.bn(self.fc(x))))


def _batch_norm_args(gm):
    (node,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.batch_norm.default]
    return node.args[5:8]  # training, momentum, eps


def test_batch_norm_mode_switch_keeps_eps_momentum_and_running_stats():
    model = ConvNetHead()
    reference = copy.deepcopy(model)
    prepared = qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(32), (torch.randn(4, 64),))
    assert _batch_norm_args(prepared) == (True, 0.3, 1e-3)
    x = torch.randn(6, 64)
    prepared(x)
    assert int(prepared.bn.num_batches_tracked) == 1
    assert not torch.equal(prepared.bn.running_mean, reference.bn.running_mean)  # updated in train

    prepared.eval()
    assert _batch_norm_args(prepared) == (False, 0.3, 1e-3)
    stats = prepared.bn.running_mean.clone()
    prepared(x)
    assert torch.equal(prepared.bn.running_mean, stats) and int(prepared.bn.num_batches_tracked) == 1

    prepared.train()
    assert _batch_norm_args(prepared) == (True, 0.3, 1e-3)
    prepared(x)
    assert int(prepared.bn.num_batches_tracked) == 2


def test_model_exported_in_eval_can_train():
    prepared = qatfx.prepare_pt2e(ConvNetHead().eval(), qatfx.Int8DynActInt4WeightQuantizer(32), (torch.randn(4, 64),))
    assert _batch_norm_args(prepared)[0] is False
    prepared.train()
    prepared(torch.randn(6, 64))
    assert int(prepared.bn.num_batches_tracked) == 1
