"""QAT on 2 CPU ranks (gloo) against single-process training of the same global batch: a
whole-graph prepared model with DDP and FSDP2, started with torchrun
(examples/distributed_qat.py), and a region capture (regions="auto") with FSDP2 per decoder
block, on ranks spawned here."""

import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import Shard

import qatfx
from qatfx.graph.regions import graph_regions
from tests.model_zoo import BY_NAME

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "distributed_qat.py"
STEPS, BATCH, SEQ = 8, 8, 32
N_TOKENS = BATCH * SEQ  # tokens in one global batch: the loss is their mean
U = 2.0**-24  # fp32 unit roundoff
COMMON = ["--steps", str(STEPS), "--batch", str(BATCH), "--seq", str(SEQ)]


def run_example(tmp_path, strategy, *extra, ranks=1):
    out = tmp_path / f"{strategy}{''.join(extra)}.json".replace("/", "_")
    script = [str(EXAMPLE), "--strategy", strategy, "--out", str(out), *COMMON, *extra]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else [sys.executable]
    # one thread everywhere: torchrun gives each rank one, and the reference must use the same kernels
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(launcher + script, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-6000:]
    return json.loads(out.read_text())["losses"]


def summation_bound(loss: float) -> float:
    """How far two fp32 evaluations of the same mean of N_TOKENS per-token losses can be
    apart when only their summation order differs. Recursive summation of n terms errs by
    at most (n - 1) u sum|l_i| (Higham, Accuracy and Stability, 4.2), whatever the order;
    the losses are positive, so sum|l_i| = n * mean. Two orders: twice that, plus the
    final division and the two-halves average (3 u). With N = 256, L = 4.8: 1.5e-4."""
    return (2 * (N_TOKENS - 1) + 3) * U * abs(loss)


@pytest.mark.parametrize(
    "compiled",
    [
        # eager: ~70 s on 2 cores (two torchruns of 2 ranks, two single-process runs)
        pytest.param(False, marks=pytest.mark.long),
        # compiled: each of the 6 processes compiles forward + backward, ~2 min
        pytest.param(True, marks=pytest.mark.long),
    ],
    ids=["eager", "compiled"],
)
def test_ddp_and_fsdp2_match_single_process_training(tmp_path, compiled):
    mode = ["--deterministic"] if compiled else ["--eager"]
    global_batch = run_example(tmp_path, "single", *mode)
    two_halves = run_example(tmp_path, "single", "--micro-batches", "2", *mode)
    ddp = run_example(tmp_path, "ddp", *mode, ranks=2)
    fsdp2 = run_example(tmp_path, "fsdp2", *mode, "--save", str(tmp_path / "fsdp2_model"), ranks=2)

    # Exact. On 2 ranks the gradient all-reduce (DDP's, FSDP2's reduce-scatter) adds two
    # fp32 addends, one rounding whatever the order, and its division by 2 is exact (a power
    # of two); each rank's backward is one process's backward of its half. So distributed
    # training is bit for bit one process accumulating the two halves' gradients (loss / 2
    # each: scaling by 1/2 commutes with rounding). The global loss is (l0 + l1) / 2 in both.
    assert ddp == two_halves, (ddp, two_halves)
    assert fsdp2 == two_halves, (fsdp2, two_halves)

    # Against one process on the whole batch, the reduction order is the only difference.
    # Step 0 (same weights, each row's forward the same): only the loss mean's summation
    # differs -> summation_bound. Measured: 0 eager and compiled (AVX-512 machine).
    diffs = [abs(a - b) for a, b in zip(ddp, global_batch)]
    print(f"|distributed - single global batch| per step ({'compiled' if compiled else 'eager'}): {diffs}")
    assert diffs[0] <= summation_bound(global_batch[0]), diffs
    # From step 1 the weights differ by the gradients' reassociation error (~N u relative).
    # In float training that stays at ulp level (test_float_control_matches_to_the_
    # summation_bound), but fake-quant rounds weights to 16 and activations to 256 levels:
    # a value that the tiny difference moves across a rounding boundary changes by a whole
    # quantization step, and AdamW carries that into the next steps. No u-level bound holds
    # for QAT; we bound the drift by 1% of the loss. Measured over 8 steps: at most 3.5e-3
    # eager, 3.8e-3 compiled (0.12% of the loss).
    for step, (d, ref) in enumerate(zip(diffs, global_batch)):
        assert d <= 1e-2 * ref, (step, diffs)

    # the sharded model gathers, converts and saves from rank 0
    assert qatfx.summary(qatfx.load(tmp_path / "fsdp2_model", scheme="8da4w")).quantized


