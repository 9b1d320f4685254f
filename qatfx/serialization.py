"""Save and load converted models: `qatfx.save(converted, dir)` / `qatfx.load(dir)`.

A saved model is a directory of three files (format in docs/serialization.md):

    program.pt2           torch.export.save of the converted model, re-exported with
                          dynamic batch / sequence dims; weights inside, self-contained
    weights.safetensors   the same tensors (packed int4, scales, group sums, biases, the
                          float parameters left) for runtimes that do not read .pt2
    qatfx_manifest.json   scheme, per-layer layout, tensor shapes / dtypes, sha256 of both
                          files; written last, so a save cut short has no manifest

`load` checks everything it can before torch.export.load runs, so a truncated, corrupt,
mismatched or too-new save raises SerializationError naming the file and the fix instead
of an unpickling error or, worse, a model computing something else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.fx
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree

from qatfx.capture import automatic_dynamic_shapes, by_parameter_name, kv_cache_off, unviewed
from qatfx.formats import format_named
from qatfx.graph.meta import CONVERTED
from qatfx.graph.regions import is_regional, model_stage
from qatfx.module import QATGraphModule, copy_sharing_tensors
from qatfx.quantizer import MixedQuantizer, Quantizer
from qatfx.spec import TORCHAO, PerChannel, PerGroup, PerTensor, PerToken, QuantSpec, scheme_name
from qatfx.summary import LayerReport, summary

log = logging.getLogger("qatfx.serialization")

FORMAT = "qatfx"
FORMAT_VERSION = 1
PROGRAM_FILE = "program.pt2"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "qatfx_manifest.json"

_GRANULARITIES = {"PerToken": PerToken, "PerChannel": PerChannel, "PerGroup": PerGroup, "PerTensor": PerTensor}

PathLike = Union[str, os.PathLike]


class SerializationError(RuntimeError):
    """A saved qatfx model cannot be written or read; the message names the file and the fix."""


# ---- save ---------------------------------------------------------------------------------


def save(
    converted: Any,
    path: PathLike,
    *,
    example_inputs: Optional[tuple] = None,
    example_kwargs: Optional[dict] = None,
    dynamic_shapes: Any = None,
) -> Path:
    """Write `converted` (from convert_pt2e) to the directory `path` (created if needed).

    The model is re-exported with torch.export, whole: a region capture is saved as one
    program too (its tensors keep their names in the model), and `load` returns that program
    as a QATGraphModule. By default the example inputs are zeros of the sizes the model was
    captured with (a region capture: the example inputs given to prepare_pt2e) and every dim
    that was dynamic stays dynamic. Pass `example_inputs` / `example_kwargs` /
    `dynamic_shapes` if that export needs other ones (a Hugging Face model built with
    use_cache=True is exported with the cache off). Returns the directory.
    """
    module = getattr(converted, "_orig_mod", converted)  # a torch.compile wrapper
    stage = model_stage(module)
    if stage != CONVERTED:
        raise SerializationError(
            "qatfx.save needs a module returned by qatfx.convert_pt2e "
            f"(got {'a module at stage ' + repr(stage) if stage else type(module).__name__}); "
            "to checkpoint a model mid-QAT, save prepared.state_dict() and the optimizer's "
            "state_dict() with torch.save (docs/serialization.md, 'Resume a QAT run')"
        )
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    # A stale manifest must not vouch for half-written files.
    (directory / MANIFEST_FILE).unlink(missing_ok=True)

    ep = reexport(module, example_inputs, example_kwargs, dynamic_shapes)
    tensors = _program_tensors(ep)
    stored, aliases = _dedupe_shared(tensors)
    torch.export.save(ep, directory / PROGRAM_FILE)
    _safetensors().save_file(stored, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})

    manifest = _manifest(module, tensors, aliases)
    manifest["files"] = {name: _file_record(directory / name) for name in (PROGRAM_FILE, WEIGHTS_FILE)}
    tmp = directory / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, directory / MANIFEST_FILE)
    log.info("qatfx: saved %s (%s, %d layers) to %s", type(module).__name__, manifest["scheme"], len(manifest["layers"]), directory)
    return directory


def reexport(
    module: torch.nn.Module, example_inputs: Optional[tuple] = None, example_kwargs: Optional[dict] = None, dynamic_shapes: Any = None
) -> ExportedProgram:
    """`module` (a converted whole graph or region capture) exported again with torch.export,
    as `save` stores it: by default on zeros of its capture sizes (a region capture: the
    example inputs given to prepare_pt2e), every dim dynamic that was."""
    if is_regional(module) and example_inputs is None:  # no placeholders to size inputs from
        example_inputs, recorded_kwargs = module.qatfx_example_inputs
        example_kwargs = recorded_kwargs if example_kwargs is None else example_kwargs
    return _export(module, example_inputs, example_kwargs, dynamic_shapes)


def default_example_inputs(module: torch.nn.Module) -> tuple[tuple, dict]:
    """What `reexport` exports a converted model with when no inputs are given: zeros of its
    capture sizes, or for a region capture the example inputs given to prepare_pt2e."""
    if is_regional(module):
        args, kwargs = module.qatfx_example_inputs
        return tuple(args), dict(kwargs)
    args, kwargs, _ = _inputs_from_placeholders(module)
    return args, kwargs


def _hint(size: Any) -> int:
    return size.node.hint if isinstance(size, torch.SymInt) else int(size)


def _export(module: torch.fx.GraphModule, args, kwargs, dynamic_shapes) -> ExportedProgram:
    try:
        if args is None:
            args, kwargs, auto_shapes = _inputs_from_placeholders(module)
        else:  # every dim dynamic, as prepare_pt2e does
            args, kwargs = unviewed(args if isinstance(args, tuple) else (args,), kwargs or {})
            auto_shapes = automatic_dynamic_shapes(module, args, kwargs)
        dynamic_shapes = auto_shapes if dynamic_shapes is None else dynamic_shapes
        with kv_cache_off(module):  # a default HF config (use_cache=True) would return a DynamicCache
            return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise SerializationError(
            f"qatfx.save could not re-export the converted model with torch.export: {type(exc).__name__}: {reason}\n"
            "Pass example_inputs= (inputs the model accepts) and, if a dynamic dim is rejected, dynamic_shapes="
        ) from exc


def _inputs_from_placeholders(module: torch.fx.GraphModule) -> tuple[tuple, dict, Any]:
    """Zeros shaped like the inputs the model was captured with, and Dim.AUTO for each dim
    the capture kept symbolic (so the saved program accepts any batch / sequence length)."""
    leaves, specs = [], []
    for node in module.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            leaves.append(torch.zeros([_hint(d) for d in val.shape], dtype=val.dtype, device=val.device))
            specs.append({i: Dim.AUTO for i, d in enumerate(val.shape) if isinstance(d, torch.SymInt)})
        else:
            leaves.append(val)
            specs.append(None)
    in_spec = getattr(module, "_in_spec", None)
    if in_spec is None:
        return tuple(leaves), {}, tuple(specs)
    args, kwargs = pytree.tree_unflatten(leaves, in_spec)
    spec_args, spec_kwargs = pytree.tree_unflatten(specs, in_spec)
    return tuple(args), dict(kwargs), by_parameter_name(module, args, kwargs, spec_args, spec_kwargs)


def _program_tensors(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    """Every tensor the program reads: parameters, buffers and tensor constants."""
    tensors = {name: t.detach() for name, t in ep.state_dict.items()}
    tensors.update({name: t.detach() for name, t in ep.constants.items() if isinstance(t, torch.Tensor)})
    return tensors


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors sharing memory (tied weights): store identical views
    once and record the other names as aliases; copy any other overlap."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in views:
            aliases[name] = views[key]
            continue
        views[key] = name
        stored[name] = t.clone() if ptr in storages or not t.is_contiguous() else t
        storages.add(ptr)
    return stored, aliases


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:  # pragma: no cover - installed with transformers
        raise SerializationError("qatfx.save / qatfx.load need the safetensors package: pip install safetensors") from exc
    return safetensors.torch


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


# ---- manifest -----------------------------------------------------------------------------


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return None if name is None else getattr(torch, name)


def spec_to_json(spec: Optional[QuantSpec]) -> Optional[dict]:
    if spec is None:
        return None
    g = spec.granularity
    return {
        "bits": spec.bits,
        "granularity": type(g).__name__,
        "group_size": g.group_size if isinstance(g, PerGroup) else None,
        "symmetric": spec.symmetric,
        "signed": spec.signed,
        "dynamic": spec.dynamic,
        "eps": spec.eps,
        "scale_dtype": _dtype_name(spec.scale_dtype),
        # written only when not the default, so every other save's manifest is unchanged
        **({"narrow": True} if spec.narrow else {}),
        **({"scale_rule": spec.scale_rule} if spec.scale_rule != TORCHAO else {}),
        **({"learnable": True} if spec.learnable else {}),
    }


def spec_from_json(data: Optional[dict]) -> Optional[QuantSpec]:
    if data is None:
        return None
    kind = _GRANULARITIES[data["granularity"]]
    granularity = kind(data["group_size"]) if kind is PerGroup else kind()
    return QuantSpec(
        data["bits"], granularity, symmetric=data["symmetric"], signed=data["signed"],
        dynamic=data["dynamic"], eps=data["eps"], scale_dtype=_dtype(data["scale_dtype"]),
        narrow=data.get("narrow", False), scale_rule=data.get("scale_rule", TORCHAO),
        learnable=data.get("learnable", False),
    )


def _elements_per_scale(spec: QuantSpec, k: int) -> int:
    g = spec.granularity
    return g.group_size if isinstance(g, PerGroup) else k


def _layer_tensors(report: LayerReport, names: set) -> dict[str, str]:
    """Which saved tensors hold this layer. Convert names its buffers `<param>_<part>`, and
    a layer is its weight parameter's name without `.weight` (graph/linear_sites.py)."""
    found = {}
    layer = report.tied_to or report.layer  # a tied table is stored once, under the linear's name
    for base in (f"{layer}.weight", layer):
        if report.quantized:
            parts = report.weight_format.parts
            found.update({part: f"{base}_{part}" for part in parts if f"{base}_{part}" in names})
        elif base in names:
            found["weight"] = base
        if found:
            break
    if f"{report.layer}.bias" in names:
        found["bias"] = f"{report.layer}.bias"
    return found


