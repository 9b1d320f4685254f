"""How the pass is installed: the `qatfx` Dynamo backend (entry point), `inductor_options`
chaining with a pass already there, and the FX graph cache key."""

from importlib.metadata import entry_points

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import fresh_cache

import qatfx
from qatfx.lowering import LoweringConfig, QATFXGraphPass, inductor_options
from qatfx.lowering.backend import ChainedGraphPass, qatfx_backend


class RecordingPass(CustomGraphPass):
    """Someone else's post-grad pass: records that it ran, before or after qatfx's."""

    def __init__(self, log):
        self.log = log

    def __call__(self, graph):
        fused = any(n.target is torch.ops.qatfx.w4a8_linear.default for n in graph.nodes)
        self.log.append("after qatfx" if fused else "before qatfx")

    def uuid(self):
        return "recording-pass"


def small_converted():
    model = nn.Sequential(nn.Linear(64, 64), nn.SiLU()).eval()
    x = torch.randn(4, 64)
    prepared = qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(32), (x,))
    return qatfx.convert_pt2e(prepared).eval(), x


def _as_list(slot):
    """torch >= 2.13 takes a list of passes; 2.11/2.12 one pass, so qatfx chains them."""
    return slot.passes if isinstance(slot, ChainedGraphPass) else slot


def test_backend_is_registered_as_an_entry_point():
    (entry,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "qatfx"]
    assert entry.load() is qatfx_backend
    assert torch._dynamo.lookup_backend("qatfx") is qatfx_backend


def test_inductor_options_keeps_the_callers_options_and_pass():
    log = []
    theirs = RecordingPass(log)
    options = {"max_autotune": False, "post_grad_custom_pre_pass": theirs}
    merged = inductor_options(options)
    assert options == {"max_autotune": False, "post_grad_custom_pre_pass": theirs}  # not mutated
    passes = _as_list(merged["post_grad_custom_pre_pass"])
    assert passes[0] is theirs and isinstance(passes[1], QATFXGraphPass)
    assert merged["max_autotune"] is False
    # Asking twice does not stack a second qatfx pass.
    assert len(_as_list(inductor_options(merged)["post_grad_custom_pre_pass"])) == 2

    module, x = small_converted()
    counters.clear()
    with torch.no_grad(), fresh_cache():
        torch.compile(module, options=merged)(x)
    assert log == ["before qatfx"] and counters["qatfx"]["w4a8_linear_2d_bias"] == 1
    assert torch._inductor.config.post_grad_custom_pre_pass is None  # global config untouched


def test_chained_pass_for_single_slot_torch_versions():
    log = []
    chained = ChainedGraphPass([RecordingPass(log), QATFXGraphPass()])
    graph = torch.fx.Graph()
    graph.output(None)
    chained(graph)
    assert log == ["before qatfx"]
    assert chained.uuid() == ("recording-pass", QATFXGraphPass().uuid())
    assert ChainedGraphPass([lambda g: None, QATFXGraphPass()]).uuid() is None  # no uuid: no caching


def test_uuid_hashes_sources_and_config():
    assert QATFXGraphPass().uuid() == QATFXGraphPass(LoweringConfig()).uuid()
    assert QATFXGraphPass().uuid() != QATFXGraphPass(LoweringConfig(fuse_epilogue=False)).uuid()


def _cache_hits():
    return counters["inductor"]["fxgraph_cache_hit"]


def test_fx_graph_cache_hits_on_recompile_and_misses_when_the_config_changes():
    module, x = small_converted()
    with torch.no_grad(), fresh_cache():
        counters.clear()
        torch.compile(module, backend="qatfx")(x)
        assert _cache_hits() == 0 and counters["qatfx"]["epilogue_silu"] == 1

        torch._dynamo.reset()
        counters.clear()
        torch.compile(module, backend="qatfx")(x)
        assert _cache_hits() == 1 and not counters["qatfx"]  # served from the cache: the pass did not run

        torch._dynamo.reset()
        counters.clear()
        torch.compile(module, backend="qatfx", options={"qatfx": LoweringConfig(fuse_epilogue=False)})(x)
        assert _cache_hits() == 0 and counters["qatfx"]["w4a8_linear_2d_bias"] == 1
        assert counters["qatfx"]["epilogue_silu"] == 0


def test_backend_rejects_unknown_arguments():
    with pytest.raises(TypeError, match="pass Inductor settings in options="):
        qatfx_backend(torch.fx.symbolic_trace(nn.Identity()), [torch.randn(2)], dynamic=True)
