"""qatfx as torchtune's QAT quantizer (qatfx/integrations/torchtune.py): the recipe's config
names it, its prepare/convert protocol on torchtune's Llama 3.2 built from config, the fake-quant
toggles the recipe applies, activation checkpointing applied before prepare (the recipe's
order), and torchtune's per-layer FSDP2 sharding on 2 gloo ranks.

Run as a script under torchrun, this file is the 2-rank training worker of
test_fsdp2_per_layer_matches_single_process.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # torchrun worker: make `tests` importable
    sys.path.insert(0, str(REPO))

import pytest
import torch
import torch.nn.functional as F

import qatfx
from qatfx.graph.regions import graph_regions, model_stage
from tests.model_zoo import BY_NAME, VOCAB, install_torchtune_nf4_shim
from tests.models import tokens
from tests.test_distributed import BATCH, SEQ, summation_bound


def _removed_from_torchao(name: str):
    def removed(*args, **kwargs):
        raise NotImplementedError(f"torchao 0.18 removed {name}; torchtune's PTQ quantizers are not used by these tests")

    return removed


def install_torchtune_training_shim() -> None:
    """torchtune 0.6.1's training package imports names torchao 0.18 (our parity reference)
    removed, used only by torchtune's own post-training quantizers (`quantize()`); give them
    placeholders that say so if called (test-only), beside the nf4 module shim."""
    install_torchtune_nf4_shim()
    dtypes = importlib.import_module("torchao.dtypes")
    quantization = importlib.import_module("torchao.quantization")
    if not hasattr(dtypes, "TensorCoreTiledLayout"):
        dtypes.TensorCoreTiledLayout = type("TensorCoreTiledLayout", (), {"__init__": _removed_from_torchao("TensorCoreTiledLayout")})
    for name in ("int4_weight_only", "int8_dynamic_activation_int4_weight"):
        if not hasattr(quantization, name):
            setattr(quantization, name, _removed_from_torchao(name))


install_torchtune_training_shim()
from omegaconf import OmegaConf  # noqa: E402  (torchtune's config library)
from torchtune import config, modules, training  # noqa: E402
from torchtune.training import quantization as tt_quantization  # noqa: E402

from qatfx.integrations import torchtune as qatfx_torchtune  # noqa: E402

GROUP = 32  # the model zoo's hidden size is 64
COMPONENT = "qatfx.integrations.torchtune.Int8DynActInt4WeightQATQuantizer"


def quantizer_from_config(groupsize: int = GROUP):
    """As torchtune's QAT recipes make it: instantiate the config node, set precision."""
    quantizer = config.instantiate(OmegaConf.create({"_component_": COMPONENT, "groupsize": groupsize}))
    quantizer.precision = torch.float32
    return quantizer


def llama3_2(train: bool = False):
    model, vocab = BY_NAME["torchtune_llama3_2"].build()
    return model.train(train), vocab


def with_activation_checkpointing(model):
    training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    return model


# ---- the config, the registration, the protocol ---------------------------------------------


def test_config_instantiate_imports_the_module_which_registers_it(monkeypatch):
    """A recipe imports nothing of qatfx: config.instantiate imports the _component_'s
    module, and that import is what registers the class (fresh tables, fresh import)."""
    import qatfx.integrations

    monkeypatch.delitem(sys.modules, "qatfx.integrations.torchtune")
    monkeypatch.delattr(qatfx.integrations, "torchtune")
    for table in ("_quantizer_to_mode", "_quantizer_mode_to_disable_fake_quant", "_quantizer_mode_to_enable_fake_quant"):
        original = getattr(tt_quantization, table)
        monkeypatch.setattr(tt_quantization, table, {k: v for k, v in original.items() if k != qatfx_torchtune.MODE and k is not qatfx_torchtune.Int8DynActInt4WeightQATQuantizer})
    quantizer = quantizer_from_config()
    assert type(quantizer) is not qatfx_torchtune.Int8DynActInt4WeightQATQuantizer  # the class of the fresh import
    assert training.quantization.get_quantizer_mode(quantizer) == qatfx_torchtune.MODE