def test_float_control_matches_to_the_summation_bound(tmp_path):
    """With fake-quant off (the float model) the two reduction orders of
    test_ddp_and_fsdp2_match_single_process_training stay within the summation bound at
    every step: what separates QAT runs is rounding-boundary amplification, not the
    reduction. After step 0 the weights differ by the gradients' ~N u relative error; AdamW's
    update m / sqrt(v) is a ratio, so its relative error is of that order too, and the loss
    moves by lr |g| times that: orders below the summation term. Measured: at most 4.8e-7
    (1 ulp of the loss) over 8 steps."""
    off = ["--eager", "--fake-quant-after", str(STEPS)]
    global_batch = run_example(tmp_path, "single", *off)
    two_halves = run_example(tmp_path, "single", "--micro-batches", "2", *off)
    for step, (a, b) in enumerate(zip(two_halves, global_batch)):
        assert abs(a - b) <= summation_bound(b), (step, two_halves, global_batch)


# ---- FSDP2 per layer on a region capture ---------------------------------------------------
#
# prepare_pt2e(..., regions="auto") keeps the model object and puts one prepared graph in
# place of each decoder block and of lm_head. The model calls those graphs as modules, so
# fully_shard(region) installs hooks that do run: each region all-gathers its parameters
# just before its forward and frees them after (unlike a whole-graph capture, whose blocks
# are never called; see docs/distributed.md). The ranks are spawned here (no torchrun) and
# train the example's byte-level data and loss, so N_TOKENS and summation_bound apply.


