"""Per-rank memory of FSDP2 QAT: the whole prepared graph sharded as one unit against a region
capture (`prepare_pt2e(..., regions="auto")`) sharded per decoder block, on 2 gloo ranks (CPU).

    python benchmarks/bench_fsdp_memory.py                 # 8 layers, dim 512 (~50 s on 2 cores)
    python benchmarks/bench_fsdp_memory.py --quick         # smoke run, tiny model

Each mode runs in 2 fresh spawned processes (one thread each). Every rank builds the same toy
Llama (qatfx.recipes.model.CausalLM, seed 0), prepares it with Int8DynActInt4WeightQuantizer,
drops its own reference to the float model, shards, trains one warm-up step (forward,
backward, AdamW step: the optimizer state exists from then on), then measures one forward +
backward on its half of a fixed global batch. Modes:

  whole graph, 1 unit        prepare_pt2e(model, q, ex); fully_shard(prepared)
  regions, per layer         prepare_pt2e(model, q, ex, regions="auto");
                             fully_shard(each graph_regions path: blocks.N, lm_head); fully_shard(root)

What is measured, per rank (nothing here is sampled):
  step peak   torch's FSDPMemTracker (torch.distributed._tools.fsdp2_mem_tracker), a
              TorchDispatchMode that adds up the sizes of the distinct tensor storages alive
              while it runs (module parameters and buffers, their gradients, optimizer state,
              FSDP's all-gather and reduce-scatter buffers, and every tensor the step makes),
              recording the maximum of that sum over the forward + backward. Columns: its
              total, and at that moment the unsharded parameters, the all-gather buffers (FSDP2
              keeps a forward all-gather's flat output until the next all-gather, for overlap)
              and the activations.
              Tensors made before the tracker starts and held by nothing it tracks are not
              in it (the "at rest" column counts them).
  at rest     the sum of the sizes of the distinct storages of every tensor the garbage
              collector can see (gc.get_objects()), after the warm-up step: all tensor memory
              the process holds between steps, including tensors no module owns.
  RSS delta   the process's resident-set high-water mark during the forward + backward minus
              its resident set just before (Linux: the mark is reset by writing 5 to
              /proc/self/clear_refs, read as VmHWM in /proc/self/status). Includes the
              allocator's behaviour: memory freed before the step and kept by malloc is reused
              without growing the RSS, so this can be below the tracked peak's growth.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qatfx  # noqa: E402
from qatfx.graph.regions import graph_regions  # noqa: E402
from qatfx.recipes.model import CausalLM, LMConfig  # noqa: E402

WORLD = 2
MODES = {
    "whole": "whole graph, 1 unit",
    "regions": "regions, per layer",
}
MIB = 2.0**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1536, help="SwiGLU width")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences), split over the 2 ranks")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, dim 64, seq 32")
    p.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.dim, args.heads, args.hidden, args.vocab, args.seq = 2, 64, 4, 128, 128, 32
    args.modes = args.modes.split(",")
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        p.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    if args.batch % WORLD:
        p.error(f"--batch {args.batch} must split evenly over {WORLD} ranks")
    return args


def config(args) -> LMConfig:
    return LMConfig(vocab_size=args.vocab, dim=args.dim, layers=args.layers, heads=args.heads, hidden=args.hidden, max_seq=args.seq)


def global_batch(args, seed: int) -> torch.Tensor:
    return torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(seed))


def tensor_bytes_alive() -> int:
    """Sizes of the distinct storages of every tensor object the garbage collector tracks
    (fake tensors, which export leaves in graph metadata, hold no memory and are skipped)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance on torch's deprecated module proxies warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if not obj.is_meta:
            if hasattr(obj, "to_local"):  # a DTensor: its storage is its local shard's
                obj = obj.to_local()
            try:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # fake and functional tensors: no data
                continue
    return sum(storages.values())


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_rss_peak() -> int:
    """Reset the resident-set high-water mark to the current resident set; returns it (bytes)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def prepare(args, mode: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    model = CausalLM(config(args)).train()
    example = global_batch(args, 0)[:2, :8]
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(args.group_size)
    prepared = qatfx.prepare_pt2e(model, quantizer, (example,), regions=None if mode == "whole" else "auto")
    return prepared  # `model` (the float model object) goes out of scope here


def shard(prepared: torch.nn.Module, mode: str, mesh) -> list[str]:
    """fully_shard per region, then the root; returns the FSDP units' paths ("" is the root)."""
    from torch.distributed.fsdp import fully_shard

    units = [] if mode == "whole" else [path for path, _ in graph_regions(prepared)]
    for path in units:
        fully_shard(prepared.get_submodule(path), mesh=mesh)
    fully_shard(prepared, mesh=mesh)
    return units + [""]


