"""qatfx.debug.compare on a region capture (prepare_pt2e(..., regions=...)): each region graph
is compared on the float model's input of its region; rows carry the layers' full names."""

import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import qatfx
from qatfx.debug.compare import compare
from qatfx.graph.regions import graph_regions
from tests.model_zoo import _hf
from tests.models import TinyLM, tokens

Q = qatfx.Int8DynActInt4WeightQuantizer
BATCHES = [tokens(seed=1), tokens(3, 12, seed=2)]
BLOCK = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _local(errors):
    return (errors.local, errors.weights_only, errors.activations_only)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = TinyLM().eval()
    regional = qatfx.prepare_pt2e(model, Q(32), (tokens(),), regions="auto")
    whole = qatfx.prepare_pt2e(model, Q(32), (tokens(),))
    return model, regional, compare(model, regional, BATCHES), compare(model, whole, BATCHES)


def test_every_layer_of_the_summary_has_a_row(toy):
    _, regional, report, _ = toy
    assert [p for p, _ in graph_regions(regional)] == ["blocks.0", "blocks.1", "lm_head"]
    layers = [r.layer for r in qatfx.summary(regional).layers]
    assert sorted(r.layer for r in report.rows) == sorted(layers)
    for layer in layers:
        row = report.row(layer)
        # the module path is prefixed with the region's: a module of the float model
        assert row.module == layer and row.fake_quant is not None and row.converted is not None
        assert row.converted_vs_fake_quant.max_abs_error == 0.0, layer
    assert report.regional and report.has_fake_quant and report.has_converted


def test_local_rows_equal_the_whole_capture(toy):
    """Local replays fake-quantize the float model's own input of the layer (the same float
    run in both captures, so the same tensor) and apply the same quantization ops and linear
    to the same parameter: op for op the same computation, so the rows are equal. End to end
    differs after the first region (the whole graph carries every earlier layer's error),
    but the first block's input is the float embedding in both, so its rows are equal too."""
    _, _, regional, whole = toy
    for row in regional.rows:
        other = whole.row(row.layer)
        assert _local(row.fake_quant) == _local(other.fake_quant), row.layer
        assert row.converted.local == other.converted.local and row.converted.weights_only == other.converted.weights_only, row.layer
    for name in BLOCK:
        layer = f"blocks.0.{name}"
        assert regional.row(layer).fake_quant == whole.row(layer).fake_quant, layer
        assert regional.row(layer).converted == whole.row(layer).converted, layer


def test_end_to_end_starts_at_the_region_input(toy):
    _, _, regional, whole = toy
    # lm_head is a region of its own: its end-to-end run is the local one (same input, same ops)
    head = regional.row("lm_head").fake_quant
    assert head.end_to_end == head.local
    # in the whole capture it carries the error of both blocks
    assert whole.row("lm_head").fake_quant.end_to_end.sqnr_db < head.end_to_end.sqnr_db
    # blocks.1's first linear reads the float model's input of blocks.1: nothing before it
    first = regional.row("blocks.1.q_proj").fake_quant
    assert first.end_to_end == first.local
    assert "from each region's input" in str(regional) and "region (the captured block" in regional.to_html()
    assert "region" not in whole.end_to_end_meaning


def test_converted_region_capture(toy):
    model, regional, prepared_report, _ = toy
    report = compare(model, qatfx.convert_pt2e(regional), BATCHES)
    assert not report.has_fake_quant and report.has_converted and report.regional
    assert sorted(r.layer for r in report.rows) == sorted(r.layer for r in prepared_report.rows)
    for row in report.rows:
        # compare converts a prepared module with the same convert pass convert_pt2e runs
        assert row.converted == prepared_report.row(row.layer).converted, row.layer
        assert row.fake_quant is None and row.converted_vs_fake_quant is None


def test_checkpoint_wrapped_regions(toy):
    """The region path runs through the wrapper (blocks.0._checkpoint_wrapped_module); the
    float run through checkpoint (no_grad: one plain forward) computes the same tensors."""
    model, _, report, _ = toy
    wrapped = copy.deepcopy(model)
    for i, block in enumerate(wrapped.blocks):
        wrapped.blocks[i] = checkpoint_wrapper(block)
    prepared = qatfx.prepare_pt2e(wrapped, Q(32), (tokens(),), regions="auto")
    assert graph_regions(prepared)[0][0] == "blocks.0._checkpoint_wrapped_module"
    wrapped_report = compare(wrapped, prepared, BATCHES)
    assert wrapped_report.row("blocks.0.q_proj").module == "blocks.0._checkpoint_wrapped_module.q_proj"
    for row in wrapped_report.rows:
        other = report.row(row.layer)  # layer names leave the wrapper out
        assert (row.fake_quant, row.converted, row.converted_vs_fake_quant) == (other.fake_quant, other.converted, other.converted_vs_fake_quant)


def test_layers_outside_the_regions_are_listed_as_skipped():
    torch.manual_seed(0)
    model = TinyLM(tie=False).eval()
    prepared = qatfx.prepare_pt2e(model, Q(32), (tokens(),), regions=["blocks.1"])
    report = compare(model, prepared, (tokens(seed=1),))
    summary = qatfx.summary(prepared)
    assert sorted(r.layer for r in report.rows) == sorted(r.layer for r in summary.layers)
    for layer in summary.skipped:
        row = report.row(layer.layer)
        assert not row.quantized and row.primary is None and "outside every captured region" in row.note
    for layer in summary.quantized:
        assert layer.layer.startswith("blocks.1.") and report.row(layer.layer).fake_quant is not None


def test_hf_llama_with_cache_per_linear_regions():
    """use_cache=True: attention is split into one region per projection, the MLP is one."""
    model, vocab = _hf("LlamaConfig", "LlamaForCausalLM", use_cache=True)()
    prepared = qatfx.prepare_pt2e(model, Q(32), (tokens(2, 8, vocab, 0),), regions="auto")
    regions = [p for p, _ in graph_regions(prepared)]
    assert "model.layers.0.self_attn.q_proj" in regions and "model.layers.0.mlp" in regions
    report = compare(model, prepared, [tokens(2, 8, vocab, 1), tokens(3, 11, vocab, 2)])
    quantized = [r.layer for r in qatfx.summary(prepared).quantized]
    assert sorted(r.layer for r in report.rows) == sorted(quantized)
    for layer in quantized:
        row = report.row(layer)
        assert row.module == layer and row.fake_quant is not None, layer
        assert row.converted_vs_fake_quant.max_abs_error == 0.0, layer
        assert math.isfinite(row.fake_quant.local.sqnr_db), layer
        if not layer.endswith("down_proj"):
            # a region's first linear (each projection is its own region; gate and up read
            # the MLP's input) runs on the region input: end to end is the local computation
            assert row.fake_quant.end_to_end == row.fake_quant.local, layer
    converted = compare(model, qatfx.convert_pt2e(prepared), (tokens(2, 8, vocab, 1),))
    assert sorted(r.layer for r in converted.rows) == sorted(quantized)
    assert all(r.converted is not None for r in converted.rows)


def test_float_model_without_the_region_is_refused(toy):
    _, regional, _, _ = toy
    with pytest.raises(ValueError, match="has no module 'blocks.0'.*pass the nn.Module that was prepared"):
        compare(nn.Linear(64, 64), regional, (tokens(seed=1),))