def _load_example():
    spec = importlib.util.spec_from_file_location("distributed_qat_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


distributed_qat = _load_example()
WORLD = 2
LR = 3e-3  # the example's default


def _toy_model():
    torch.manual_seed(0)  # the same initial weights on every rank and in the reference
    return distributed_qat.byte_lm(SEQ).train(), lambda out: out


def _hf_llama_model():
    model, vocab = BY_NAME["hf_llama"].build()  # seeds itself
    assert vocab == distributed_qat.VOCAB
    return model.train(), lambda out: out.logits


FAMILIES = {"toy": _toy_model, "hf_llama": _hf_llama_model}


def _prepare(family: str, regions):
    """family "<name>" or "<name>+lsq" (learnable_scales: the trained scales are parameters
    FSDP2 shards by rows like the weights)."""
    name, _, lsq = family.partition("+")
    model, logits_of = FAMILIES[name]()
    example_tokens = distributed_qat.global_batch(0, 2, 8)[:, :-1]
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(32, learnable_scales=bool(lsq))
    prepared = qatfx.prepare_pt2e(model, quantizer, (example_tokens,), regions=regions)
    return prepared, logits_of


def _train(model, logits_of, rows: slice, parts: int, full_grad, reduce_loss=lambda loss: loss):
    """The example's training loop (AdamW, STEPS global batches): each step trains rows
    `rows` of the global batch in `parts` accumulated micro-batches. Returns the per-step
    global losses and the step-0 gradients (as full tensors, by name)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, grads = [], {}
    for step in range(STEPS):
        batch = distributed_qat.global_batch(step, BATCH, SEQ)[rows]
        loss = torch.zeros(())
        for part in batch.chunk(parts):
            part_loss = distributed_qat.loss_fn(logits_of(model(part[:, :-1])), part) / parts
            part_loss.backward()
            loss += part_loss.detach()
        if step == 0:
            grads = {name: full_grad(p.grad) for name, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(reduce_loss(loss).item())
    return losses, grads


def _fsdp_rank(rank: int, family: str, store: str, out: str) -> None:
    """One rank: prepare the regions, fully_shard each region then the root, train the
    rank's half of each global batch; rank 0 saves losses, step-0 gradients and what it
    saw of the sharding."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor, Shard

    torch.set_num_threads(1)  # the reference's kernels (see run_example)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model, logits_of = _prepare(family, "auto")
        regions = graph_regions(model)
        for _, gm in regions:
            fully_shard(gm, mesh=mesh)
        fully_shard(model, mesh=mesh)
        sharded = {name: (type(p), tuple(p.placements), tuple(p.to_local().shape)) for name, p in model.named_parameters()}

        def reduce_loss(loss):  # the mean of the ranks' equal-sized means, as in the example
            dist.all_reduce(loss)
            return loss / WORLD

        grad_is_sharded = {}

        def full_grad(grad):  # a collective: every rank gathers every gradient, in one order
            grad_is_sharded[len(grad_is_sharded)] = isinstance(grad, DTensor) and grad.placements == (Shard(0),)
            return grad.full_tensor()

        rows = BATCH // WORLD
        losses, grads = _train(model, logits_of, slice(rank * rows, (rank + 1) * rows), 1, full_grad, reduce_loss)
        if rank == 0:
            torch.save({
                "losses": losses,
                "grads": grads,
                "regions": [path for path, _ in regions],
                "fsdp_units": [isinstance(gm, FSDPModule) for _, gm in regions],
                "sharded": sharded,
                "grad_is_sharded": list(grad_is_sharded.values()),
                "resharded": all(isinstance(p, DTensor) for p in model.parameters()),
            }, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn_ranks(tmp_path, family: str, timeout_s: float = 300, rank_fn=None) -> dict:
    """Run `rank_fn(rank, family, store, out)` (default: _fsdp_rank) on WORLD spawned ranks;
    returns what rank 0 saved to `out`."""
    import torch.multiprocessing as mp

    rank_fn = rank_fn or _fsdp_rank
    out = tmp_path / f"{rank_fn.__name__.strip('_')}_{family}.pt"
    context = mp.start_processes(rank_fn, args=(family, str(tmp_path / "store"), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):  # raises with the rank's traceback if one fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{rank_fn.__name__} ranks still running after {timeout_s} s (a collective hung?)")
    return torch.load(out)


def _clone_grad(grad):
    return None if grad is None else grad.clone()  # a frozen parameter (LoRA's base) has none


def _single_process(family: str, regions, parts: int, prepare=None):
    """One process, the whole global batch in `parts` micro-batches, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, logits_of = (prepare or _prepare)(family, regions)
        return _train(model, logits_of, slice(None), parts, _clone_grad)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "family",
    [
        "toy",  # ~15 s on 2 cores: 2 spawned ranks (import, prepare, 8 steps), 3 single-process runs
        pytest.param("hf_llama", marks=pytest.mark.long),  # ~20 s: transformers' import in each rank
        pytest.param("toy+lsq", marks=pytest.mark.long),  # learned scales sharded and trained, ~20 s
    ],
)
def test_fsdp2_per_region_matches_single_process_training(tmp_path, family):
    ranks = _spawn_ranks(tmp_path, family)
    two_halves, two_halves_grads = _single_process(family, "auto", parts=WORLD)
    global_batch, _ = _single_process(family, "auto", parts=1)
    whole, whole_grads = _single_process(family, None, parts=WORLD)

    # the decoder blocks and lm_head, each its own FSDP unit; every parameter a row shard
    blocks = {"toy": "blocks", "hf_llama": "model.layers"}[family.partition("+")[0]]
    assert any(name.endswith("_learned_scale") for name in ranks["sharded"]) == family.endswith("+lsq")
    assert ranks["regions"] == [f"{blocks}.0", f"{blocks}.1", "lm_head"]
    assert all(ranks["fsdp_units"])
    for name, (kind, placements, local_shape) in ranks["sharded"].items():
        full_rows = two_halves_grads[name].shape[0]
        assert kind.__name__ == "DTensor" and placements == (Shard(0),), name
        assert local_shape[0] == -(-full_rows // WORLD), (name, local_shape)
    # gradients land on the sharded parameters (row shards), and FSDP2 resharded them after
    # the backward (the unsharded tensors the graphs read with get_attr are gone)
    assert len(ranks["grad_is_sharded"]) == len(ranks["sharded"]) and all(ranks["grad_is_sharded"])
    assert ranks["resharded"]

    # Region capture runs the whole capture's aten ops in the same order on the same
    # tensors, forward and backward (tests/test_region_capture.py): exact before sharding.
    assert whole == two_halves, (whole, two_halves)
    assert whole_grads.keys() == two_halves_grads.keys()
    for name in whole_grads:
        assert torch.equal(whole_grads[name], two_halves_grads[name]), name

    # The bounds of test_ddp_and_fsdp2_match_single_process_training, unchanged: sharding
    # per region adds no arithmetic. The all-gather before each region's forward copies
    # the shards; each parameter's reduce-scatter is the same elementwise (g0 + g1) / 2 as
    # the whole-graph unit's (one rounding for 2 addends, division by 2 exact), only
    # issued per region. So, exact against one process accumulating the two halves:
    assert ranks["losses"] == two_halves, (ranks["losses"], two_halves)
    assert ranks["grads"].keys() == two_halves_grads.keys()
    for name, grad in ranks["grads"].items():
        assert torch.equal(grad, two_halves_grads[name]), name
    # and against the whole global batch in one process: step 0 within summation_bound,
    # later steps within 1% of the loss (QAT's rounding-boundary drift, derived there).
    diffs = [abs(a - b) for a, b in zip(ranks["losses"], global_batch)]
    print(f"|FSDP2 per region - single global batch| per step ({family}): {diffs}")
    assert diffs[0] <= summation_bound(global_batch[0]), diffs
    for step, (d, ref) in enumerate(zip(diffs, global_batch)):
        assert d <= 1e-2 * ref, (step, diffs)


# ---- DDP of a LoRA-prepared model ----------------------------------------------------------
#
# Only the adapters require grad, so DDP's reducer buckets and all-reduces only them; the
# frozen base (and, in torchtune mode, the fq(W) buffers) is identical on every rank. The
# ranks are spawned here, on the example's byte-level data and loss.

LORA_TARGETS = ["*.q_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]


def _prepare_lora(mode: str, regions=None):
    torch.manual_seed(0)  # the same base weights and adapter init on every rank and in the reference
    model = distributed_qat.byte_lm(SEQ).train()
    example_tokens = distributed_qat.global_batch(0, 2, 8)[:, :-1]
    lora = qatfx.LoRA(rank=4, alpha=8, targets=LORA_TARGETS, mode=mode)  # no adapter dropout: ranks draw no masks
    return qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(32), (example_tokens,), lora=lora), lambda out: out


def _ddp_lora_rank(rank: int, mode: str, store: str, out: str) -> None:
    """One rank: a LoRA-prepared model in DDP, trained on the rank's half of each global
    batch; rank 0 saves the losses, the step-0 gradients and the parameters DDP reduces."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)  # the reference's kernels (see run_example)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        prepared, logits_of = _prepare_lora(mode)
        model = DDP(prepared)

        def reduce_loss(loss):  # the mean of the ranks' equal-sized means, as in the example
            dist.all_reduce(loss)
            return loss / WORLD

        rows = BATCH // WORLD
        losses, grads = _train(model, logits_of, slice(rank * rows, (rank + 1) * rows), 1, _clone_grad, reduce_loss)
        if rank == 0:
            reduced = [name for name, p in model.named_parameters() if p.requires_grad]
            torch.save({"losses": losses, "grads": {k.removeprefix("module."): g for k, g in grads.items()},
                        "reduced": [k.removeprefix("module.") for k in reduced]}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "mode",
    [
        "merge_consistent",  # 19-24 s on 2 cores (the toy FSDP2 test above: 15-36 s): 2 spawned ranks, 2 single-process runs
        pytest.param("torchtune", marks=pytest.mark.long),  # ~23 s, the other mode: long run only
    ],
)
def test_ddp_lora_matches_single_process_training(tmp_path, mode):
    ranks = _spawn_ranks(tmp_path, mode, rank_fn=_ddp_lora_rank)
    two_halves, two_halves_grads = _single_process(mode, None, parts=WORLD, prepare=_prepare_lora)
    global_batch, _ = _single_process(mode, None, parts=1, prepare=_prepare_lora)

    # DDP reduces the adapters only (2 per layer, 6 layers per block), and only they get gradients
    adapters = {name for name, grad in two_halves_grads.items() if grad is not None}
    assert set(ranks["reduced"]) == adapters and len(adapters) == 2 * 6 * 2
    assert all(name.endswith(("_lora_a", "_lora_b")) for name in adapters)
    assert {name for name, grad in ranks["grads"].items() if grad is not None} == adapters

    # Exact against one process accumulating the two halves: DDP's all-reduce of 2 ranks is
    # one fp32 addition per element and a division by 2 (exact), as derived in
    # test_ddp_and_fsdp2_match_single_process_training.
    assert ranks["losses"] == two_halves, (ranks["losses"], two_halves)
    for name in adapters:
        assert torch.equal(ranks["grads"][name], two_halves_grads[name]), name
    # Against the whole global batch in one process: step 0 within summation_bound, later
    # steps within 1% of the loss (QAT's rounding-boundary drift; derived there too: the
    # adapters move fq(W + sBA) / the activations across rounding boundaries the same way).
    # Measured over 8 steps: at most 1.1e-3 merge_consistent, 3.5e-5 torchtune (0.02% of the loss).
    diffs = [abs(a - b) for a, b in zip(ranks["losses"], global_batch)]
    print(f"|DDP LoRA - single global batch| per step ({mode}): {diffs}")
    assert diffs[0] <= summation_bound(global_batch[0]), diffs
    for step, (d, ref) in enumerate(zip(diffs, global_batch)):
        assert d <= 1e-2 * ref, (step, diffs)


def _swap_in_row_shards(model: torch.nn.Module) -> None:
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:  # rank 0's row shard
                module._parameters[name] = torch.nn.Parameter(p.detach()[: -(-p.shape[0] // WORLD)].clone())


@pytest.mark.parametrize(
    "regions",
    [None, "auto"],
    ids=["whole_graph", "regions"],
)
def test_sharding_frees_the_full_parameters(regions):
    """FSDP2 replaces each parameter of a sharded module by its shard with
    `module._parameters[name] = shard` (torch's FSDPParam._setattr_on_modules ->
    unsafe_setattr_param), and each rank saves memory only if nothing else holds the full
    tensor. Done here on every module without a process group; once the float model is
    dropped no full parameter may stay alive."""
    torch.manual_seed(0)
    model = distributed_qat.byte_lm(SEQ)
    full = {name: weakref.ref(p) for name, p in model.named_parameters()}
    prepared = qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(32), (distributed_qat.global_batch(0, 2, 8)[:, :-1],), regions=regions)
    del model
    _swap_in_row_shards(prepared)
    gc.collect()
    assert [name for name, ref in full.items() if ref() is not None] == []


@pytest.mark.long  # ~40 s: three modes, 2 spawned ranks each
def test_fsdp_memory_benchmark_quick_run_prints_its_table(tmp_path):
    out = tmp_path / "table.md"
    bench = REPO / "benchmarks" / "bench_fsdp_memory.py"
    run = subprocess.run([sys.executable, str(bench), "--quick", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-6000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    modes = [row.split(" | ")[0].lstrip("| ") for row in rows]
    assert modes == [m for m in ("whole graph, 1 unit", "regions, per layer") for _ in range(2)], rows
