"""The `qatfx` command (also `python -m qatfx`).

    qatfx demo [--preset tiny|default|full] [--seeds N] [--text FILE] [--out DIR] [--export executorch,gguf,hf]
    qatfx finetune --model HF_DIR|builtin:charlm --text FILE --out DIR [--group-size G] ...
    qatfx eval --model OUT|HF_DIR|builtin:charlm --text FILE [--seq-len N]
    qatfx eval --model OUT|HF_DIR|builtin:charlm --tasks T1,T2 [--text CORPUS] [--include-path DIR] [--limit N] [--batch-size B] [--out FILE.json]
    qatfx export --format executorch --model DIR --out FILE.pte [--min-agreement X] [--max-relative-error E] [--no-verify]
    qatfx export --format gguf --model DIR --out FILE.gguf [--embeddings q8_0|f16|f32] [--output ...] [--allow-rounding] [--no-verify]
    qatfx export --format hf --model DIR --out OUT_DIR [--dtype D] [--quantize-lm-head] [--weight-only] [--no-verify]
    qatfx verify FILE.pte --model DIR [--min-agreement X] [--max-relative-error E]

Bad arguments (a missing or non-text file, a group size that does not divide the model's
linear sizes, a directory that holds no converted model) are reported before any work
starts, with exit code 2. A .pte that fails verification exits with 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from qatfx.presets import PRESETS as PRESET_NAMES


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1] (0.9: 90% of positions), got {value}")
    return number


def _non_negative(value: str) -> float:
    number = float(value)
    if not number >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0.1: 10% relative logit error), got {value}")
    return number


def _comma_separated(value: str) -> tuple:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _chosen_from(value: str, known, choose: str) -> tuple:
    """The comma-separated names in `value`, each one of `known` (at least one)."""
    names = _comma_separated(value)
    if not names or any(n not in known for n in names):
        raise argparse.ArgumentTypeError(f"{value!r}: choose {choose}")
    return names


def _names(what: str, example: str):
    """An argparse type: a non-empty comma-separated list of `what`."""

    def parse(value: str) -> tuple:
        names = _comma_separated(value)
        if not names:
            raise argparse.ArgumentTypeError(f"{value!r}: give comma-separated {what}, e.g. {example}")
        return names

    return parse


_lm_eval_tasks = _names("lm-eval task names", "qatfx_heldout_ppl,hellaswag")
_patterns = _names("layer name patterns", "'*.q_proj,*.v_proj'")


def _limit(value: str) -> float:
    number = float(value)
    if not number > 0 or (number >= 1 and not number.is_integer()):
        raise argparse.ArgumentTypeError(f"must be a whole number of documents >= 1 or a fraction in (0, 1), got {value}")
    return int(number) if number >= 1 else number


def _rows(value: str) -> tuple:
    from qatfx.recipes.demo import SCHEMES

    return _chosen_from(value, SCHEMES, f"comma-separated rows from: {'; '.join(SCHEMES)}")


def _lora_options(args: argparse.Namespace) -> dict:
    return {"lora_alpha": args.lora_alpha, "lora_mode": args.lora_mode, "lora_targets": args.lora_targets}


def _export_formats(value: str) -> tuple:
    from qatfx.recipes.deploy import FILE_FORMATS

    known = ("executorch", *FILE_FORMATS)
    return _chosen_from(value, known, f"a comma-separated subset of {', '.join(known)}")


def _add_thresholds(command: argparse.ArgumentParser) -> None:
    from qatfx.export.verify import DEFAULT_MAX_RELATIVE_ERROR, DEFAULT_MIN_NEXT_TOKEN_AGREEMENT

    command.add_argument("--min-agreement", type=_fraction, default=DEFAULT_MIN_NEXT_TOKEN_AGREEMENT,
                         help=f"least next-token (argmax) agreement with the converted model (default {DEFAULT_MIN_NEXT_TOKEN_AGREEMENT})")
    command.add_argument("--max-relative-error", type=_non_negative, default=None,
                         help=f"largest ||exported - converted|| / ||converted|| of the logits (default: {DEFAULT_MAX_RELATIVE_ERROR} "
                              "for a .pte; hf: the float accumulation bound, derived from the model's sizes)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qatfx", description="Quantization-aware training (8da4w) for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="QAT vs PTQ on an embedded corpus, with a float control")
    demo.add_argument("--preset", choices=("tiny", "default", "full"), default="default")
    demo.add_argument("--seeds", type=_positive_int, default=1, help="fine-tuning seeds; reports mean and spread")
    demo.add_argument("--rows", type=_rows, default=None, metavar="ROWS",
                      help="comma-separated table rows instead of the preset's, e.g. \"int4 g32,llama_cpp_q4_0 preset\" "
                      "(a wrong name lists them)")
    demo.add_argument("--text", type=Path, help="your own UTF-8 text file instead of the embedded corpus")
    demo.add_argument("--out", type=Path, default=Path("qatfx_demo"), help="report directory (default: qatfx_demo)")
    demo.add_argument("--cache-dir", type=Path, help="corpus and float-model cache (default: $QATFX_CACHE_DIR or ~/.cache/qatfx)")
    demo.add_argument("--no-export", action="store_true", help="skip the last step: the int4 g32 QAT model as a verified ExecuTorch .pte")
    demo.add_argument("--export", type=_export_formats, default=("executorch",), metavar="FORMATS",
                      help="the last step's formats, comma-separated: executorch (default), gguf, hf")

    finetune = commands.add_parser("finetune", help="QAT-fine-tune your causal LM on your text (and a float control, for the same steps), then convert")
    finetune.add_argument("--model", required=True, help="a transformers checkpoint directory, or builtin:charlm")
    finetune.add_argument("--text", type=Path, required=True, help="UTF-8 text file (last 5%% held out for test)")
    finetune.add_argument("--out", type=Path, required=True, help="output directory: the converted model (qatfx.save format), its tokenizer, the report")
    finetune.add_argument("--preset", choices=tuple(PRESET_NAMES), default=None,
                          help="a per-layer deploy scheme from qatfx.presets instead of 8da4w everywhere "
                          "(--group-size applies where the preset takes one)")
    finetune.add_argument("--group-size", type=_positive_int, default=None, help="weight group size (default 32; a preset's own)")
    finetune.add_argument("--scales-precision", choices=("float32", "bfloat16"), default="float32",
                          help="weight scale dtype; bfloat16 exports without rounding to ExecuTorch, GGUF and HF (bf16)")
    finetune.add_argument("--steps", type=_positive_int, default=100)
    finetune.add_argument("--lr", type=float, default=1e-4)
    finetune.add_argument("--fake-quant-after", type=int, default=0, help="train in float for N < --steps steps first (torchtune's fake_quant_after_n_steps)")
    finetune.add_argument("--batch-size", type=_positive_int, default=8)
    finetune.add_argument("--seq-len", type=_positive_int, default=128)
    finetune.add_argument("--lora-rank", type=_positive_int,
                          help="QAT+LoRA: train only rank-R adapters on the frozen base, merged before convert (default: full QAT)")
    finetune.add_argument("--lora-alpha", type=float, help="adapter scale alpha / rank (default alpha: 2 x rank)")
    finetune.add_argument("--lora-mode", choices=("merge_consistent", "torchtune"),
                          help="merge_consistent trains fq(W + sBA), exactly what is deployed; torchtune trains fq(W) + sBA (docs/lora.md)")
    finetune.add_argument("--lora-targets", type=_patterns, default=None, metavar="PATTERNS",
                          help="comma-separated fnmatch layer names (default: the Llama q/v/o/gate/up/down projections)")
    finetune.add_argument("--distill", action="store_true",
                          help="QAT learns from the float model before fine-tuning too: (1 - W) x cross-entropy + W x KL "
                          "distillation (the float control keeps cross-entropy); docs/distillation.md")
    finetune.add_argument("--kd-weight", type=float, default=None, metavar="W",
                          help="--distill: the distillation term's weight W in [0, 1] (default 0.5; 1: distillation only)")
    finetune.add_argument("--learnable-scales", action="store_true",
                          help="QAT trains its weight scales (LSQ), stored as trained; docs/learnable_scales.md")
    finetune.add_argument("--scale-lr", type=float, default=None, metavar="LR",
                          help="--learnable-scales: the scales' peak learning rate (default: --lr)")
    finetune.add_argument("--temperature", type=float, default=None, metavar="T",
                          help="--distill: softmax temperature T > 0 of both distributions (default 1.0)")
    finetune.add_argument("--eager", action="store_true", help="train without torch.compile (debugging, tiny models)")

    evaluate = commands.add_parser("eval", help="test perplexity of a finetune output (or a float model) on a text file (--text), "
                                   "or lm-evaluation-harness tasks (--tasks)")
    evaluate.add_argument("--model", required=True,
                          help="a `qatfx finetune` output directory, a transformers directory (an HF export too), or builtin:charlm")
    evaluate.add_argument("--text", type=Path,
                          help="alone: the text whose perplexity is printed; with --tasks: the corpus whose test split "
                          "(the last 5%%, held out by finetune) builds the qatfx_heldout_ppl / qatfx_heldout_choice tasks")
    evaluate.add_argument("--seq-len", type=_positive_int,
                          help="window length (default: the finetune output's, else 128; --tasks: else the model's max_position_embeddings)")
    evaluate.add_argument("--tasks", type=_lm_eval_tasks, metavar="TASKS",
                          help="comma-separated lm-evaluation-harness tasks instead of --text's perplexity: qatfx_heldout_ppl, "
                          "qatfx_heldout_choice (from --text, offline), hellaswag, wikitext, ... (pip install 'qatfx[eval]'; docs/lm_eval.md)")
    evaluate.add_argument("--include-path", type=Path, action="append", default=[], metavar="DIR",
                          help="--tasks: a folder of your own lm-eval task YAML files (repeatable)")
    evaluate.add_argument("--limit", type=_limit, help="--tasks: at most N documents per task (a number below 1: that fraction of each)")
    evaluate.add_argument("--batch-size", type=_positive_int, help="--tasks: requests of equal length run together (default 1)")
    evaluate.add_argument("--tokenizer", type=Path,
                          help="--tasks: the tokenizer of a model directory that has none: a `qatfx finetune` output "
                          "(e.g. the one an HF export of builtin:charlm came from) or a transformers tokenizer directory")
    evaluate.add_argument("--out", type=Path, help="--tasks: also write lm-eval's results as JSON to this file")

    export = commands.add_parser("export", help="write a converted model for a serving runtime (ExecuTorch .pte, llama.cpp GGUF) and verify it")
    export.add_argument("--format", choices=(*EXPORT_SUFFIXES, "hf"), default="executorch")
    export.add_argument("--model", type=Path, required=True, help="a qatfx.save directory or a `qatfx finetune` output (gguf: a finetune output)")
    export.add_argument("--out", type=Path, required=True, help="the file to write (.pte, .gguf), or (hf) the directory")
    export.add_argument("--no-verify", action="store_true", help="skip checking the written file against the converted model")
    export.add_argument("--embeddings", choices=("q8_0", "f16", "f32"), default="q8_0", help="gguf: a float embedding table's type")
    export.add_argument("--output", choices=("q8_0", "f16", "f32"), default="q8_0", help="gguf: a float output head's type")
    export.add_argument("--allow-rounding", action="store_true",
                       help="gguf: write layers whose trained grid GGUF cannot hold (rounded), reporting how many weights moved")
    export.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="hf: the checkpoint's dtype (default: the model's)")
    export.add_argument("--quantize-lm-head", action="store_true",
                        help="hf: pack a quantized lm_head as int4 (default: its dequantized grid in float, which every vLLM loads)")
    export.add_argument("--weight-only", action="store_true", help="hf: refuse a model whose activation quantization the format drops (8da4w written as W4A16) instead of writing it")
    _add_thresholds(export)

    verify = commands.add_parser("verify", help="run a .pte in ExecuTorch's runtime and the converted model on held-out inputs; compare logits")
    verify.add_argument("pte", type=Path, help="the .pte file (from `qatfx export`)")
    verify.add_argument("--model", type=Path, required=True, help="the qatfx.save directory or `qatfx finetune` output it was exported from")
    _add_thresholds(verify)
    return parser


def _check_model_source(parser: argparse.ArgumentParser, model: str, command: str) -> None:
    from qatfx.recipes.finetune import BUILTIN_MODELS, is_finetune_output

    if model in BUILTIN_MODELS:
        return
    path = Path(model)
    if not path.is_dir():
        parser.error(f"--model {model}: not a directory; give a transformers checkpoint directory or one of {sorted(BUILTIN_MODELS)}")
    if command == "finetune" and is_finetune_output(path):
        parser.error(f"--model {model}: a `qatfx finetune` output (a converted model); finetune starts from a float "
                     "transformers checkpoint: pass the directory the first finetune started from")
    if not (path / "config.json").exists() and not (command == "eval" and is_finetune_output(path)):
        also = " or a `qatfx finetune` output (qatfx_manifest.json)" if command == "eval" else ""
        parser.error(f"--model {model}: no config.json; give a transformers save_pretrained directory{also}")


def _check_converted_dir(parser: argparse.ArgumentParser, model: Path) -> None:
    """export / verify take a converted model: a qatfx.save directory (a finetune output is one)."""
    from qatfx.recipes.finetune import MANIFEST, OLD_METADATA

    if not model.is_dir():
        parser.error(f"--model {model}: not a directory; give a qatfx.save directory or a `qatfx finetune` output")
    if (model / MANIFEST).exists():
        return
    if (model / OLD_METADATA).exists():
        parser.error(f"--model {model}: written by an older `qatfx finetune` (converted.pt), which this qatfx no longer reads; "
                     "re-run `qatfx finetune`")
    if (model / "config.json").exists():
        parser.error(f"--model {model}: a transformers checkpoint (a float model), not a converted one; run "
                     "`qatfx finetune` on it, or qatfx.save(qatfx.convert_pt2e(prepared), DIR), and export that directory")
    parser.error(f"--model {model}: no {MANIFEST}; give a directory written by qatfx.save or `qatfx finetune`")


EXPORT_SUFFIXES = {"executorch": ".pte", "gguf": ".gguf"}


def _check_export_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_converted_dir(parser, args.model)
    if args.command == "export" and args.format == "hf":
        if args.out.suffix in EXPORT_SUFFIXES.values() or args.out.is_file():
            parser.error(f"--out {args.out}: --format hf writes a directory (config.json, model.safetensors); give a directory path")
    elif args.command == "export" and args.out.suffix != EXPORT_SUFFIXES[args.format]:
        parser.error(f"--out {args.out}: give a file name ending in {EXPORT_SUFFIXES[args.format]} for --format {args.format}")
    if args.command == "verify" and not args.pte.is_file():
        parser.error(f"{args.pte}: no such .pte file; pass the file `qatfx export` wrote")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from qatfx.recipes.corpus import CorpusError, load_text
    from qatfx.serialization import SerializationError

    try:
        if getattr(args, "text", None) is not None:
            load_text(args.text)  # fail early on a missing, empty or binary file
        if args.command in ("finetune", "eval"):
            _check_model_source(parser, args.model, args.command)
        if args.command == "finetune" and args.lora_rank is None and any(v is not None for v in _lora_options(args).values()):
            parser.error("--lora-alpha / --lora-mode / --lora-targets configure LoRA adapters; add --lora-rank R to train them")
        if args.command in ("export", "verify"):
            _check_export_args(parser, args)
            return _export_or_verify(args)
        return _run(args)
    except (CorpusError, ValueError, SerializationError) as error:  # SerializationError: eval of a damaged save
        parser.error(str(error))  # exits with status 2
    return 2


def _export_or_verify(args: argparse.Namespace) -> int:
    """Exit 0: written / verified; 1: the .pte does not match the model; 2 (parser.error, via
    main): the export cannot run (executorch missing, lowering failed, unreadable .pte)."""
    import qatfx
    from qatfx.export import ExportError, VerificationError, executorch, held_out_inputs, verify_pte
    from qatfx.export.verify import DEFAULT_MAX_RELATIVE_ERROR
    from qatfx.serialization import default_example_inputs

    max_relative_error = DEFAULT_MAX_RELATIVE_ERROR if args.max_relative_error is None else args.max_relative_error
    thresholds = dict(min_next_token_agreement=args.min_agreement, max_relative_error=max_relative_error)
    try:
        model = qatfx.load(args.model)
        if args.command == "export" and args.format == "gguf":
            sys.stdout.write("\n".join(_export_gguf(model, args).lines()) + "\n")
        elif args.command == "export" and args.format == "hf":
            sys.stdout.write("\n".join(_export_hf(model, args).lines()) + "\n")
        elif args.command == "export":
            sys.stdout.write(f"{executorch(model, args.out, verify=not args.no_verify, **thresholds)}\n")
        else:
            example, kwargs = default_example_inputs(model)  # the inputs `qatfx export` exported with
            inputs = held_out_inputs(model, example, kwargs)
            sys.stdout.write(f"{verify_pte(args.pte, model, inputs, kwargs=kwargs, **thresholds)}\n")
        return 0
    except VerificationError as error:
        sys.stderr.write(f"qatfx {args.command}: verification FAILED\n{error}\n")
        return 1
    except ExportError as error:
        raise ValueError(str(error)) from error  # main reports it with exit code 2


def _export_gguf(model, args: argparse.Namespace):
    from qatfx.export import gguf
    from qatfx.recipes.finetune import export_context

    context = export_context(args.model)
    return gguf(
        model, args.out, config=context.config, vocabulary=context.vocabulary, tokenizer_dir=context.tokenizer_dir,
        embeddings=args.embeddings, output=args.output, allow_rounding=args.allow_rounding, verify=not args.no_verify,
    )


def _export_hf(model, args: argparse.Namespace):
    import torch

    from qatfx.export import hf
    from qatfx.recipes.finetune import export_context

    context = export_context(args.model)
    return hf(
        model, args.out, config=context.config, tokenizer_dir=context.tokenizer_dir,
        dtype=getattr(torch, args.dtype) if args.dtype else None, quantize_lm_head=args.quantize_lm_head,
        allow_activation_drop=not args.weight_only, verify=not args.no_verify,
        min_next_token_agreement=args.min_agreement, max_relative_error=args.max_relative_error,
    )


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from qatfx.recipes.demo import run_demo
        from qatfx.recipes.report import markdown_report, write_report

        result = run_demo(args.preset, args.seeds, args.text, args.cache_dir, export_dir=None if args.no_export else args.out,
                          export_formats=args.export, rows=args.rows)
        paths = write_report(result, args.out)
        sys.stdout.write(markdown_report(result) + "\n" + "\n".join(f"{k}: {p}" for k, p in paths.items()) + "\n")
        return 0
    if args.command == "finetune":
        from qatfx.recipes.finetune import FinetuneOptions, finetune

        options = FinetuneOptions(
            model=args.model, text=args.text, out=args.out, group_size=args.group_size, preset=args.preset,
            scales_precision=args.scales_precision, steps=args.steps,
            lr=args.lr, fake_quant_after=args.fake_quant_after, batch_size=args.batch_size, seq_len=args.seq_len,
            compile=not args.eager, lora_rank=args.lora_rank,
            distill=args.distill, kd_weight=args.kd_weight, temperature=args.temperature,
            learnable_scales=args.learnable_scales, scale_lr=args.scale_lr,
            **{name: value for name, value in _lora_options(args).items() if value is not None},
        )
        report = finetune(options)
        sys.stdout.write((args.out / "report.md").read_text())
        return 0 if report else 1
    return _eval(args)


def _eval(args: argparse.Namespace) -> int:
    """--text alone: the file's perplexity; --tasks: lm-eval's table (docs/lm_eval.md)."""
    if args.tasks is None:
        task_only = [flag for flag, value in (("--include-path", args.include_path), ("--limit", args.limit),
                     ("--batch-size", args.batch_size), ("--tokenizer", args.tokenizer), ("--out", args.out)) if value]
        if args.text is None:
            raise ValueError("eval: give --text FILE (that file's perplexity) or --tasks TASKS (lm-evaluation-harness tasks, "
                             "e.g. --tasks qatfx_heldout_ppl,qatfx_heldout_choice --text CORPUS)")
        if task_only:
            raise ValueError(f"{', '.join(task_only)} configure lm-eval tasks; add --tasks TASKS, or drop them")
        from qatfx.recipes.finetune import evaluate

        sys.stdout.write(f"test perplexity: {evaluate(args.model, args.text, args.seq_len):.4f}\n")
        return 0
    from qatfx.recipes.corpus import load_text
    from qatfx.recipes.lm_eval_tasks import LOCAL_TASKS, write_local_task

    local = [task for task in args.tasks if task in LOCAL_TASKS]
    if local and args.text is None:
        raise ValueError(f"{', '.join(local)}: built from the test split of a text; pass --text CORPUS (the file the model "
                         "was fine-tuned on: its last 5% was held out)")
    try:
        from qatfx.recipes import lm_eval as harness
    except ImportError as error:
        raise ValueError(str(error)) from error  # exit 2 with the install command
    text = None if args.text is None else load_text(args.text)
    lm = harness.load_lm(args.model, tokenizer=args.tokenizer, max_length=args.seq_len, text=text, batch_size=args.batch_size)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qatfx-lm-eval-") as tasks_dir:
        if local:
            write_local_task(text, tasks_dir)
        results = harness.evaluate_tasks(lm, args.tasks, [*([tasks_dir] if local else []), *args.include_path], limit=args.limit)
    sys.stdout.write(f"qatfx eval {args.model}: {lm.describe()}\n{harness.results_table(results)}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(harness.results_json(results))
        sys.stdout.write(f"results: {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