def test_recipe_config_instantiates_a_registered_qat_quantizer():
    quantizer = quantizer_from_config(256)
    assert type(quantizer) is qatfx_torchtune.Int8DynActInt4WeightQATQuantizer and quantizer.groupsize == 256
    mode = training.quantization.get_quantizer_mode(quantizer)
    assert mode == qatfx_torchtune.MODE and "qat" in mode  # what the recipe checks before prepare
    assert tt_quantization._get_disable_fake_quant(mode) is qatfx_torchtune.disable_fake_quant
    assert tt_quantization._get_enable_fake_quant(mode) is qatfx_torchtune.enable_fake_quant


def test_prepare_and_convert_equal_whole_model_capture():
    model, vocab = llama3_2()
    prepared = quantizer_from_config().prepare(model)  # no example inputs, as the recipe calls it

    assert type(prepared) is modules.TransformerDecoder and prepared is not model
    assert [path for path, _ in graph_regions(prepared)] == ["layers.0", "layers.1"]
    # the tied output projection is F.linear(h, tok_embeddings.weight) in the decoder's own
    # forward, outside every region: left in float and reported
    (skipped,) = qatfx.summary(prepared).skipped
    assert skipped.layer == "tok_embeddings" and "outside every captured region" in skipped.skip_reason
    whole = qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(GROUP, skip=["tok_embeddings"]), (tokens(2, 8, vocab, 0),))
    assert [r.layer for r in qatfx.summary(prepared).quantized] == [r.layer for r in qatfx.summary(whole).quantized]

    ids = tokens(3, 11, vocab, 5)  # not the synthesized example's sizes
    with torch.no_grad():
        # exact: the regions and the whole graph run the same aten ops in the same order
        assert torch.equal(prepared(ids), whole(ids))
        converted = quantizer_from_config().convert(prepared)
        assert type(converted) is type(model) and model_stage(converted) == "converted"
        assert model_stage(prepared) == "prepared"  # convert leaves its input as it was
        # exact: convert stores the codes fake-quant rounds to (eval mode)
        assert torch.equal(converted(ids), prepared(ids))


def test_float_checkpoint_loads_into_the_prepared_model_and_back():
    model, _ = llama3_2()
    prepared = quantizer_from_config().prepare(model)
    float_checkpoint = copy.deepcopy(model.state_dict())
    prepared.load_state_dict(float_checkpoint, strict=True)
    twin, _ = llama3_2()
    twin.load_state_dict(prepared.state_dict(), strict=True)
    for name, value in twin.state_dict().items():
        assert torch.equal(value, float_checkpoint[name]), name


def test_fake_quant_toggles_the_recipe_applies():
    """The recipe's fake_quant_after_n_steps: model.apply(fn) with the functions torchtune
    looks up by the quantizer's mode."""
    model, vocab = llama3_2()
    prepared = quantizer_from_config().prepare(model)
    whole = qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(GROUP, skip=["tok_embeddings"]), (tokens(2, 8, vocab, 0),))
    ids = tokens(2, 9, vocab, 1)
    mode = training.quantization.get_quantizer_mode(quantizer_from_config())

    prepared.apply(tt_quantization._get_disable_fake_quant(mode))
    qatfx.disable_fake_quant(whole)
    assert not qatfx.fake_quant_enabled(prepared)
    with torch.no_grad():
        assert torch.equal(prepared(ids), whole(ids))  # exact: both are the float graph now
    prepared.apply(tt_quantization._get_enable_fake_quant(mode))
    qatfx.enable_fake_quant(whole)
    assert qatfx.fake_quant_enabled(prepared)
    with torch.no_grad():
        assert torch.equal(prepared(ids), whole(ids))
    model.apply(qatfx_torchtune.disable_fake_quant)  # a float model: nothing to toggle, no error


# ---- bad input ------------------------------------------------------------------------------


def test_meta_device_model_is_refused_with_the_fix():
    with torch.device("meta"):
        model = BY_NAME["torchtune_llama3_2"].build()[0]
    with pytest.raises(ValueError, match=r"(?s)meta device.*self\._device.*integrations_torchtune\.md"):
        quantizer_from_config().prepare(model)