def _manifest(module: QATGraphModule, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict:
    layers = []
    schemes = set()
    for report in summary(module).layers:
        entry = {
            "name": report.layer,
            "op": report.op,
            "shape": list(report.shape),
            "weight_dtype": _dtype_name(report.weight_dtype),
            "quantized": report.quantized,
            "tensors": _layer_tensors(report, set(tensors)),
        }
        if report.tied_to:
            entry["tied_to"] = report.tied_to
        # the scheme names the linears' specs; embeddings carry their own spec per layer
        if report.quantized and report.op != "embedding":
            schemes.add((scheme_name(report.input_spec, report.weight_spec), json.dumps(spec_to_json(report.input_spec)), json.dumps(spec_to_json(report.weight_spec))))
        if report.quantized:
            entry.update(
                scheme=scheme_name(report.input_spec, report.weight_spec),
                format=report.weight_format.name,
                group_size=_elements_per_scale(report.weight_spec, report.shape[1]),
                activation=spec_to_json(report.input_spec),
                weight=spec_to_json(report.weight_spec),
            )
        else:
            entry["skip_reason"] = report.skip_reason
        layers.append(entry)
    if len(schemes) == 1:
        ((scheme, activation, weight),) = schemes
        activation, weight = json.loads(activation), json.loads(weight)
    else:  # a MixedQuantizer's model: each layer's entry holds its own scheme and specs
        scheme, activation, weight = "mixed", None, None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qatfx_version": _qatfx_version(),
        "torch_version": torch.__version__,
        "scheme": scheme,
        "weight_bits": None if weight is None else weight["bits"],
        "group_size": None if weight is None else weight["group_size"],
        "activation": activation,
        "weight": weight,
        "training": module.training,
        "layers": layers,
        "tensors": {name: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for name, t in tensors.items()},
        "aliases": aliases,
    }


