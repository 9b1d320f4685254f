"""qatfx.export.gguf: a converted model (Llama 2/3.x, SmolLM, Mistral, Qwen2/2.5, Qwen3, Phi-3,
Gemma 3 from transformers, or the demo's CausalLM) -> a GGUF file llama.cpp loads, every int4 linear in
Q4_0 holding the trained codes and scales (docs/export_gguf.md). The metadata, tensor names,
layout transforms and tokenizer are written as llama.cpp's own converter writes them
(gguf_arch.py, gguf_vocab.py).

The usual route (dequantize -> convert_hf_to_gguf -> llama-quantize) recomputes every block
scale from the float weights; this writes convert's own grid, so the file's weights are the
converted model's, bit for bit, whenever the grid is expressible: symmetric, groups a
multiple of 32, scales that are fp16 values (bf16 scales are, in fp16's normal range; or
train with `qatfx.LlamaCppQuantizer`, which also trains on llama.cpp's activation arithmetic).
A layer that is not expressible is refused with the reason; `allow_rounding=True` writes it
rounded (the trained codes with fp16-rounded scales, or llama.cpp's own Q4_0 quantizer for
other group sizes) and reports how many weights moved.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from qatfx import reference
from qatfx.export.gguf_arch import (
    Family, block_count, extra_tensors, family_of, hparams_of, row_transform, tensor_namer, value_shift, write_hparams,
)
from qatfx.export.gguf_blocks import block_problem, fp16_problem, q4_0_bytes, q8_0_bytes
from qatfx.export.gguf_vocab import tokenizer_rows, write_tokenizer
from qatfx.export.llama_layout import UnsupportedModel, config_of, hf_names
from qatfx.export.verify import ExportError, VerificationError
from qatfx.export.weights import QuantizedWeight, converted_tensors
from qatfx.spec import q8_0_activation

logger = logging.getLogger(__name__)

FLOAT_TYPES = ("q8_0", "f16", "f32")  # for embeddings and a float output head

@dataclass
class GGUFExport:
    path: Path
    quantized_layers: int  # written from the trained codes (Q4_0 / Q8_0)
    rounded: dict = field(default_factory=dict)  # tensor -> (reason, weights moved), allow_rounding only
    tensor_types: dict = field(default_factory=dict)  # GGUF tensor name -> ggml type name
    differences: list = field(default_factory=list)
    bytes: int = 0
    verified: Optional[int] = None  # tensors read back equal to the converted model's (or its reported rounding)

    def lines(self) -> list:
        counts: dict = {}
        for kind in self.tensor_types.values():
            counts[kind] = counts.get(kind, 0) + 1
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        out = [f"{self.path}: {self.bytes / 2**20:.2f} MiB, {len(self.tensor_types)} tensors ({kinds}); "
               f"{self.quantized_layers} quantized layers written from the trained codes"]
        out += [f"  rounded: {name}: {reason}; {moved} weights moved" for name, (reason, moved) in self.rounded.items()]
        out += [f"  differs from the converted model: {d}" for d in self.differences]
        if self.verified is not None:
            out.append(f"  verified: {self.verified} tensors read back and dequantized with gguf's own dequantizer equal the converted "
                       "model's (a rounded layer: its reported rounding)")
        return out


@dataclass(frozen=True)
class _Tensor:
    data: np.ndarray
    ggml_type: Any  # gguf.GGMLQuantizationType
    expected: torch.Tensor  # what dequantizing it must give (rotary rows applied): the converted model's values, or their reported rounding
    exact: bool  # the file holds `expected` exactly (False: a float table stored Q8_0 / F16 by choice)


def _gguf():
    try:
        import gguf
    except ImportError as exc:
        raise ExportError("qatfx.export.gguf needs the gguf package: pip install -e '.[gguf]'") from exc
    return gguf


def _bits(weight: QuantizedWeight) -> int:
    return weight.spec.bits if weight.spec is not None else (4 if int(weight.codes.abs().max()) <= 8 else 8)


def _layout_problem(weight: QuantizedWeight) -> Optional[str]:
    """Why the grid is not a Q4_0/Q8_0 grid at all (the scales aside), or None."""
    spec = weight.spec
    if spec is not None and not spec.symmetric or weight.zeros is not None and bool(weight.zeros.any()):
        return "asymmetric (a zero point): Q4_0/Q8_0 grids are symmetric"
    if _bits(weight) not in (4, 8):
        return f"{_bits(weight)}-bit codes: GGUF's exact targets are Q4_0 (4-bit) and Q8_0 (8-bit)"
    return block_problem(weight.group_size, weight.shape[1])


def _quantized_tensor(gguf, weight: QuantizedWeight, rows: Optional[Callable], allow_rounding: bool) -> tuple[Optional[_Tensor], Optional[tuple]]:
    """The weight as Q4_0 / Q8_0 from its codes: (tensor, None) when exact; (None, reason) when
    it is not and rounding is not allowed; (tensor, (reason, weights moved)) when rounded.
    rows: the family's row permutation (q/k), applied to codes, scales and values alike."""
    codes, scales = weight.codes, weight.scales
    expected = weight.dequantized(torch.float32)
    if rows is not None:
        codes, scales, expected = rows(codes), rows(scales), rows(expected)
    bits = _bits(weight)
    ggml = gguf.GGMLQuantizationType.Q4_0 if bits <= 4 else gguf.GGMLQuantizationType.Q8_0
    layout, scale_problem = _layout_problem(weight), fp16_problem(weight.scales)
    if layout is None:
        encode = q4_0_bytes if bits == 4 else q8_0_bytes
        if scale_problem is None:
            return _Tensor(encode(codes, scales, weight.group_size), ggml, expected, True), None
        if not allow_rounding:
            return None, scale_problem
        # the trained codes kept, only the scales rounded to fp16: every value moves by < 2^-11 relative
        scales16 = scales.to(torch.float16)
        rounded = reference.dequantize(codes, scales16, None, weight.group_size, torch.float32)
        moved = int((rounded != expected).sum())
        return _Tensor(encode(codes, scales16, weight.group_size), ggml, rounded, True), (f"{scale_problem}; codes kept, scales rounded to fp16", moved)
    if not allow_rounding:
        return None, layout
    # no Q4_0/Q8_0 grid holds it: llama.cpp's own quantizer on the converted weights (what
    # the dequantize -> llama-quantize route does to every layer)
    data = gguf.quants.quantize(expected.numpy(), ggml)
    requantized = torch.from_numpy(np.array(gguf.quants.dequantize(data, ggml), dtype=np.float32)).reshape(expected.shape)
    moved = int((requantized != expected).sum())
    return _Tensor(data, ggml, requantized, True), (f"{layout}; requantized with llama.cpp's {ggml.name} quantizer", moved)


