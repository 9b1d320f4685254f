"""Region capture (prepare_pt2e(..., regions=...)): the user's model object is kept, each
region is a prepared graph, and the numbers are those of whole-model capture exactly (both
run the same aten ops in the same order on the same tensors: capture boundaries change no
arithmetic)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import qatfx
from qatfx.capture import CaptureError
from qatfx.graph.regions import graph_regions, is_regional, model_stage
from tests.model_zoo import BY_NAME, FAMILIES, ModelSnapshot, _hf, logits
from tests.models import TinyLM, tokens

Q = qatfx.Int8DynActInt4WeightQuantizer
GROUP = 32


def _regional_and_whole(model, vocab, **whole_quantizer):
    example = (tokens(2, 8, vocab, 0),)
    regional = qatfx.prepare_pt2e(model, Q(GROUP), example, regions="auto")
    whole = qatfx.prepare_pt2e(model, Q(GROUP, **whole_quantizer), example)
    return regional, whole


def test_keeps_the_model_object_its_names_and_tensors():
    model = TinyLM(tie=False).eval()
    snapshot = ModelSnapshot.of(model)
    prepared = qatfx.prepare_pt2e(model, Q(GROUP), (tokens(),), regions="auto")

    snapshot.assert_unchanged(model)  # the user's model is not modified
    assert type(prepared) is type(model) and prepared is not model
    assert [path for path, _ in graph_regions(prepared)] == ["blocks.0", "blocks.1", "lm_head"]
    assert is_regional(prepared) and model_stage(prepared) == "prepared"
    assert prepared.state_dict().keys() == model.state_dict().keys()
    for name, tensor in prepared.state_dict(keep_vars=True).items():
        assert tensor is model.state_dict(keep_vars=True)[name], f"{name} is not shared"
    assert [r.layer for r in qatfx.summary(prepared).layers] == [
        *(f"blocks.{i}.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
        "lm_head",
    ]


@pytest.mark.parametrize(
    "family", [pytest.param(f, id=f.name, marks=[pytest.mark.long] if f.long_only else []) for f in FAMILIES]
)
def test_equals_whole_model_capture_prepared_and_converted(family):
    model, vocab = family.build()
    # torchtune computes its tied output projection in the decoder's own forward, outside
    # every region: region capture reports it skipped, so the whole capture skips it too
    skip = {"skip": ["tok_embeddings"]} if family.name == "torchtune_llama3_2" else {}
    regional, whole = _regional_and_whole(model, vocab, **skip)
    assert type(regional) is type(model)
    assert [r.layer for r in qatfx.summary(regional).quantized] == [r.layer for r in qatfx.summary(whole).quantized]

    ids = tokens(3, 11, vocab, 5)  # other sizes than the example: dynamic dims
    with torch.no_grad():
        assert torch.equal(logits(regional(ids)), logits(whole(ids)))
        converted = qatfx.convert_pt2e(regional)
        assert type(converted) is type(model) and model_stage(converted) == "converted"
        assert torch.equal(logits(converted(ids)), logits(qatfx.convert_pt2e(whole)(ids)))
        assert torch.equal(logits(converted(ids)), logits(regional(ids)))


def test_linear_outside_every_region_is_reported():
    model, vocab = BY_NAME["torchtune_llama3_2"].build()
    prepared = qatfx.prepare_pt2e(model, Q(GROUP), (tokens(2, 8, vocab, 0),), regions="auto")
    (skipped,) = qatfx.summary(prepared).skipped
    assert skipped.layer == "tok_embeddings" and skipped.shape == (vocab, 64)
    assert "outside every captured region" in skipped.skip_reason and "regions=None" in skipped.skip_reason


def test_training_mode_dropout_toggles_and_schedule_match_whole_capture():
    model = TinyLM().train()  # dropout 0.1: the regions draw the same random numbers in order
    regional, whole = _regional_and_whole(model, 96)
    ids = tokens(2, 8, 96, 3)

    def both():
        torch.manual_seed(7)
        a = regional(ids)
        torch.manual_seed(7)
        return a, whole(ids)

    assert torch.equal(*both())
    for module in (regional, whole):
        qatfx.disable_fake_quant(module)
    assert not qatfx.fake_quant_enabled(regional)
    assert torch.equal(*both())
    schedule = qatfx.FakeQuantAfterNSteps(regional, n_steps=1)
    schedule.step()
    qatfx.enable_fake_quant(whole)
    assert qatfx.fake_quant_enabled(regional)
    assert torch.equal(*both())

    regional.eval(), whole.eval()
    assert all(not gm.training for _, gm in graph_regions(regional))
    with torch.no_grad():
        assert torch.equal(regional(ids), whole(ids))


def test_training_step_matches_whole_capture():
    model = TinyLM(tie=False).eval()
    regional, whole = _regional_and_whole(model, 96)
    whole = copy.deepcopy(whole)  # its own parameters, so both can step
    ids = tokens(2, 8, 96, 1)
    grads = []
    for module in (regional, whole):
        loss = torch.nn.functional.cross_entropy(module(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in module.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_block_called_with_a_cache_is_split_and_generate_runs():
    model, vocab = _hf("LlamaConfig", "LlamaForCausalLM", use_cache=True)()
    prepared = qatfx.prepare_pt2e(model, Q(GROUP), (tokens(2, 8, vocab, 0),), regions="auto")
    paths = [p for p, _ in graph_regions(prepared)]
    assert paths[:5] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + ["model.layers.0.mlp"]
    assert paths[-1] == "lm_head" and len(qatfx.summary(prepared).quantized) == BY_NAME["hf_llama"].quantized
    out = prepared.generate(tokens(2, 8, vocab, 0), max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 11)


def test_checkpoint_wrapped_blocks_are_captured_inside_the_wrapper():
    model = TinyLM(tie=False).eval()
    wrapped = copy.deepcopy(model)
    for i, block in enumerate(wrapped.blocks):
        wrapped.blocks[i] = checkpoint_wrapper(block)
    prepared = qatfx.prepare_pt2e(wrapped, Q(GROUP), (tokens(),), regions="auto")
    assert [p for p, _ in graph_regions(prepared)][:2] == [f"blocks.{i}._checkpoint_wrapped_module" for i in range(2)]
    assert qatfx.summary(prepared).layers[0].layer == "blocks.0.q_proj"  # the wrapper is not in layer names
    plain = qatfx.prepare_pt2e(model, Q(GROUP), (tokens(),), regions="auto")
    ids = tokens(2, 8, 96, 2)
    a, b = prepared(ids), plain(ids)
    assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    assert torch.equal(prepared.blocks[0]._checkpoint_wrapped_module.q_proj.weight.grad, plain.blocks[0].q_proj.weight.grad)


def test_explicit_regions_leave_the_rest_float_and_say_so():
    model = TinyLM(tie=False).eval()
    prepared = qatfx.prepare_pt2e(model, Q(GROUP), (tokens(),), regions=["blocks.1"])
    report = qatfx.summary(prepared)
    assert [p for p, _ in graph_regions(prepared)] == ["blocks.1"]
    assert all(r.layer.startswith("blocks.1.") for r in report.quantized)
    # lm_head's linear runs outside the regions (blocks.0 holds no graph and its linears are
    # inside nn.Linear modules, which are their own regions only when named)
    assert {r.layer for r in report.skipped} >= {"lm_head", "blocks.0.q_proj"}


def test_region_dump_folders(tmp_path):
    model = TinyLM(tie=False).eval()
    prepared = qatfx.prepare_pt2e(model, Q(GROUP), (tokens(),), regions="auto", dump_dir=tmp_path)
    qatfx.convert_pt2e(prepared)
    for region in ("blocks.0", "blocks.1", "lm_head"):
        names = sorted(p.name for p in (tmp_path / region).glob("*.txt"))
        assert any("insert_fake_quant.after" in n for n in names) and any("convert.after" in n for n in names), names


def test_save_and_load_a_region_capture(tmp_path):
    model, vocab = BY_NAME["torchtune_llama3_2"].build()
    prepared = qatfx.prepare_pt2e(model, Q(GROUP), (tokens(2, 8, vocab, 0),), regions="auto")
    converted = qatfx.convert_pt2e(prepared.eval())
    qatfx.save(converted, tmp_path / "m")
    loaded = qatfx.load(tmp_path / "m")
    assert [r.layer for r in qatfx.summary(loaded).layers] == [r.layer for r in qatfx.summary(converted).layers]
    ids = tokens(3, 11, vocab, 4)
    with torch.no_grad():
        assert torch.equal(loaded(ids), converted(ids))


@pytest.mark.parametrize("build", ["hf_llama", "torchtune_llama3_2"])
def test_checkpoints_load_both_ways_strictly(build):
    model, vocab = BY_NAME[build].build()
    prepared = qatfx.prepare_pt2e(model, Q(GROUP), (tokens(2, 8, vocab, 0),), regions="auto")
    twin, _ = BY_NAME[build].build()
    twin.load_state_dict(prepared.state_dict(), strict=True)
    prepared.load_state_dict(copy.deepcopy(model.state_dict()), strict=True)


# ---- bad input ------------------------------------------------------------------------------


def test_unknown_or_nested_region_names_are_refused():
    model = TinyLM()
    with pytest.raises(ValueError, match="no submodule 'blocks.7'.*named_modules"):
        qatfx.prepare_pt2e(model, Q(GROUP), (tokens(),), regions=["blocks.7"])
    with pytest.raises(ValueError, match="'blocks.0.q_proj' lies inside 'blocks.0'"):
        qatfx.prepare_pt2e(model, Q(GROUP), (tokens(),), regions=["blocks.0", "blocks.0.q_proj"])
    with pytest.raises(ValueError, match="regions must be 'auto'"):
        qatfx.prepare_pt2e(model, Q(GROUP), (tokens(),), regions="blocks")


def test_regions_need_the_module_and_inputs():
    model = TinyLM()
    ep = torch.export.export(model, (tokens(),))
    with pytest.raises(TypeError, match="regions= needs the nn.Module itself.*regions=None"):
        qatfx.prepare_pt2e(ep, Q(GROUP), regions="auto")
    with pytest.raises(ValueError, match="example_inputs are required"):
        qatfx.prepare_pt2e(model, Q(GROUP), regions="auto")


def test_explicit_region_called_with_a_cache_is_refused_by_name():
    model, vocab = _hf("LlamaConfig", "LlamaForCausalLM", use_cache=True)()
    with pytest.raises(ValueError, match=r"region 'model.layers.0' \(LlamaDecoderLayer\) is called with a DynamicCache"):
        qatfx.prepare_pt2e(model, Q(GROUP), (tokens(2, 8, vocab, 0),), regions=["model.layers.0"])


class _Branchy(torch.nn.Module):
    """A block torch.export cannot capture: it branches on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(32, 32)

    def forward(self, x):
        return self.proj(x) if x.sum() > 0 else -self.proj(x)