def forward_backward(model, batch, vocab: int) -> None:
    loss = F.cross_entropy(model(batch[:, :-1]).reshape(-1, vocab), batch[:, 1:].reshape(-1))
    loss.backward()


def rank_main(rank: int, args, mode: str, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)  # 2 ranks on 2 cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        prepared = prepare(args, mode)
        units = shard(prepared, mode, mesh)
        opt = torch.optim.AdamW(prepared.parameters(), lr=1e-4)
        rows = slice(rank * args.batch // WORLD, (rank + 1) * args.batch // WORLD)

        forward_backward(prepared, global_batch(args, 1)[rows], args.vocab)  # warm-up step
        opt.step()
        opt.zero_grad()

        at_rest = tensor_bytes_alive()
        batch = global_batch(args, 2)[rows]
        tracker = FSDPMemTracker(prepared, opt)
        tracker.track_inputs((batch,))
        rss_before = reset_rss_peak()
        with tracker:
            forward_backward(prepared, batch, args.vocab)
        rss_delta = _status_kib("VmHWM") * 1024 - rss_before
        (peak,) = tracker.get_tracker_snapshot("peak").values()  # one device: cpu
        by_name = {getattr(k, "value", k): v for k, v in peak.items()}
        result = {
            "rank": rank,
            "units": units,
            "peak_total": by_name["Total"],
            "peak_unsharded_params": by_name["Unsharded Param"],
            "peak_all_gather": by_name["All Gather"],
            "peak_activations": by_name["Activation"],
            "at_rest": at_rest,
            "rss_delta": rss_delta,
        }
        results = [None] * WORLD
        dist.all_gather_object(results, result)
        if rank == 0:
            Path(out).write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_mode(args, mode: str) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        mp.start_processes(rank_main, args=(args, mode, str(Path(tmp) / "store"), str(out)), nprocs=WORLD, start_method="spawn")
        return json.loads(out.read_text())


def table(results: dict[str, list[dict]]) -> str:
    headers = [
        "mode", "rank", "FSDP units", "step peak (MiB)", "vs whole", "unsharded params at peak (MiB)", "vs whole",
        "all-gather bufs at peak (MiB)", "activations at peak (MiB)", "at rest (MiB)", "vs whole", "RSS delta (MiB)",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    base = {r["rank"]: r for r in results.get("whole", [])}

    def ratio(r, key):
        b = base.get(r["rank"])
        return f"{r[key] / b[key]:.2f}" if b and b[key] else "-"

    for mode, rows in results.items():
        for r in rows:
            cells = [
                MODES[mode], str(r["rank"]), str(len(r["units"])),
                f"{r['peak_total'] / MIB:.1f}", ratio(r, "peak_total"),
                f"{r['peak_unsharded_params'] / MIB:.1f}", ratio(r, "peak_unsharded_params"),
                f"{r['peak_all_gather'] / MIB:.1f}", f"{r['peak_activations'] / MIB:.1f}",
                f"{r['at_rest'] / MIB:.1f}", ratio(r, "at_rest"),
                f"{r['rss_delta'] / MIB:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = config(args)
    n_params = sum(p.numel() for p in CausalLM(cfg).parameters())
    header = (
        f"toy Llama {args.layers} layers, dim {args.dim}, hidden {args.hidden}, vocab {args.vocab}: "
        f"{n_params / 1e6:.1f}M fp32 parameters ({n_params * 4 / MIB:.1f} MiB); global batch {args.batch} x {args.seq} "
        f"tokens over {WORLD} gloo ranks (CPU, 1 thread each); 8da4w G={args.group_size}; torch {torch.__version__}"
    )
    print(header, flush=True)
    results = {}
    for mode in args.modes:
        start = time.perf_counter()
        results[mode] = run_mode(args, mode)
        print(f"{MODES[mode]}: {time.perf_counter() - start:.0f} s", flush=True)
    text = table(results)
    print(text)
    if args.out:
        args.out.write_text(f"{header}\n\n{text}\n")


if __name__ == "__main__":
    main()
