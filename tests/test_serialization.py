"""qatfx.save / qatfx.load: exact round trip (also in a fresh process), the safetensors +
manifest layout other runtimes read, and a clear SerializationError for every broken save."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import qatfx
from qatfx.serialization import MANIFEST_FILE, PROGRAM_FILE, WEIGHTS_FILE
from tests.models import TinyLM, tokens

Q = qatfx.Int8DynActInt4WeightQuantizer
REPO = Path(__file__).resolve().parents[1]
SHAPES = [(2, 8), (3, 17), (1, 1), (4, 64)]


def converted_lm(quantizer=None, **kw):
    prepared = qatfx.prepare_pt2e(TinyLM(**kw), quantizer or Q(32), (tokens(),))
    return qatfx.convert_pt2e(prepared.eval())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = converted_lm()
    return model, qatfx.save(model, tmp_path_factory.mktemp("saved") / "lm")


@pytest.fixture
def copy_of(saved, tmp_path):
    """A scratch copy of the saved directory for the tests that break it."""
    return Path(shutil.copytree(saved[1], tmp_path / "copy"))


def manifest(directory):
    return json.loads((directory / MANIFEST_FILE).read_text())


def write_manifest(directory, data):
    (directory / MANIFEST_FILE).write_text(json.dumps(data))


def test_round_trip_is_exact_for_any_batch_and_sequence_length(saved):
    model, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == sorted([PROGRAM_FILE, WEIGHTS_FILE, MANIFEST_FILE])
    loaded = qatfx.load(directory, scheme="8da4w")
    assert isinstance(loaded, qatfx.QATGraphModule) and loaded.qatfx_stage == "converted" and not loaded.training
    with torch.no_grad():
        for batch, seq in SHAPES:
            t = tokens(batch, seq, seed=batch * seq)
            assert torch.equal(loaded(t), model(t)), (batch, seq)
    assert str(qatfx.summary(loaded)) == str(qatfx.summary(model))

    def qatfx_ops(gm):  # what the lowering pass matches must be there, one for one
        return sorted(str(n.target) for n in gm.graph.nodes if str(n.target).startswith("qatfx."))

    assert qatfx_ops(loaded) == qatfx_ops(model)


def test_explicit_example_inputs_keep_every_dim_dynamic(saved, tmp_path):
    model = saved[0]
    view = tokens(2, 10)[:, :-1]  # a view: export would guard on its base if save kept it
    loaded = qatfx.load(qatfx.save(model, tmp_path / "explicit", example_inputs=(view,)))
    t = tokens(3, 17, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(t), model(t))


def test_manifest_and_safetensors_describe_the_packed_layout(saved):
    from safetensors.torch import load_file

    model, directory = saved
    data = manifest(directory)
    assert (data["format"], data["format_version"], data["scheme"], data["weight_bits"], data["group_size"]) == ("qatfx", 1, "8da4w", 4, 32)
    assert data["activation"]["granularity"] == "PerToken" and not data["activation"]["symmetric"]
    weights = load_file(str(directory / WEIGHTS_FILE))
    state = model.state_dict()
    # every tensor the program reads, under its module name; the tied lm_head weight is
    # stored once, as the embedding, and listed as an alias
    assert data["aliases"] == {"lm_head.weight": "embed.weight"}
    assert set(weights) | set(data["aliases"]) == set(data["tensors"]) == set(state)
    for name, tensor in weights.items():
        assert torch.equal(tensor, state[name]) and tensor.dtype == state[name].dtype, name
    assert len(data["layers"]) == 15
    (q_proj,) = [layer for layer in data["layers"] if layer["name"] == "blocks.0.q_proj"]
    assert q_proj["shape"] == [64, 64] and q_proj["group_size"] == 32 and q_proj["quantized"]
    parts = {part: weights[name] for part, name in q_proj["tensors"].items()}
    # (N, K/2) uint8 two int4 per byte, (N, K/G) fp32 scales and int16 group sums
    assert {p: (t.dtype, tuple(t.shape)) for p, t in parts.items()} == {
        "packed": (torch.uint8, (64, 32)),
        "scales": (torch.float32, (64, 2)),
        "group_sums": (torch.int16, (64, 2)),
    }
    (o_proj,) = [layer for layer in data["layers"] if layer["name"] == "blocks.0.o_proj"]
    assert o_proj["tensors"]["bias"] == "blocks.0.o_proj.bias"


def test_loads_in_a_fresh_process_once_qatfx_is_imported(saved, tmp_path):
    model, directory = saved
    t = tokens(3, 11, seed=5)
    with torch.no_grad():
        torch.save({"tokens": t, "expected": model(t)}, tmp_path / "io.pt")
    script = f"""