def _qatfx_version() -> str:
    try:
        return metadata.version("qatfx")
    except metadata.PackageNotFoundError:  # a source checkout that was not pip-installed
        return "unknown"


# ---- load ---------------------------------------------------------------------------------


def load(path: PathLike, *, scheme: Union[str, Quantizer, None] = None) -> QATGraphModule:
    """Load a directory written by `qatfx.save`: a converted QATGraphModule whose outputs
    equal the saved model's bit for bit (any batch / sequence length it accepted).

    scheme: what the caller expects, refused with SerializationError if the save holds
        something else: a name ("8da4w", "8da8w", "4w", "8w", "mixed") or a Quantizer, whose
        activation and weight specs (bits, group size, symmetry, eps, scale dtype) must all
        match; a MixedQuantizer is checked layer by layer.
    """
    directory = Path(path)
    manifest = read_manifest(directory)
    if scheme is not None:
        _check_scheme(manifest, scheme, directory)
    _check_formats(manifest, directory)
    for name in (PROGRAM_FILE, WEIGHTS_FILE):
        _check_file(directory, name, manifest["files"].get(name))
    _check_tensors(_safetensors_header(directory / WEIGHTS_FILE), manifest, WEIGHTS_FILE, skip=set(manifest["aliases"]))
    try:
        ep = torch.export.load(directory / PROGRAM_FILE)
    except Exception as exc:
        raise SerializationError(
            f"{directory / PROGRAM_FILE}: torch.export.load failed ({type(exc).__name__}: {exc}); it was written "
            f"with torch {manifest['torch_version']} and this is torch {torch.__version__}: load it with the same "
            "torch version, or re-save it with this one"
        ) from exc
    _check_tensors(
        {name: (t.dtype, tuple(t.shape)) for name, t in _program_tensors(ep).items()}, manifest, PROGRAM_FILE, skip=set()
    )
    module = copy_sharing_tensors(ep.module())
    module.qatfx_stage = CONVERTED
    module.qatfx_layers = [_report_from_json(layer) for layer in manifest["layers"]]
    return module


