"""CPU serving benchmark: prefill and decode speed, file size and peak memory of a small
Llama-style Hugging Face model served four ways, in one run.

    python benchmarks/bench_cpu_serving.py            # hidden 512, 6 layers, vocab 4096: a few minutes on 2 cores
    python benchmarks/bench_cpu_serving.py --quick    # smoke run: hidden 128, 2 layers, short prompt

Rows (all greedy, batch 1, fp32 activations):
  float eager     the transformers model itself, its DynamicCache              the 1.00x baseline
  qatfx eager     qatfx.convert_pt2e(prepare_pt2e(model, 8da4w g32 bf16 scales, regions="auto")),
                  eager (dequantize + F.linear per linear), the same DynamicCache
  float .pte      qatfx.export.executorch_generate(model, allow_float=True): XNNPACK fp32,
                  transformers' static KV cache
  8da4w .pte      qatfx.export.executorch_generate(converted): XNNPACK int8 dynamic x int4 group

The weights are the config's random initialization (no training: speed and size do not
depend on the values). Every row computes logits for every prompt position at prefill, as
transformers' exportable wrapper does, and one position per decode step.

Correctness first: the float .pte must match float eager, and the 8da4w .pte the qatfx
eager model, on the prompt and on --check-steps decode steps fed the same tokens (relative
RMS of the logits, tolerances below); a failed check exits non-zero without timing.

Timing: the export and check run in one child process, each row in a fresh one: build or
load the model, one untimed prefill + decode, then --repeats times: the prefill of the
prompt timed once, then the greedy decode steps timed together (argmax included); medians
over the repeats.
Memory, per row process (VmRSS in /proc/self/status): the resident set after the imports
(torch, transformers, qatfx, the ExecuTorch runtime: the same for every row), after the
model is built (eager rows) or the .pte loaded, and its high-water mark during the timed
runs (VmHWM, reset to the current RSS by writing "5" to /proc/self/clear_refs just before).
The qatfx row also holds heap its prepare/convert freed but did not return to the system.
File size: the .pte's bytes; for the eager rows the bytes of the state_dict's tensors
(each storage once).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

from report import device_name, format_table, git_sha  # noqa: E402  (benchmarks/report.py)

RESULTS = Path(__file__).resolve().parent / "results"
GROUP = 32
SEED = 0
# Logits of the .pte against the eager model it was exported from, relative RMS:
# - float: fp32 both sides, the same math in XNNPACK's order: ~1e-6 (measured 1.3e-6); 1e-4.
# - 8da4w: a fraction of the quantization's own effect (the qatfx model against the float
#   one, printed). The int8 x int4 products are the same (convert's codes), but the lowered
#   graph quantizes activations with quantized_decomposed's float64 arithmetic (XNNPACK
#   matches it to 1e-7) where training used float32: a value within float32 rounding of a .5
#   tie takes the neighbouring code. Measured on this model: a few codes in 128 x 43 token x
#   linear inputs, one flip moving its token's linear output by ~1e-3, and through attention
#   every later position: 1.5e-2 relative RMS at the logits. A wrong cache position, scale or
#   mask moves the logits by the quantization effect or more, so 0.2 x that effect still
#   separates them.
RTOL = {"float": 1e-4}
QUANT_FRACTION = 0.2


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    prompt: int
    new: int


SIZES = {
    # ~22M parameters (42 decoder linears 17.7M, lm_head 2.1M, embeddings 2.1M): 88 MB in fp32
    "default": Size(hidden=512, layers=6, heads=8, kv_heads=4, mlp=1408, vocab=4096, prompt=128, new=128),
    "quick": Size(hidden=128, layers=2, heads=4, kv_heads=2, mlp=256, vocab=512, prompt=16, new=16),
}


def build_float(size: Size):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.mlp, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, head_dim=size.hidden // size.heads,
        max_position_embeddings=size.prompt + size.new, tie_word_embeddings=False, attn_implementation="sdpa",
        use_cache=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(SEED)
    return transformers.LlamaForCausalLM(config).eval()


def build_converted(size: Size, model=None):
    import qatfx

    model = build_float(size) if model is None else model
    quantizer = qatfx.Int8DynActInt4WeightQuantizer(group_size=GROUP, scales_precision=torch.bfloat16)
    example = prompt_ids(size)[:, :8]
    prepared = qatfx.prepare_pt2e(model, quantizer, (example,), regions="auto")
    return qatfx.convert_pt2e(prepared.eval()).eval()


def prompt_ids(size: Size) -> torch.Tensor:
    return torch.randint(3, size.vocab, (1, size.prompt), generator=torch.Generator().manual_seed(1))


def state_dict_bytes(model: torch.nn.Module) -> int:
    storages = {}
    for t in model.state_dict(keep_vars=True).values():
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


# ---- the two engines: eager torch with the model's DynamicCache, and a .pte -----------------


class EagerEngine:
    def __init__(self, model) -> None:
        self.model, self.cache = model, None

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True)
        self.cache = out.cache
        return out.logits[0, -1]

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([[token]]), cache=self.cache, use_cache=True)
        self.cache = out.cache
        return out.logits[0, -1]


def make_engine(row: str, size: Size, workdir: Path):
    if row == "float eager":
        return EagerEngine(build_float(size)), None
    if row == "qatfx eager":
        converted = build_converted(size)
        return EagerEngine(converted), state_dict_bytes(converted)
    from qatfx.export import PteDecoder

    path = workdir / PTE_FILES[row]
    return PteDecoder(path), path.stat().st_size


PTE_FILES = {"float .pte": "float.pte", "8da4w .pte": "8da4w.pte"}
ROWS = ["float eager", "qatfx eager", "float .pte", "8da4w .pte"]


# ---- one row, in its own process --------------------------------------------------------------


def peak_rss_reset() -> None:
    """Set the resident-set high-water mark to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def set_threads(threads: int) -> dict:
    """The same number of threads for torch's intra-op pool and ExecuTorch's (XNNPACK's) pool."""
    from executorch.extension.pybindings import portable_lib

    torch.set_num_threads(threads)
    portable_lib._unsafe_reset_threadpool(threads)
    return {"torch_threads": torch.get_num_threads(), "executorch_threads": portable_lib._threadpool_get_thread_count()}


