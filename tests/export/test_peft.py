"""save_peft_adapters: a prepared model's LoRA adapters in peft's layout, loaded back by peft."""

import json

import peft  # the hf extra installs it (a broken install fails, not skips); qatfx never imports it
import pytest
import torch
import torch.nn.functional as F

import qatfx
from qatfx.export import save_peft_adapters
from qatfx.export.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tests.model_zoo import BY_NAME, hf_llama_logits
from tests.model_zoo import logits as model_logits
from tests.models import Block, TinyLM, tokens

LLAMA_TARGETS = ["*.q_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]
LEAVES = ["down_proj", "gate_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
RANK, ALPHA = 4, 8
U = 2.0**-24  # fp32 unit roundoff


def _trained_hf_llama(mode, dropout, wrapped):
    """HF Llama from its config, prepared directly (weights named `model.…`) or wrapped
    (`lm.model.…`), LoRA on q/v/o/gate/up/down, two Adam steps so that B != 0."""
    model, vocab = hf_llama_logits() if wrapped else BY_NAME["hf_llama"].build()
    config = qatfx.LoRA(rank=RANK, alpha=ALPHA, targets=LLAMA_TARGETS, mode=mode, dropout=dropout)
    prepared = qatfx.prepare_pt2e(model.train(), qatfx.Int8DynActInt4WeightQuantizer(32), (tokens(vocab=vocab),), lora=config)
    opt = torch.optim.Adam([p for p in prepared.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        t = tokens(2, 8, vocab=vocab, seed=step)
        logits = model_logits(prepared(t))
        F.cross_entropy(logits[:, :-1].reshape(-1, vocab), t[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    return prepared.eval()


def _merged_linear_bound(x, w, a, b, scale):
    """|peft's W x + s B (A x) - (W + s B A) x| in fp32, elementwise. Both evaluate the same
    exact y = x (W + sBA)^T. A length-n dot product errs by at most gamma_n |x|.|w| with
    gamma_n ~ n u, whatever the summation order (Higham 3.1). peft: x W^T (gamma_K), x A^T
    then (.) B^T (gamma_K + gamma_r on |x||A|^T|B|^T), * s and the add (2u). Merged: B A
    (gamma_r), * s, + W (2u on the weight), then x M^T (gamma_K). Each path is within
    (K + r + 3) u |x| (|W| + s|B||A|)^T of y; twice that bounds their difference.
    Measured (merge_consistent, seed 0): at most 2.4% of the bound, while the adapters' own
    term s B A x is at least 22x the bound at every output: a dropped or mis-scaled adapter fails."""
    k, r = w.shape[1], a.shape[0]
    magnitude = x.double().abs() @ (w.double().abs() + scale * b.double().abs() @ a.double().abs()).T
    return 2 * (k + r + 3) * U * magnitude


@pytest.mark.parametrize("mode, dropout, wrapped", [("merge_consistent", 0.0, True), ("torchtune", 0.05, False)])
def test_peft_loads_the_adapters(tmp_path, mode, dropout, wrapped):
    prepared = _trained_hf_llama(mode, dropout, wrapped)
    layers = prepared.meta["qatfx_lora"]["layers"]  # {layer: weight name}
    out = save_peft_adapters(prepared, tmp_path / "adapters", base_model_name_or_path="tiny-llama")
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    written = json.loads((out / ADAPTER_CONFIG).read_text())
    assert written["target_modules"] == LEAVES and written["lora_dropout"] == dropout

    base, _ = BY_NAME["hf_llama"].build()  # the float model again, from its config and seed
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    assert loaded.peft_config["default"].r == RANK and loaded.peft_config["default"].lora_alpha == ALPHA
    merged = qatfx.merge_lora(prepared)
    lora_layers = {}
    for weight in layers.values():
        path = weight.removeprefix("lm.").removesuffix(".weight")  # Logits(lm) wraps the HF model (wrapped=True)
        layer = loaded.base_model.model.get_submodule(path)
        lora_layers[path] = layer
        owner = prepared.get_submodule(weight.rpartition(".")[0])
        a, b = owner.weight_lora_a, owner.weight_lora_b
        assert b.abs().max() > 0, path  # trained
        # the file carries our tensors bit for bit, and the scale is ours
        assert torch.equal(layer.lora_A["default"].weight, a), path
        assert torch.equal(layer.lora_B["default"].weight, b), path
        assert layer.scaling["default"] == ALPHA / RANK
        w = layer.base_layer.weight
        assert torch.equal(w, owner.weight), path  # the frozen base is the float model's

        # peft's forward (float base + adapters) against merge_lora's weight in a float linear
        x = torch.randn(3, 5, w.shape[1], generator=torch.Generator().manual_seed(len(lora_layers)))
        with torch.no_grad():
            ours = F.linear(x, merged.get_parameter(weight))
            theirs = layer(x)
        bound = _merged_linear_bound(x, w, a, b, ALPHA / RANK)
        excess = (theirs.double() - ours.double()).abs() - bound
        assert excess.max() <= 0, (path, excess.max().item())

    # peft's merge is W += (B @ A) * s: the aten ops of merge_lora (mm, mul by the float s,
    # add) in fp32, so the merged weights are equal bit for bit
    loaded.merge_and_unload()
    for weight in layers.values():
        path = weight.removeprefix("lm.").removesuffix(".weight")
        torch.testing.assert_close(lora_layers[path].base_layer.weight, merged.get_parameter(weight), atol=0, rtol=0)


def _tiny_lm(targets):
    torch.manual_seed(0)
    return qatfx.prepare_pt2e(TinyLM(layers=2), qatfx.Int8DynActInt4WeightQuantizer(32), (tokens(),),
                              lora=qatfx.LoRA(rank=RANK, alpha=ALPHA, targets=targets))


def test_partly_adapted_family_gets_module_paths(tmp_path):
    """Leaf names would make peft adapt blocks.1.q_proj too: the config names full paths then.
    The recipes' CausalLM names map to their Llama names."""
    prepared = _tiny_lm(["blocks.0.q_proj", "*.v_proj"])
    out = save_peft_adapters(prepared, tmp_path / "eager")
    config = peft.LoraConfig.from_pretrained(out)
    # the torch.compile wrapper (not run here) writes the same files
    compiled_out = save_peft_adapters(torch.compile(prepared), tmp_path / "compiled")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert (compiled_out / name).read_bytes() == (out / name).read_bytes(), name
    assert sorted(config.target_modules) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj",
    ]
    assert config.task_type == "CAUSAL_LM" and config.bias == "none" and not config.fan_in_fan_out


class TestBadInput:
    def test_no_adapters(self, tmp_path):
        plain = qatfx.prepare_pt2e(TinyLM(layers=1), qatfx.Int8DynActInt4WeightQuantizer(32), (tokens(),))
        with pytest.raises(ValueError, match="save_peft_adapters: this model has no LoRA adapters"):
            save_peft_adapters(plain, tmp_path)
        with pytest.raises(ValueError, match="not its merge_lora copy"):
            save_peft_adapters(qatfx.merge_lora(_tiny_lm(["*.q_proj"])), tmp_path)
        with pytest.raises(ValueError, match="no LoRA adapters"):
            save_peft_adapters(TinyLM(layers=1), tmp_path)
        assert not list(tmp_path.iterdir())

    def test_names_without_hf_module_path(self, tmp_path):
        x = torch.randn(2, 8, 64)
        prepared = qatfx.prepare_pt2e(Block(64, 64), qatfx.Int8DynActInt4WeightQuantizer(32), (x,),
                                      lora=qatfx.LoRA(rank=RANK, alpha=ALPHA, targets=["q_proj", "v_proj"]))
        with pytest.raises(ValueError, match=r"the adapted weights \['q_proj.weight', 'v_proj.weight'\] have no Hugging Face"):
            save_peft_adapters(prepared, tmp_path)
        assert not list(tmp_path.iterdir())