def test_bad_arguments_are_refused_with_the_fix():
    model, _ = llama3_2()
    quantizer = quantizer_from_config()
    quantizer.precision = torch.bfloat16  # as the recipe sets it for dtype: bf16
    with pytest.raises(ValueError, match=r"precision is torch.bfloat16 but the model has torch.float32.*precision=None"):
        quantizer.prepare(model)
    with pytest.raises(ValueError, match="qatfx does not pad weights"):
        qatfx_torchtune.Int8DynActInt4WeightQATQuantizer(padding_allowed=True)
    with pytest.raises(ValueError, match="example_seq_len must be >= 3"):
        qatfx_torchtune.Int8DynActInt4WeightQATQuantizer(example_seq_len=2)
    with pytest.raises(NotImplementedError, match="QAT \\+ LoRA"):
        quantizer.get_weight_fake_quantize_config()
    with pytest.raises(ValueError, match="no tok_embeddings.*example_inputs="):
        quantizer_from_config().prepare(torch.nn.Sequential(torch.nn.Linear(64, 64)))


# ---- activation checkpointing ---------------------------------------------------------------


def _count_region_calls(model) -> dict:
    """Calls of each region's forward, counted when they start: a recomputation stops (by
    raising, non-reentrant checkpoint's early stop) once it has what backward needs, so a
    forward hook would not see it."""
    calls = {}
    for path, gm in graph_regions(model):
        calls[path] = 0
        gm.register_forward_pre_hook(lambda module, args, path=path: calls.__setitem__(path, calls[path] + 1))
    return calls


def _loss_and_grads(model, ids):
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()}


def test_activation_checkpointing_applied_before_prepare():
    model, vocab = llama3_2(train=True)
    checkpointed = quantizer_from_config().prepare(with_activation_checkpointing(copy.deepcopy(model)))
    plain = quantizer_from_config().prepare(model)
    paths = [path for path, _ in graph_regions(checkpointed)]
    assert paths == ["layers.0._checkpoint_wrapped_module", "layers.1._checkpoint_wrapped_module"]
    assert qatfx.summary(checkpointed).quantized[0].layer == "layers.0.attn.q_proj"  # no wrapper in names
    assert checkpointed.state_dict().keys() == model.state_dict().keys()

    calls = _count_region_calls(checkpointed)
    ids = tokens(2, 17, vocab, 3)
    loss, grads = _loss_and_grads(checkpointed, ids)
    # backward re-ran each region's forward once: the checkpoint wrapper recomputes the
    # prepared graph (the count after the forward alone is checked below, on the plain model)
    assert calls == {path: 2 for path in paths}
    plain_calls = _count_region_calls(plain)
    plain_loss, plain_grads = _loss_and_grads(plain, ids)
    assert plain_calls == {"layers.0": 1, "layers.1": 1}
    # exact: the recomputation runs the same graph on the same inputs, op for op, and
    # fake-quant is deterministic, so backward sees the same saved values
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], plain_grads[name]), name


# ---- FSDP2 per layer, 2 gloo ranks ----------------------------------------------------------

STEPS = 3
FAKE_QUANT_AFTER = 1  # the recipe's fake_quant_after_n_steps: step 0 in float, then QAT


def _run(tmp_path, strategy, ranks):
    out = tmp_path / f"{strategy}.json"
    script = [__file__, "--strategy", strategy, "--out", str(out)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else [sys.executable]
    # one thread everywhere: torchrun gives each rank one, and the reference must use the same kernels
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(launcher + script, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-6000:]
    return json.loads(out.read_text()), torch.load(str(out) + ".grads.pt")


@pytest.mark.long  # two torchrun ranks with compiles, ~35 s on 2 cores (README: FSDP2 in the long run)
def test_fsdp2_per_layer_matches_single_process(tmp_path):
    """The recipe's order on 2 ranks: torchtune's shard_model with get_shard_conditions
    shards each (checkpoint-wrapped) prepared decoder layer, then the root;
    load_from_full_model_state_dict loads a float checkpoint strictly into the shards;
    fake-quant is off for step 0 and on after, switched by the recipe's toggles."""
    fsdp, fsdp_grads = _run(tmp_path, "fsdp2", ranks=2)
    single, single_grads = _run(tmp_path, "single", ranks=1)
    assert fsdp["sharded"] == ["layers.1", "layers.0"]  # bottom-up, as shard_model walks
    assert fsdp["fake_quant"] == [False, True, True]  # model.apply reached the sharded regions

    # Exact (the argument of tests/test_distributed.py): each rank's backward is one
    # process's backward of its half; the reduce-scatter adds two fp32 addends (one
    # rounding, either order) and halves them exactly, as one process accumulating the two
    # halves' gradients of loss / 2 does. Per-layer sharding only changes when parameters
    # are gathered, not the arithmetic.
    assert fsdp["losses"] == single["two_halves"], (fsdp["losses"], single["two_halves"])
    assert fsdp_grads.keys() == single_grads.keys()
    for name in fsdp_grads:
        assert torch.equal(fsdp_grads[name], single_grads[name]), name

    # Against the whole global batch in one process only the loss mean's summation order
    # differs at step 0 (summation_bound, same batch and sequence sizes as
    # tests/test_distributed.py); after it, the QAT rounding-boundary drift that file
    # bounds by 1% of the loss.
    diffs = [abs(a - b) for a, b in zip(fsdp["losses"], single["global_batch"])]
    assert diffs[0] <= summation_bound(single["global_batch"][0]), diffs
    for step, (d, ref) in enumerate(zip(diffs, single["global_batch"])):
        assert d <= 1e-2 * ref, (step, diffs)


def _global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))