def _float_tensor(gguf, tensor: torch.Tensor, kind: str, rows: Optional[Callable] = None, shift: float = 0.0) -> _Tensor:
    values = tensor.detach().to(torch.float32)
    if rows is not None:
        values = rows(values)
    if shift:
        values = values + shift
    array = values.numpy()
    if kind == "f32":
        return _Tensor(array, gguf.GGMLQuantizationType.F32, values, True)
    if kind == "f16":
        return _Tensor(array.astype(np.float16), gguf.GGMLQuantizationType.F16, values, False)
    return _Tensor(gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0, values, False)


def _collect(gguf, converted, hparams: dict, family: Family, embeddings: str, output: str, allow_rounding: bool, vocab_rows: Optional[int]):
    tensors = converted_tensors(converted)
    sources = {**tensors.float, **tensors.quantized}
    by_hf = hf_names(sources)
    tied = bool(hparams.get("tie_word_embeddings", False))
    if tied and "model.embed_tokens.weight" not in by_hf and "lm_head.weight" in by_hf:
        by_hf["model.embed_tokens.weight"] = by_hf.pop("lm_head.weight")  # one table, stored under the head's name
    if "model.embed_tokens.weight" in by_hf and by_hf.get("lm_head.weight") == by_hf["model.embed_tokens.weight"]:
        del by_hf["lm_head.weight"]  # tied: llama.cpp reads token_embd for the output
    _check_complete(by_hf, hparams)
    name_of = tensor_namer(gguf, hparams, family)
    out: dict = {}
    problems: dict = {}
    rounded: dict = {}
    quantized = 0
    for hf, source in by_hf.items():
        name = name_of(hf)
        rows = row_transform(hf, hparams, family, vocab_rows)
        if source in tensors.quantized:
            tensor, issue = _quantized_tensor(gguf, tensors.quantized[source], rows, allow_rounding)
            if tensor is None:
                problems[source] = issue
                continue
            if issue is not None:
                rounded[name] = issue
            else:
                quantized += 1
        elif hf == "model.embed_tokens.weight":
            tensor = _float_tensor(gguf, sources[source], embeddings, rows)
        elif hf == "lm_head.weight":
            tensor = _float_tensor(gguf, sources[source], output)
        elif sources[source].dim() == 1:
            tensor = _float_tensor(gguf, sources[source], "f32", rows, value_shift(hf, family))  # norms and biases: llama.cpp wants F32
        else:
            tensor = _float_tensor(gguf, sources[source], "f16", rows)  # a linear left in float
        out[name] = tensor
    if problems:
        listed = "\n".join(f"  {layer}: {why}" for layer, why in problems.items())
        raise ExportError(
            f"{len(problems)} quantized layer(s) cannot be written to GGUF without changing their trained grid:\n{listed}\n"
            "Train with a grid llama.cpp stores exactly (qatfx.LlamaCppQuantizer, or group_size a multiple of 32 "
            "with scales_precision=torch.bfloat16, whose scales fp16 holds exactly), or pass allow_rounding=True "
            "(CLI: --allow-rounding) to write them rounded and report how many weights moved; `qatfx finetune "
            "--scales-precision bfloat16` trains an exact grid"
        )
    for name, values in extra_tensors(gguf, hparams, family).items():  # rope_freqs, longrope factors
        out[name] = _float_tensor(gguf, values, "f32")
    return out, rounded, quantized