def run_row(row: str, size: Size, workdir: Path, repeats: int, threads: int) -> dict:
    import executorch.runtime  # noqa: F401  every row imports the same libraries before it builds
    import transformers  # noqa: F401

    import qatfx.export  # noqa: F401

    pools = set_threads(threads)
    imports_kib = status_kib("VmRSS")
    engine, nbytes = make_engine(row, size, workdir)
    if nbytes is None:
        nbytes = state_dict_bytes(engine.model)
    gc.collect()
    peak_rss_reset()
    loaded_kib = status_kib("VmRSS")
    ids = prompt_ids(size)

    def decode(logits, steps):
        for _ in range(steps):
            logits = engine.step(int(logits.argmax()))
        return logits

    decode(engine.prefill(ids), 4)  # untimed: first-call allocations, thread pools
    prefill_s, decode_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = engine.prefill(ids)
        t1 = time.perf_counter()
        decode(logits, size.new)
        t2 = time.perf_counter()
        prefill_s.append(t1 - t0)
        decode_s.append(t2 - t1)
    return {
        "row": row, "bytes": nbytes, **pools,
        "prefill_tok_s": size.prompt / statistics.median(prefill_s),
        "decode_tok_s": size.new / statistics.median(decode_s),
        "decode_spread": (max(decode_s) - min(decode_s)) / statistics.median(decode_s),
        "imports_mib": imports_kib / 1024, "loaded_mib": loaded_kib / 1024, "peak_mib": status_kib("VmHWM") / 1024,
    }


# ---- the parent: export, check, spawn one process per row, print the table ------------------


def export_ptes(size: Size, workdir: Path):
    import qatfx.export

    float_model = build_float(size)
    converted = build_converted(size, float_model)
    max_seq_len = size.prompt + size.new
    reports = {}
    for row, model, float_ok in (("float .pte", float_model, True), ("8da4w .pte", converted, False)):
        t0 = time.perf_counter()
        reports[row] = qatfx.export.executorch_generate(
            model, workdir / PTE_FILES[row], max_seq_len=max_seq_len, max_prompt_len=size.prompt, allow_float=float_ok
        )
        print(f"exported {row} in {time.perf_counter() - t0:.0f} s: {reports[row]}", flush=True)
    return float_model, converted, reports


def check(size: Size, workdir: Path, float_model, converted, steps: int) -> list[str]:
    """Teacher-forced logits of each .pte against its eager model; the lines for the header."""
    from qatfx.export import PteDecoder

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    def logits(engine, tokens):
        out = [engine.prefill(prompt_ids(size))]
        return torch.stack(out + [engine.step(t) for t in tokens])

    # the tokens: float eager's greedy path; every engine is fed the same ones
    tokens, engine = [], EagerEngine(float_model)
    out = engine.prefill(prompt_ids(size))
    for _ in range(steps):
        tokens.append(int(out.argmax()))
        out = engine.step(tokens[-1])
    float_ref = logits(EagerEngine(float_model), tokens)
    qat_ref = logits(EagerEngine(converted), tokens)
    quant_effect = rel(qat_ref, float_ref)
    lines, failed = [f"quantization effect: qatfx eager vs float eager logits rel. RMS {quant_effect:.1e}"], False
    print(lines[0], flush=True)
    for row, ref, tol in (("float .pte", float_ref, RTOL["float"]), ("8da4w .pte", qat_ref, QUANT_FRACTION * quant_effect)):
        got = logits(PteDecoder(workdir / PTE_FILES[row]), tokens)
        err = rel(got, ref)
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        ok = err < tol
        failed |= not ok
        lines.append(f"{row} vs its eager model, prefill + {steps} steps: logits rel. RMS {err:.1e} (tolerance {tol:.1e}), "
                     f"argmax agreement {agree:.0%} {'ok' if ok else 'FAILED'}")
        print(lines[-1], flush=True)
    if failed:
        sys.exit("correctness check failed: nothing timed")
    return lines