def _float_checkpoint(model) -> dict:
    """A float checkpoint other than the model's initial weights (so loading it shows),
    the same in every process."""
    noise = torch.Generator().manual_seed(1)
    return {k: v + 0.02 * torch.randn(v.shape, generator=noise) for k, v in model.state_dict().items()}


def _train(rank: int, world: int, micro_batches: int, shard: bool) -> tuple[dict, dict]:
    """The recipe's model setup (activation checkpointing, quantizer from config, prepare,
    shard_model, load the float checkpoint) and STEPS AdamW steps on this rank's rows of
    each global batch, with the recipe's fake_quant_after_n_steps toggles."""
    model, _ = llama3_2(train=True)
    checkpoint = _float_checkpoint(model)
    with_activation_checkpointing(model)
    quantizer = quantizer_from_config()
    mode = training.quantization.get_quantizer_mode(quantizer)
    model = quantizer.prepare(model)
    sharded = []
    if shard:
        condition = partial(training.get_shard_conditions, names_to_match=None)
        sharded = [name for name, m in reversed(list(model.named_modules())) if condition(name, m)]
        training.shard_model(model=model, shard_conditions=[condition], cpu_offload=False, reshard_after_forward=True)
        training.load_from_full_model_state_dict(model, checkpoint, torch.device("cpu"), strict=True)
    else:
        model.load_state_dict(checkpoint, strict=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = BATCH // world
    losses, fake_quant, step0_grads = [], [], {}
    for step in range(STEPS):
        if step == 0:
            model.apply(tt_quantization._get_disable_fake_quant(mode))
        elif step == FAKE_QUANT_AFTER:
            model.apply(tt_quantization._get_enable_fake_quant(mode))
        fake_quant.append(qatfx.fake_quant_enabled(model))
        batch = _global_batch(step)[rank * rows : (rank + 1) * rows]
        loss = torch.zeros(())
        for part in batch.chunk(micro_batches):
            logits = model(part[:, :-1])
            part_loss = F.cross_entropy(logits.reshape(-1, VOCAB), part[:, 1:].reshape(-1)) / micro_batches
            part_loss.backward()
            loss += part_loss.detach()
        if step == 0:
            for name, p in model.named_parameters():
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # a collective under FSDP2
                step0_grads[name.replace("._checkpoint_wrapped_module", "")] = grad.detach().clone()
        opt.step()
        opt.zero_grad()
        if world > 1:
            torch.distributed.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return {"losses": losses, "fake_quant": fake_quant, "sharded": sharded}, step0_grads


def _worker(argv=None) -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--strategy", choices=["fsdp2", "single"])
    args.add_argument("--out")
    args = args.parse_args(argv)
    if args.strategy == "fsdp2":
        torch.distributed.init_process_group("gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        result, grads = _train(rank, world, micro_batches=1, shard=True)
    else:
        rank = 0
        result, grads = _train(0, 1, micro_batches=2, shard=False)
        result = {"two_halves": result["losses"], "global_batch": _train(0, 1, micro_batches=1, shard=False)[0]["losses"]}
    if rank == 0:
        torch.save(grads, args.out + ".grads.pt")
        Path(args.out).write_text(json.dumps(result))
    if args.strategy == "fsdp2":
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker()