import torch, qatfx
io = torch.load({str(tmp_path / 'io.pt')!r})
with torch.no_grad():
    assert torch.equal(qatfx.load({str(directory)!r})(io["tokens"]), io["expected"])
    # plain torch.export.load reads program.pt2 too: importing qatfx registers its ops
    ep = torch.export.load({str(directory / PROGRAM_FILE)!r})
    assert torch.equal(ep.module()(io["tokens"]), io["expected"])
print("fresh process: equal")
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "fresh process: equal" in run.stdout, run.stderr[-3000:]


@pytest.mark.parametrize(
    "quantizer, scheme, packed_dtype",
    [(qatfx.Int4WeightOnlyQuantizer(32), "4w", torch.uint8), (qatfx.Int8WeightOnlyQuantizer(), "8w", torch.int8)],
)
def test_weight_only_schemes_round_trip(tmp_path, quantizer, scheme, packed_dtype):
    model = converted_lm(quantizer)
    loaded = qatfx.load(qatfx.save(model, tmp_path / scheme), scheme=quantizer)
    data = manifest(tmp_path / scheme)
    assert data["scheme"] == scheme and data["activation"] is None
    assert data["tensors"]["lm_head.weight_packed"]["dtype"] == str(packed_dtype).removeprefix("torch.")
    t = tokens(3, 9, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(t), model(t))


def test_skipped_layers_and_keyword_inputs(tmp_path):
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 48)
            self.out = nn.Linear(48, 16)  # K = 48: not a multiple of 32, left in float

        def forward(self, x, *, gate):
            return self.out(self.fc(x) * gate)

    auto = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
    prepared = qatfx.prepare_pt2e(
        Gated().eval(), Q(32), (torch.randn(2, 5, 64),), example_kwargs={"gate": torch.randn(2, 5, 48)},
        dynamic_shapes={"x": auto, "gate": auto},
    )
    model = qatfx.convert_pt2e(prepared)
    loaded = qatfx.load(qatfx.save(model, tmp_path / "gated"))
    x, gate = torch.randn(3, 7, 64), torch.randn(3, 7, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x, gate=gate), model(x, gate=gate))
    out = manifest(tmp_path / "gated")["layers"][1]
    assert out["name"] == "out" and not out["quantized"] and "not divisible" in out["skip_reason"]
    assert out["tensors"] == {"weight": "out.weight", "bias": "out.bias"}


def test_region_captured_hf_model_with_its_default_config(tmp_path):
    """transformers' default config (use_cache=True): save re-exports with the cache off, and
    the loaded program computes the converted model's logits."""
    from tests.model_zoo import _hf

    model, vocab = _hf("LlamaConfig", "LlamaForCausalLM", use_cache=True)()
    converted = qatfx.convert_pt2e(qatfx.prepare_pt2e(model, Q(32), (tokens(2, 8, vocab, 0),), regions="auto").eval())
    loaded = qatfx.load(qatfx.save(converted, tmp_path / "hf"))
    assert converted.config.use_cache
    ids = tokens(2, 8, vocab, 3)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, converted(ids).logits)


# ---- errors -------------------------------------------------------------------------------


def test_save_refuses_a_prepared_model(tmp_path):
    prepared = qatfx.prepare_pt2e(TinyLM(), Q(32), (tokens(),))
    with pytest.raises(qatfx.SerializationError, match=r"convert_pt2e.*prepared.state_dict\(\)"):
        qatfx.save(prepared, tmp_path / "x")


def test_missing_directory_or_file_path(saved, tmp_path):
    with pytest.raises(qatfx.SerializationError, match="does not exist"):
        qatfx.load(tmp_path / "nowhere")
    with pytest.raises(qatfx.SerializationError, match="is a file; qatfx.load takes the directory"):
        qatfx.load(saved[1] / PROGRAM_FILE)