def read_manifest(directory: Path) -> dict:
    """The manifest of a saved model, checked for format and version (files not read)."""
    directory = Path(directory)
    if not directory.exists():
        raise SerializationError(f"{directory} does not exist; pass the directory qatfx.save(converted, path) wrote")
    if not directory.is_dir():
        raise SerializationError(
            f"{directory} is a file; qatfx.load takes the directory qatfx.save wrote "
            f"(holding {PROGRAM_FILE}, {WEIGHTS_FILE} and {MANIFEST_FILE})"
        )
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.exists():
        raise SerializationError(
            f"{manifest_path} is missing: {directory} is not a complete qatfx save (the manifest is written last, "
            "so the save may have been interrupted); save the model again with qatfx.save(converted, path)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SerializationError(
            f"{manifest_path} is not valid JSON ({exc}); it is truncated or corrupt: save the model again"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SerializationError(f"{manifest_path} is not a qatfx manifest (no \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if version != FORMAT_VERSION:
        fix = (
            "it was written by a newer qatfx: upgrade qatfx to load it"
            if isinstance(version, int) and version > FORMAT_VERSION
            else "re-save the model with this qatfx"
        )
        raise SerializationError(
            f"{manifest_path} has format version {version!r} (qatfx {manifest.get('qatfx_version', '?')}); "
            f"this qatfx ({_qatfx_version()}) reads version {FORMAT_VERSION}: {fix}"
        )
    if missing:
        raise SerializationError(f"{manifest_path} lacks {', '.join(missing)}; it was edited or is corrupt: save the model again")
    return manifest


_MANIFEST_KEYS = ("scheme", "activation", "weight", "layers", "tensors", "aliases", "files", "torch_version")


def _check_scheme(manifest: dict, expected: Union[str, Quantizer], directory: Path) -> None:
    found = f"{manifest['scheme']} (weights {manifest['weight']}, activations {manifest['activation']})"
    if isinstance(expected, MixedQuantizer):
        _check_mixed_scheme(manifest, expected, directory)
        return
    if isinstance(expected, Quantizer):
        want = (scheme_name(expected.input_spec, expected.weight_spec), spec_to_json(expected.input_spec), spec_to_json(expected.weight_spec))
        ok = want == (manifest["scheme"], manifest["activation"], manifest["weight"])
        wanted = f"{want[0]} (weights {want[2]}, activations {want[1]})"
    else:
        ok = expected == manifest["scheme"]
        wanted = repr(expected)
    if not ok:
        raise SerializationError(
            f"{directory} holds a {found} model, not the expected {wanted}; load the save made with that "
            "scheme, or drop scheme= to accept what is there"
        )


def _check_mixed_scheme(manifest: dict, expected: MixedQuantizer, directory: Path) -> None:
    """Each saved linear holds the specs the rule for its name gives (a layer the rules
    leave in float must be float). Module-class rules cannot be matched from names, so
    with one, a layer may hold the specs of any of the quantizer's schemes."""
    by_class = any(isinstance(rule.patterns[0], type) for rule in expected.rules)
    schemes = [
        (spec_to_json(r.quantizer.input_spec), spec_to_json(r.quantizer.weight_spec))
        for r in (*expected.rules, expected.default) if r.quantizer is not None
    ]
    problems = []
    for layer in manifest["layers"]:
        if layer["op"] == "embedding":
            continue
        held = (layer.get("activation"), layer.get("weight")) if layer["quantized"] else None
        if by_class:
            ok = held is None or held in schemes
            wanted = "one of the quantizer's schemes"
        else:
            rule = expected.rule_for([layer["name"]], None)
            q = rule.quantizer
            want = None if q is None else (spec_to_json(q.input_spec), spec_to_json(q.weight_spec))
            # the rule's quantizer may itself skip a layer (its skip list, a group size)
            ok = held == want or (held is None and layer.get("skip_reason"))
            wanted = f"{rule}" + ("" if want is None else f" (activations {want[0]}, weights {want[1]})")
        if not ok:
            holds = "float" if held is None else f"{layer.get('scheme', '')} (activations {held[0]}, weights {held[1]})"
            problems.append(f"{layer['name']} holds {holds}, expected {wanted}")
    if problems:
        raise SerializationError(
            f"{directory} does not hold what {expected!r} gives: " + "; ".join(problems[:3])
            + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            + "; load the save made with these rules, or drop scheme= to accept what is there"
        )


def _check_formats(manifest: dict, directory: Path) -> None:
    """Every weight format the save names is one this qatfx knows (older saves name none)."""
    for layer in manifest["layers"]:
        if "format" not in layer:
            continue
        try:
            format_named(layer["format"])
        except ValueError as exc:
            raise SerializationError(
                f"{directory / MANIFEST_FILE}: layer {layer['name']}: {exc}; load it with the qatfx version that "
                f"saved it ({manifest.get('qatfx_version', 'unknown')}) or a newer one"
            ) from None


def _check_file(directory: Path, name: str, record: Optional[dict]) -> None:
    path = directory / name
    if record is None:
        raise SerializationError(f"{directory / MANIFEST_FILE} has no checksum for {name}; save the model again")
    if not path.exists():
        raise SerializationError(f"{path} is missing; copy the whole directory qatfx.save wrote, or save the model again")
    size = path.stat().st_size
    if size != record["bytes"]:
        what = "truncated" if size < record["bytes"] else "longer than saved"
        raise SerializationError(
            f"{path} is {what}: {size} bytes, the manifest says {record['bytes']}; copy it again from the original "
            "save or save the model again"
        )
    if _sha256(path) != record["sha256"]:
        raise SerializationError(
            f"{path} does not match its sha256 in {MANIFEST_FILE}: it is corrupt or comes from another save; "
            "copy the whole directory again from the original save, or save the model again"
        )


def _safetensors_header(path: Path) -> dict[str, tuple[torch.dtype, tuple]]:
    out = {}
    with _safetensors().safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            out[name] = (_SAFETENSORS_DTYPES[sl.get_dtype()], tuple(sl.get_shape()))
    return out


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def _check_tensors(found: dict[str, tuple], manifest: dict, file: str, *, skip: set) -> None:
    """`found` (name -> (dtype, shape)) must be exactly the manifest's tensors."""
    expected = {name: (_dtype(t["dtype"]), tuple(t["shape"])) for name, t in manifest["tensors"].items() if name not in skip}
    problems = [f"{name} missing" for name in expected if name not in found]
    problems += [f"{name} not in the manifest" for name in found if name not in expected]
    problems += [
        f"{name} is {_dtype_name(found[name][0])}{list(found[name][1])}, the manifest says {_dtype_name(want[0])}{list(want[1])}"
        for name, want in expected.items()
        if name in found and found[name] != want
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise SerializationError(
            f"{file} does not hold the tensors {MANIFEST_FILE} describes ({shown}): the files come from different "
            f"saves (another scheme or model, scheme {manifest['scheme']!r} expected); copy the whole directory "
            "from one save, or save the model again"
        )


def _report_from_json(layer: dict) -> LayerReport:
    return LayerReport(
        layer=layer["name"],
        op=layer["op"],
        shape=tuple(layer["shape"]),
        weight_dtype=_dtype(layer["weight_dtype"]),
        input_spec=spec_from_json(layer.get("activation")),
        weight_spec=spec_from_json(layer.get("weight")),
        skip_reason=layer.get("skip_reason"),
        tied_to=layer.get("tied_to"),
    )