def _check_complete(by_hf: dict, hparams: dict) -> None:
    """The config describes this model: an embedding, and every block the config counts holds
    the tensors block 0 holds (a wrong config= would write a file llama.cpp cannot load)."""
    layers = block_count(hparams)
    first = {hf.removeprefix("model.layers.0.") for hf in by_hf if hf.startswith("model.layers.0.")}
    expected = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{rest}" for i in range(layers) for rest in sorted(first)]
    missing = [n for n in expected if n not in by_hf]
    if not first or missing:
        missing = missing or [f"model.layers.{i}.*" for i in range(layers)]
        raise UnsupportedModel(
            f"the model lacks tensors its config ({layers} layers) implies: {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}; is config= this model's?"
        )


def _write_metadata(gguf, writer, hparams: dict, family: Family, name: str, file_type) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    write_hparams(gguf, writer, hparams, family)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocabulary(gguf, writer, vocabulary: Optional[Sequence[str]], vocab_size: int) -> None:
    """A character vocabulary (the demo's CharTokenizer: id 0 unknown, then one character per
    id) as a SentencePiece-style ("llama") vocabulary whose pieces are the characters, space
    written as SentencePiece's "▁"; none: llama.cpp's no-vocabulary mode (token ids only)."""
    if vocabulary is None:
        writer.add_tokenizer_model("none")
        return
    pieces = ["<unk>", *("\u2581" if c == " " else c for c in vocabulary)]
    if len(pieces) != vocab_size:
        raise ExportError(f"the vocabulary has {len(pieces)} tokens (<unk> + {len(vocabulary)} characters) but the model {vocab_size}")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([0.0] * len(pieces))
    writer.add_token_types([gguf.TokenType.UNKNOWN] + [gguf.TokenType.NORMAL] * (len(pieces) - 1))
    for setter in (writer.add_unk_token_id, writer.add_bos_token_id, writer.add_eos_token_id):
        setter(0)  # a character vocabulary has no special tokens; id 0 is its "unknown"
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)