def test_missing_manifest_means_an_incomplete_save(copy_of):
    (copy_of / MANIFEST_FILE).unlink()
    with pytest.raises(qatfx.SerializationError, match="qatfx_manifest.json is missing.*save may have been interrupted"):
        qatfx.load(copy_of)


@pytest.mark.parametrize("name", [PROGRAM_FILE, WEIGHTS_FILE])
def test_missing_file(copy_of, name):
    (copy_of / name).unlink()
    with pytest.raises(qatfx.SerializationError, match=f"{name} is missing; copy the whole directory"):
        qatfx.load(copy_of)


@pytest.mark.parametrize("name", [PROGRAM_FILE, WEIGHTS_FILE])
def test_truncated_file(copy_of, name):
    path = copy_of / name
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    with pytest.raises(qatfx.SerializationError, match=rf"{name} is truncated: {size // 2} bytes, the manifest says {size}"):
        qatfx.load(copy_of)


@pytest.mark.parametrize("name", [PROGRAM_FILE, WEIGHTS_FILE])
def test_corrupt_file_fails_its_checksum(copy_of, name):
    path = copy_of / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte (inside the weights)
    path.write_bytes(bytes(data))
    with pytest.raises(qatfx.SerializationError, match=f"{name} does not match its sha256"):
        qatfx.load(copy_of)


def test_truncated_manifest(copy_of):
    path = copy_of / MANIFEST_FILE
    path.write_text(path.read_text()[:100])
    with pytest.raises(qatfx.SerializationError, match="not valid JSON.*truncated or corrupt"):
        qatfx.load(copy_of)


def test_incompatible_format_version(copy_of):
    data = manifest(copy_of)
    write_manifest(copy_of, {**data, "format_version": 2})
    with pytest.raises(qatfx.SerializationError, match="format version 2.*newer qatfx: upgrade qatfx"):
        qatfx.load(copy_of)
    write_manifest(copy_of, {**data, "format": "something-else"})
    with pytest.raises(qatfx.SerializationError, match="not a qatfx manifest"):
        qatfx.load(copy_of)


def test_other_scheme_than_expected(saved):
    with pytest.raises(qatfx.SerializationError, match="holds a 8da4w .* not the expected '4w'"):
        qatfx.load(saved[1], scheme="4w")
    with pytest.raises(qatfx.SerializationError, match="not the expected 8da4w .*'group_size': 64"):
        qatfx.load(saved[1], scheme=Q(64))
    qatfx.load(saved[1], scheme=Q(32))  # the quantizer it was made with is accepted


def test_files_from_another_save_do_not_match_the_manifest(copy_of, tmp_path):
    """Tensors of another scheme (group size 64) under this save's manifest, with checksums
    made to agree: the shapes give it away before anything computes a wrong output."""
    other = qatfx.save(converted_lm(Q(64)), tmp_path / "g64")
    data = manifest(copy_of)
    for name in (PROGRAM_FILE, WEIGHTS_FILE):
        shutil.copy(other / name, copy_of / name)
    data["files"] = manifest(other)["files"]
    write_manifest(copy_of, data)
    with pytest.raises(
        qatfx.SerializationError,
        match=r"weights.safetensors does not hold the tensors .*blocks.0.q_proj.weight_scales is float32\[64, 1\], the manifest says float32\[64, 2\]",
    ):
        qatfx.load(copy_of)


def test_manifest_is_enough_to_dequantize_a_layer_elsewhere(saved):
    """The recipe docs/serialization.md gives other runtimes, checked against qatfx's op."""
    from safetensors.torch import load_file

    model, directory = saved
    data = manifest(directory)
    weights = load_file(str(directory / WEIGHTS_FILE))
    layer = next(entry for entry in data["layers"] if entry["name"] == "blocks.0.gate_proj")
    packed, scales = (weights[layer["tensors"][part]] for part in ("packed", "scales"))
    (n, k), g = layer["shape"], layer["group_size"]
    nibbles = packed.view(n, k // g, g // 2)
    q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).to(torch.int8)  # low nibbles: first half
    q = torch.where(q > 7, q - 16, q)  # two's complement
    weight = (q.float() * scales.unsqueeze(-1)).view(n, k)
    sums = weights[layer["tensors"]["group_sums"]]
    assert torch.equal(q.sum(-1, dtype=torch.int16), sums)
    assert torch.equal(weight, torch.ops.qatfx.dequantize_int4(packed, scales, sums, g, torch.float32))


