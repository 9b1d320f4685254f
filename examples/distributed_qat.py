"""QAT of a qatfx-prepared model on several processes, with DDP or FSDP2 (fully_shard).

    torchrun --standalone --nproc-per-node 2 examples/distributed_qat.py --strategy ddp      # CPU: gloo
    torchrun --standalone --nproc-per-node 2 examples/distributed_qat.py --strategy fsdp2
    python examples/distributed_qat.py --strategy single                        # one process

Every process prepares the same model (same seed), trains its slice of a fixed global batch
under torch.compile (--eager: without) and the global loss of each step is printed and,
with --out, written as JSON. `--strategy single --micro-batches 2` runs the same global
batch as two accumulated micro-batches in one process: the reduction DDP and FSDP2 do on 2
ranks, which tests/test_distributed.py compares bit for bit. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import qatfx
from qatfx.recipes.model import CausalLM, LMConfig

VOCAB = 128  # bytes of ASCII text
TEXT = torch.tensor(list(b"quantization-aware training on many ranks keeps every int4 weight in step. " * 64))


def byte_lm(max_seq: int) -> CausalLM:
    """The toy Llama on bytes: no dropout, so every rank's forward is deterministic."""
    return CausalLM(LMConfig(vocab_size=VOCAB, dim=64, layers=2, heads=4, hidden=256, max_seq=max_seq))


def global_batch(step: int, batch: int, seq: int) -> torch.Tensor:
    """The same (batch, seq + 1) slice of TEXT for step `step` on every rank."""
    starts = torch.randint(0, len(TEXT) - seq - 1, (batch,), generator=torch.Generator().manual_seed(step))
    return torch.stack([TEXT[s : s + seq + 1] for s in starts])


def loss_fn(logits, batch):
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", choices=["ddp", "fsdp2", "single"], default="ddp")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences), split evenly over ranks")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--fake-quant-after", type=int, default=0, help="qatfx.FakeQuantAfterNSteps: float for this many steps (>= --steps: a float control run)")
    p.add_argument("--micro-batches", type=int, default=1, help="single: accumulate the global batch in this many parts")
    p.add_argument("--eager", action="store_true", help="train without torch.compile")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True) (bitwise reproducible compiled runs)")
    p.add_argument("--out", help="write the per-step losses here (JSON, rank 0)")
    p.add_argument("--save", help="rank 0: convert the trained model and qatfx.save it to this directory")
    return p.parse_args(argv)


def setup(strategy: str):
    """(rank, world size, device); initializes the process group under torchrun."""
    if strategy == "single":
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit(f"--strategy {strategy} runs under torchrun: torchrun --standalone --nproc-per-node 2 {__file__} --strategy {strategy}")
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def wrap(prepared, strategy: str, device: torch.device, world: int):
    """The module to train. FSDP2 shards the whole prepared graph as one unit: its
    submodules only hold parameters (the graph reads them with get_attr, it never calls
    them), so per-block fully_shard would never run their all-gather hooks."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(prepared, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        return fully_shard(prepared, mesh=init_device_mesh(device.type, (world,)))
    return prepared


def full_state_dict(model, strategy: str) -> dict:
    if strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # collective: every rank takes part, rank 0 gets the full tensors
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return (model.module if strategy == "ddp" else model).state_dict()


def main(argv=None) -> list[float]:
    args = parse_args(argv)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    rank, world, device = setup(args.strategy)
    if args.batch % (world * args.micro_batches):
        raise SystemExit(f"--batch {args.batch} must split evenly over {world} ranks x {args.micro_batches} micro-batches")
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(args.group_size)

    def fresh_prepared():
        torch.manual_seed(0)  # the same initial weights on every rank
        example = global_batch(0, 2, 8)[:, :-1].to(device)
        return qatfx.prepare_pt2e(byte_lm(max(args.seq, 8)).to(device).train(), quantizer, (example,))

    prepared = fresh_prepared()
    schedule = qatfx.FakeQuantAfterNSteps(prepared, args.fake_quant_after)  # the graph changes before wrapping
    model = wrap(prepared, args.strategy, device, world)
    forward = model if args.eager else torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    rows = args.batch // world
    parts = args.micro_batches
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        batch = global_batch(step, args.batch, args.seq)[rank * rows : (rank + 1) * rows].to(device)
        loss = torch.zeros((), device=device)
        for part in batch.chunk(parts):
            # mean over the part, divided by the parts: the gradient of the global mean
            part_loss = loss_fn(forward(part[:, :-1]), part) / parts
            part_loss.backward()
            loss += part_loss.detach()
        opt.step()
        opt.zero_grad()
        schedule.step()
        if world > 1:  # the global batch's loss: the mean of the ranks' equal-sized means
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
        if rank == 0:
            print(f"step {step}  loss {loss.item():.6f}", flush=True)
    if rank == 0:
        print(f"{args.strategy}: {world} rank(s), {'eager' if args.eager else 'compiled'}, {time.perf_counter() - start:.1f} s")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"strategy": args.strategy, "world": world, "compiled": not args.eager, "losses": losses}, f)

    if args.save:
        state = full_state_dict(model, args.strategy)
        if rank == 0:
            final = fresh_prepared()
            final.load_state_dict(state)
            qatfx.save(qatfx.convert_pt2e(final.eval()), args.save)
            print(f"converted model saved to {args.save}")
    if world > 1:
        # Wait for rank 0's save: a rank that tears down gloo while another still works can
        # abort at exit ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