def gguf(
    converted: torch.nn.Module,
    path: Union[str, os.PathLike],
    *,
    config: Any = None,
    embeddings: str = "q8_0",
    output: str = "q8_0",
    vocabulary: Optional[Sequence[str]] = None,
    tokenizer_dir: Optional[Union[str, os.PathLike]] = None,
    allow_rounding: bool = False,
    verify: bool = True,
    name: str = "qatfx",
) -> GGUFExport:
    """Write `converted` (from convert_pt2e; a Llama: HF LlamaForCausalLM or the demo's CausalLM)
    to `path` as GGUF. Quantized layers: Q4_0 (int4) / Q8_0 (int8) from the trained codes.
    Float embeddings / a float output head: `embeddings` / `output` in "q8_0" (llama.cpp's QAT
    checkpoints keep them there), "f16" or "f32"; norms F32. `config`: the model's LlamaConfig
    or LMConfig when `converted` does not carry one (a whole-model capture). `vocabulary`: a
    character vocabulary (the demo's); `tokenizer_dir`: a transformers tokenizer directory
    instead; neither writes no tokenizer (llama.cpp then takes token ids).
    verify: read the file back and check every tensor (see verify_gguf)."""
    for what, kind in (("embeddings", embeddings), ("output", output)):
        if kind not in FLOAT_TYPES:
            raise ValueError(f"{what}={kind!r}: choose one of {FLOAT_TYPES}")
    if vocabulary is not None and tokenizer_dir is not None:
        raise ValueError("pass vocabulary= (a character vocabulary) or tokenizer_dir= (a transformers tokenizer), not both")
    gguf_module = _gguf()
    try:
        hparams = hparams_of(config_of(converted, config))
        family = family_of(hparams)
        vocab_rows = tokenizer_rows(Path(tokenizer_dir), hparams) if tokenizer_dir is not None and family.gemma3_converter else None
        tensors, rounded, quantized = _collect(gguf_module, converted, hparams, family, embeddings, output, allow_rounding, vocab_rows)
    except (UnsupportedModel, ValueError) as exc:
        if isinstance(exc, ExportError):
            raise
        raise ExportError(f"cannot write this model as GGUF: {exc}") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # a failed export leaves no file behind
    try:
        writer = gguf_module.GGUFWriter(str(partial), gguf_module.MODEL_ARCH_NAMES[getattr(gguf_module.MODEL_ARCH, family.arch)])
        _write_metadata(gguf_module, writer, hparams, family, name, gguf_module.LlamaFileType.MOSTLY_Q4_0)
        if tokenizer_dir is not None:
            write_tokenizer(gguf_module, writer, Path(tokenizer_dir), hparams, family)
        else:
            _write_vocabulary(gguf_module, writer, vocabulary, hparams["vocab_size"])
        for tensor_name, tensor in tensors.items():
            writer.add_tensor(tensor_name, tensor.data, raw_dtype=tensor.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    report = GGUFExport(
        path, quantized, rounded, {n: t.ggml_type.name for n, t in tensors.items()}, bytes=path.stat().st_size,
    )
    report.differences = _differences(converted, tensors)
    if verify:
        report.verified = verify_gguf(path, {n: t.expected for n, t in tensors.items() if t.exact})
    for line in report.lines():
        logger.info(line)
    return report


def _differences(converted, tensors: dict) -> list:
    """What llama.cpp computes differently from the converted model (beyond float order)."""
    from qatfx.summary import summary

    found = []
    inputs = {r.input_spec for r in summary(getattr(converted, "_orig_mod", converted)).quantized if r.op != "embedding"}
    for spec in inputs:
        if spec is None:
            found.append("activations: trained in float (weight-only); llama.cpp's CPU path quantizes them to Q8_0 for the dot product")
        elif spec != q8_0_activation():
            found.append(
                f"activations: trained as {spec.describe()}; llama.cpp's CPU path quantizes them as Q8_0 (symmetric int8 per 32 "
                "along K, fp16 scale); train with qatfx.LlamaCppQuantizer to match it"
            )
    rounded = [n for n, t in tensors.items() if not t.exact]
    if rounded:
        found.append(f"float tensors stored rounded ({', '.join(rounded)}): Q8_0/F16 as chosen by embeddings= / output=")
    return found


def verify_gguf(path: Union[str, os.PathLike], expected: dict) -> int:
    """Read `path` back with the gguf package, dequantize each tensor in `expected` with gguf's
    own dequantizer and require it equal to the expected values bit for bit (exact on any
    CPU: an fp16 scale times an int4/int8 code is one float32 product without rounding). Returns how many
    tensors were checked; raises VerificationError naming the first that differs."""
    gguf_module = _gguf()
    reader = gguf_module.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise VerificationError(f"{path} lacks tensors {missing}")
    for name, values in expected.items():
        tensor = found[name]
        got = gguf_module.quants.dequantize(tensor.data, tensor.tensor_type)
        got = torch.from_numpy(np.array(got, dtype=np.float32)).reshape(values.shape)  # a writable copy
        if not torch.equal(got, values):
            diff = (got - values).abs()
            raise VerificationError(
                f"{path}: tensor {name} ({tensor.tensor_type.name}) dequantizes to other values than the converted model's: "
                f"{int((diff > 0).sum())} of {values.numel()} differ, max {diff.max().item():.3g}"
            )
    return len(expected)