class _BranchyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_Branchy(), _Branchy()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_region_that_cannot_be_captured_is_named():
    with pytest.raises(CaptureError, match=r"(?s)region 'layers.0' \(_Branchy\) could not be captured.*data-dependent"):
        qatfx.prepare_pt2e(_BranchyModel(), Q(GROUP), (torch.randn(2, 4, 32),), regions="auto")


def test_regions_get_the_attention_mask_and_keyword_inputs_the_model_passes():
    model, vocab = BY_NAME["hf_llama"].build()
    ids = tokens(2, 8, vocab, 0)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the decoder layers receive a 4-D float mask, not None
    example = {"attention_mask": mask}
    regional = qatfx.prepare_pt2e(model, Q(GROUP), (ids,), example_kwargs=example, regions="auto")
    whole = qatfx.prepare_pt2e(model, Q(GROUP), (ids,), example_kwargs=example)
    other = tokens(2, 10, vocab, 6)
    other_mask = torch.ones_like(other)
    other_mask[1, :4] = 0
    with torch.no_grad():
        assert torch.equal(regional(other, attention_mask=other_mask).logits, whole(other, attention_mask=other_mask).logits)


def test_the_recording_run_changes_no_state_of_the_users():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.BatchNorm1d(32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 32)).train()
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    example = (torch.randn(4, 32),)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    qatfx.prepare_pt2e(model, Q(GROUP), example, regions="auto")
    assert torch.equal(torch.rand(4), expected)  # dropout's draws during the recording run are undone
    for name, value in buffers.items():
        assert torch.equal(model.state_dict()[name], value), name  # batch-norm statistics too


def test_dynamic_shapes_with_regions_is_refused():
    with pytest.raises(ValueError, match="dynamic_shapes= describes the whole model's inputs"):
        qatfx.prepare_pt2e(TinyLM(), Q(GROUP), (tokens(),), regions="auto", dynamic_shapes={"tokens": None})