def export_and_check(size: Size, workdir: Path, steps: int) -> dict:
    float_model, converted, _ = export_ptes(size, workdir)
    return {"checks": check(size, workdir, float_model, converted, steps)}


def spawn(phase: str, args, workdir: Path) -> dict:
    """Run `phase` (the export and check, or one row) in a fresh process; its last stdout line
    is JSON. Everything that computes runs in a child: threads an earlier phase left in this
    process (torch's OpenMP pool, XNNPACK's) would compete for the 2 cores (measured: eager
    decode 100x slower beside an idle parent that had run the export)."""
    cmd = [sys.executable, __file__, "--phase", phase, "--workdir", str(workdir), "--repeats", str(args.repeats),
           "--check-steps", str(args.check_steps), "--threads", str(args.threads)]
    cmd += ["--quick"] if args.quick else []
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = out.stdout.strip().splitlines()
    print("\n".join(lines[:-1] if out.returncode == 0 else lines), flush=True)  # the child's progress
    if out.returncode != 0:
        sys.exit(f"{phase!r} failed (exit {out.returncode})")
    return json.loads(lines[-1])


def table(results: list[dict]) -> str:
    base = results[0]
    rows = []
    for r in results:
        rows.append({
            "variant": r["row"],
            "prefill tok/s": f"{r['prefill_tok_s']:.0f}", "x": f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x",
            "decode tok/s": f"{r['decode_tok_s']:.1f}", "x ": f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x",
            "spread": f"{r['decode_spread']:.0%}",
            "file bytes": f"{r['bytes']:,}", "x  ": f"{r['bytes'] / base['bytes']:.3f}x",
            "RSS imports MiB": f"{r['imports_mib']:.0f}", "RSS loaded MiB": f"{r['loaded_mib']:.0f}",
            "peak RSS MiB": f"{r['peak_mib']:.0f}", "x   ": f"{r['peak_mib'] / base['peak_mib']:.2f}x",
        })
    return format_table(rows, list(rows[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, seconds per row: a smoke run")
    parser.add_argument("--device", choices=["cpu"], default="cpu", help="CPU only (the smoke-run convention of the other scripts)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and ExecuTorch threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--phase", choices=["export", *ROWS], help=argparse.SUPPRESS)  # internal: a child's job
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "default"]

    if args.phase == "export":
        print(json.dumps(export_and_check(size, args.workdir, args.check_steps)))
        return
    if args.phase:
        print(json.dumps(run_row(args.phase, size, args.workdir, args.repeats, args.threads)))
        return

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checks = spawn("export", args, workdir)["checks"]
        results = []
        for row in ROWS:
            results.append(spawn(row, args, workdir))
            print(f"{row}: {results[-1]}", flush=True)
    by_row = {r["row"]: r for r in results}
    headline = (
        f"headline: 8da4w .pte decode {by_row['8da4w .pte']['decode_tok_s'] / by_row['float eager']['decode_tok_s']:.2f}x "
        f"float eager; 8da4w .pte bytes {by_row['8da4w .pte']['bytes'] / by_row['float .pte']['bytes']:.3f}x float .pte"
    )
    command = "python benchmarks/bench_cpu_serving.py" + (" --quick" if args.quick else "") + (
        f" --repeats {args.repeats}" if args.repeats != 3 else "") + (f" --threads {args.threads}" if args.threads != os.cpu_count() else "")
    pools = sorted({(r["torch_threads"], r["executorch_threads"]) for r in results})
    header = [
        f"# CPU serving: {size.layers} layers, hidden {size.hidden}, {size.heads} heads ({size.kv_heads} kv), "
        f"MLP {size.mlp}, vocab {size.vocab}; prompt {size.prompt} tokens, {size.new} decode steps, batch 1",
        "",
        f"- device: {device_name('cpu')}",
        f"- torch {torch.__version__}, executorch {_version('executorch')}, transformers {_version('transformers')}; "
        f"git {git_sha()}; {datetime.datetime.now().isoformat(timespec='minutes')}; total {time.perf_counter() - started:.0f} s",
        f"- command: `{command}`; threads per row (torch, ExecuTorch): {', '.join(map(str, pools))}",
        *(f"- check: {line}" for line in checks),
        "- tok/s: medians over the repeats; spread: (max - min) / median of the decode times; "
        "RSS: resident set after the imports, after building the model or loading the .pte, and its high-water mark "
        "during the timed runs (fresh process per row)",
        f"- {headline}",
        "",
    ]
    text = "\n".join(header) + "\n" + table(results) + "\n"
    print(text)
    out = args.out or RESULTS / ("cpu_serving_quick.md" if args.quick else "cpu_serving.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def _version(package: str) -> str:
    from importlib.metadata import version

    try:
        return version(package)
    except Exception:
        return "unknown"


if __name__ == "__main__":
    main()