@pytest.mark.long  # two Inductor compiles with the qatfx backend, ~50 s on 2 cores
def test_loaded_model_lowers_like_the_converted_one(tmp_path):
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    model = nn.Sequential(nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 32)).eval()
    prepared = qatfx.prepare_pt2e(model, Q(32), (torch.randn(4, 64),))
    converted = qatfx.convert_pt2e(prepared).eval()
    loaded = qatfx.load(qatfx.save(converted, tmp_path / "mlp"))
    x = torch.randn(5, 64)
    results = []
    for module in (converted, loaded):
        counters.clear()
        torch._dynamo.reset()
        with torch.no_grad(), fresh_cache():
            out = torch.compile(module, backend="qatfx")(x)
        results.append((out, dict(counters["qatfx"])))
    (expected, fired), (out, fired_loaded) = results
    assert fired and fired_loaded == fired
    assert torch.equal(out, expected)


def test_manifest_names_each_layers_weight_format_and_load_refuses_an_unknown_one(copy_of):
    manifest = json.loads((copy_of / MANIFEST_FILE).read_text())
    quantized = [layer for layer in manifest["layers"] if layer["quantized"]]
    assert quantized and all(layer["format"] == "int4_packed" for layer in quantized)
    assert all(set(layer["tensors"]) - {"bias"} == {"packed", "scales", "group_sums"} for layer in quantized)
    quantized[0]["format"] = "nf4"
    (copy_of / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(qatfx.SerializationError, match=r"unknown qatfx weight format 'nf4'.*qatfx version that saved it"):
        qatfx.load(copy_of)


# ---- per-layer schemes ----------------------------------------------------------------------


def test_mixed_schemes_save_each_layers_scheme_and_load_exactly(tmp_path):
    torch.manual_seed(0)
    model = converted_lm(qatfx.presets.executorch_llama(), tie=True)
    directory = qatfx.save(model, tmp_path / "mixed")
    data = manifest(directory)
    assert data["scheme"] == "mixed" and data["activation"] is None and data["weight"] is None
    by_name = {layer["name"]: layer for layer in data["layers"]}
    assert by_name["lm_head"]["scheme"] == "8da8w" and by_name["lm_head"]["format"] == "int_codes"
    assert by_name["blocks.0.q_proj"]["scheme"] == "8da4w" and by_name["blocks.0.q_proj"]["format"] == "int4_packed"
    assert by_name["embed"]["tied_to"] == "lm_head"
    loaded = qatfx.load(directory, scheme=qatfx.presets.executorch_llama())
    assert [r.scheme for r in qatfx.summary(loaded).layers] == [r.scheme for r in qatfx.summary(model).layers]
    t = tokens(3, 9, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(t), model(t))
    # other rules are refused layer by layer, naming the rule
    body = Q(32, scales_precision=torch.bfloat16)
    with pytest.raises(qatfx.SerializationError, match=r"gives: lm_head holds 8da8w \(.*\), expected the default \(8da4w\)") as info:
        qatfx.load(directory, scheme=qatfx.MixedQuantizer([], default=body))
    assert "blocks" not in str(info.value).split("gives:")[1]  # only the layer that differs
    with pytest.raises(qatfx.SerializationError, match="blocks.0.down_proj holds 8da4w .* expected rule 0"):
        qatfx.load(directory, scheme=qatfx.MixedQuantizer([("*.down_proj", None)], default=body))
    with pytest.raises(qatfx.SerializationError, match="holds a mixed"):
        qatfx.load(directory, scheme="8da4w")


def test_a_save_whose_layers_name_no_scheme_still_loads(copy_of, saved):
    """Saves made before per-layer schemes: the layer entries have specs but no "scheme"."""
    data = manifest(copy_of)
    for layer in data["layers"]:
        layer.pop("scheme", None)
    write_manifest(copy_of, data)
    loaded = qatfx.load(copy_of, scheme=Q(32))
    assert {r.scheme for r in qatfx.summary(loaded).quantized} == {"8da4w"}
    t = tokens(2, 8, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(t), saved[0](t))
