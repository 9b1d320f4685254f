"""LoRA on prepared models: prepare_pt2e(..., lora=LoRA(...)), training, merge_lora, convert."""

import math

import pytest
import torch

import qatfx
from qatfx.graph.meta import ROLE_META_KEY, WEIGHT
from qatfx.ops import fake_quantize
from qatfx.passes.insert_fake_quant import fake_quant_nodes
from tests.model_zoo import hf_llama_logits, torchtune_llama3_2
from tests.models import Block

DIM = 64
TARGETS = ("q_proj", "v_proj", "down_proj")
LLAMA_TARGETS = ["*.q_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj", "*.down_proj"]


def _block(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Block(dim=DIM, hidden=DIM).to(dtype).train()


def _x(seed, dtype=torch.float32, seq=8):
    return torch.randn(2, seq, DIM, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _prepare(mode="merge_consistent", dtype=torch.float32, seed=0, **lora):
    config = qatfx.LoRA(rank=4, alpha=8, targets=lora.pop("targets", TARGETS), mode=mode, **lora)
    return qatfx.prepare_pt2e(_block(seed, dtype), qatfx.Int8DynActInt4WeightQuantizer(32), (_x(0, dtype),), lora=config)


def _adapters(prepared):
    return [p for p in prepared.parameters() if p.requires_grad]


def _train(prepared, steps=3, seed=0, dtype=torch.float32, lr=1e-2, model=None):
    model = model or prepared
    opt = torch.optim.Adam(_adapters(prepared), lr=lr)
    for step in range(steps):
        model(_x(seed * 100 + step, dtype)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


class TestConfig:
    @pytest.mark.parametrize("kwargs, message", [
        (dict(rank=0, alpha=1, targets=["a"]), "rank must be a positive int"),
        (dict(rank=2, alpha=0, targets=["a"]), "alpha must be > 0"),
        (dict(rank=2, alpha=1, targets=["a"], dropout=1.0, mode="torchtune"), r"dropout must be in \[0, 1\)"),
        (dict(rank=2, alpha=1, targets=["a"], mode="qlora"), "mode must be one of"),
        (dict(rank=2, alpha=1, targets=[]), "targets is empty"),
        (dict(rank=2, alpha=1, targets=["a"], dropout=0.1), 'dropout needs mode="torchtune"'),
    ])
    def test_bad_config(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            qatfx.LoRA(**kwargs)

    def test_frozen_and_scale(self):
        config = qatfx.LoRA(rank=4, alpha=8, targets="q_proj")
        assert config.targets == ("q_proj",) and config.scale == 2.0
        with pytest.raises(Exception):
            config.rank = 2


class TestBadInput:
    def test_skipped_layer(self):
        with pytest.raises(ValueError, match=r"LoRA target 'q_proj' is not quantized .*skip pattern"):
            qatfx.prepare_pt2e(_block(), qatfx.Int8DynActInt4WeightQuantizer(32, skip=["q_proj"]), (_x(0),),
                               lora=qatfx.LoRA(4, 8, targets=["q_proj"]))

    def test_targets_match_nothing(self):
        with pytest.raises(ValueError, match=r"match no linear layer; the layers are: \['q_proj', 'k_proj'"):
            _prepare(targets=["*.nothing"])

    def test_rank_too_big_names_layer(self):
        with pytest.raises(ValueError, match=r"LoRA rank 65 > min\(N, K\) = 64 for layer 'q_proj'"):
            qatfx.prepare_pt2e(_block(), qatfx.Int8DynActInt4WeightQuantizer(32), (_x(0),),
                               lora=qatfx.LoRA(65, 8, targets=["q_proj"]))

    def test_bad_input_leaves_model_trainable(self):
        model = _block()
        with pytest.raises(ValueError):
            qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(32), (_x(0),), lora=qatfx.LoRA(4, 8, targets=["x"]))
        assert all(p.requires_grad for p in model.parameters())

    def test_regions_refused(self):
        with pytest.raises(NotImplementedError, match="regions=None"):
            qatfx.prepare_pt2e(_block(), qatfx.Int8DynActInt4WeightQuantizer(32), (_x(0),), regions="auto",
                               lora=qatfx.LoRA(4, 8, targets=["q_proj"]))

    def test_k_by_n_weight_refused(self):
        class KByN(torch.nn.Module):  # GPT-2 Conv1D-style: x @ W with W stored (K, N)
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.randn(DIM, 32))

            def forward(self, x):
                return x @ self.w

        with pytest.raises(NotImplementedError, match=r"LoRA on 'w': only aten.linear with an \(N, K\) weight"):
            qatfx.prepare_pt2e(KByN(), qatfx.Int8DynActInt4WeightQuantizer(32), (_x(0),), lora=qatfx.LoRA(4, 8, targets=["w"]))

    def test_lora_type(self):
        with pytest.raises(TypeError, match="qatfx.LoRA"):
            qatfx.prepare_pt2e(_block(), qatfx.Int8DynActInt4WeightQuantizer(32), (_x(0),), lora={"rank": 4})

    def test_merge_without_adapters(self):
        plain = qatfx.prepare_pt2e(_block(), qatfx.Int8DynActInt4WeightQuantizer(32), (_x(0),))
        with pytest.raises(ValueError, match="merge_lora: this model has no LoRA adapters"):
            qatfx.merge_lora(plain)
        with pytest.raises(ValueError, match="needs a module returned by prepare_pt2e"):
            qatfx.merge_lora(_block())

    def test_convert_unmerged(self):
        with pytest.raises(ValueError, match=r"unmerged LoRA adapters; call qatfx.merge_lora\(prepared\) first"):
            qatfx.convert_pt2e(_prepare())


class TestMergeConsistent:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_converted_merge_equals_prepared_bit_for_bit(self, dtype):
        prepared = _prepare(dtype=dtype)
        for seed in range(20):  # training between checks: B != 0, every seed a new state
            prepared.train()
            _train(prepared, steps=2, seed=seed, dtype=dtype)
            assert prepared.q_proj.weight_lora_b.abs().max() > 0
            prepared.eval()
            converted = qatfx.convert_pt2e(qatfx.merge_lora(prepared))
            x = _x(1000 + seed, dtype)
            torch.testing.assert_close(converted(x), prepared(x).detach(), atol=0, rtol=0)

    def test_merged_graph_is_a_plain_prepared_graph(self):
        prepared = _prepare()
        _train(prepared)
        merged = qatfx.merge_lora(prepared)
        assert not [n for n, _ in merged.named_parameters() if "lora" in n]
        weight_fqs = [n for n in fake_quant_nodes(merged) if n.meta[ROLE_META_KEY] == WEIGHT]
        assert all(n.args[0].op == "get_attr" for n in weight_fqs) and len(weight_fqs) == 7
        assert merged.qatfx_lora_merge_gap == {}
        # the unmerged model is untouched and still trains
        assert prepared.q_proj.weight_lora_a.requires_grad

    def test_only_adapters_train(self):
        model = _block()
        prepared = qatfx.prepare_pt2e(model, qatfx.Int8DynActInt4WeightQuantizer(32), (_x(0),),
                                      lora=qatfx.LoRA(4, 8, targets=TARGETS))
        # the user's model is left as it was (same storage, its own requires_grad)
        assert all(p.requires_grad for p in model.parameters())
        assert model.q_proj.weight.data_ptr() == prepared.q_proj.weight.data_ptr()
        names = [n for n, p in prepared.named_parameters() if p.requires_grad]
        assert names == [f"{layer}.weight_lora_{ab}" for layer in ("q_proj", "v_proj", "down_proj") for ab in "ab"]
        opt = torch.optim.SGD(_adapters(prepared), lr=0.1)
        assert len(opt.param_groups[0]["params"]) == 6
        prepared(_x(0)).pow(2).mean().backward()
        for name, p in prepared.named_parameters():
            assert (p.grad is not None) == ("lora" in name), name
        a, b = prepared.q_proj.weight_lora_a, prepared.q_proj.weight_lora_b
        assert a.shape == (4, DIM) and b.shape == (DIM, 4) and not b.any() and a.abs().max() <= 1 / math.sqrt(DIM)



class TestTorchtune:
    def test_merge_gap_reported_and_nonzero(self):
        prepared = _prepare("torchtune")
        _train(prepared, lr=5e-2)
        prepared.eval()
        merged = qatfx.merge_lora(prepared)
        gaps = merged.qatfx_lora_merge_gap
        assert set(gaps) == set(TARGETS)
        assert all(math.isfinite(db) and db > 0 for db in gaps.values())  # a real, finite gap
        converted = qatfx.convert_pt2e(merged)
        x = _x(7)
        torch.testing.assert_close(converted(x), merged(x), atol=0, rtol=0)
        assert not torch.equal(converted(x), prepared(x))  # deployed != trained: the gap

    def test_fq_of_frozen_weight_computed_once(self):
        prepared = _prepare("torchtune")
        weight_fqs = [n.args[0].target for n in fake_quant_nodes(prepared) if n.meta[ROLE_META_KEY] == WEIGHT]
        assert not any(t.split(".")[0] in TARGETS for t in weight_fqs)  # no per-step fq of a target W
        expected = fake_quantize(prepared.q_proj.weight, **_weight_spec(prepared).op_kwargs())
        torch.testing.assert_close(prepared.q_proj.weight_fq, expected, atol=0, rtol=0)
        _train(prepared)
        torch.testing.assert_close(prepared.q_proj.weight_fq, expected, atol=0, rtol=0)
        assert "q_proj.weight_fq" not in prepared.state_dict()

    def test_fake_quant_toggle_reaches_the_frozen_weight(self):
        prepared = _prepare("torchtune")
        qatfx.disable_fake_quant(prepared)
        torch.testing.assert_close(prepared.q_proj.weight_fq, prepared.q_proj.weight, atol=0, rtol=0)
        qatfx.enable_fake_quant(prepared)
        assert not torch.equal(prepared.q_proj.weight_fq, prepared.q_proj.weight)

    def test_dropout_follows_train_eval(self):
        prepared = _prepare("torchtune", dropout=0.5)
        dropouts = [n for n in prepared.graph.nodes if n.target is torch.ops.aten.dropout.default and "qatfx_lora" in n.meta]
        assert len(dropouts) == 3 and all(n.args[2] is True for n in dropouts)
        prepared.eval()
        assert all(n.args[2] is False for n in dropouts)
        torch.testing.assert_close(prepared(_x(1)), prepared(_x(1)), atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["merge_consistent", "torchtune"])
def test_starts_equal_to_the_plain_prepared_model(mode):
    plain = qatfx.prepare_pt2e(_block(), qatfx.Int8DynActInt4WeightQuantizer(32), (_x(0),)).eval()
    lora = _prepare(mode).eval()
    torch.testing.assert_close(lora(_x(3)), plain(_x(3)), atol=0, rtol=0)


def _weight_spec(prepared):
    return next(n.meta["qatfx_spec"] for n in fake_quant_nodes(prepared) if n.meta[ROLE_META_KEY] == WEIGHT)


@pytest.mark.parametrize("mode", ["merge_consistent", "torchtune"])
def test_state_dict_round_trip(mode):
    trained = _prepare(mode)
    _train(trained)
    trained.eval()
    fresh = _prepare(mode, seed=1).eval()  # other base weights: the load must bring W (and fq(W)) too
    fresh.load_state_dict(trained.state_dict())
    torch.testing.assert_close(fresh(_x(5)), trained(_x(5)), atol=0, rtol=0)


# cold compiles of the LoRA graphs at two lengths (30-50 s each on 2 cores): long run
@pytest.mark.long
@pytest.mark.parametrize("mode", ["merge_consistent", "torchtune"])
def test_compiled_training_two_sequence_lengths(mode):
    torch._dynamo.reset()
    prepared = _prepare(mode)
    compiled = torch.compile(prepared)
    opt = torch.optim.Adam(_adapters(prepared), lr=1e-2)
    for step, seq in enumerate((8, 12, 8, 12)):
        loss = compiled(_x(step, seq=seq)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    assert prepared.q_proj.weight_lora_b.abs().max() > 0
    prepared.eval()  # no dropout: compiled and eager see the same numbers
    torch.testing.assert_close(compiled(_x(9, seq=12)), prepared(_x(9, seq=12)), atol=1e-4, rtol=1e-4)
    merged = qatfx.merge_lora(compiled)  # the torch.compile wrapper is accepted
    assert "add_lora" in merged.meta["qatfx_pass_history"] and merged.meta["qatfx_pass_history"][-1] == "merge_lora"


def _train_lm(prepared, vocab, steps=2):
    """Next-token steps on random tokens, adapters only."""
    opt = torch.optim.Adam(_adapters(prepared), lr=1e-2)
    for step in range(steps):
        t = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(step))
        logits = prepared(t)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), t[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()


def test_hf_llama_attention_and_mlp():
    model, vocab = hf_llama_logits()
    tokens = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    prepared = qatfx.prepare_pt2e(model.train(), qatfx.Int8DynActInt4WeightQuantizer(32), (tokens,),
                                  lora=qatfx.LoRA(rank=4, alpha=8, targets=LLAMA_TARGETS))
    adapted = {n.rsplit(".", 1)[0] for n, p in prepared.named_parameters() if p.requires_grad}
    layers = model.lm.config.num_hidden_layers
    assert len(adapted) == 6 * layers and not any("k_proj" in n or "lm_head" in n for n in adapted)
    _train_lm(prepared, vocab)
    prepared.eval()
    converted = qatfx.convert_pt2e(qatfx.merge_lora(prepared))
    t = torch.randint(0, vocab, (3, 10), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(converted(t), prepared(t).detach(), atol=0, rtol=0)


# torchtune's names for q/v/o/gate/up/down: attn.{q,v,output}_proj, mlp.w1 (gate) / w3 (up) / w2 (down)
TORCHTUNE_TARGETS = ["*.q_proj", "*.v_proj", "*.output_proj", "*.w1", "*.w3", "*.w2"]


@pytest.mark.parametrize("mode", ["merge_consistent", "torchtune"])
def test_torchtune_llama3_2_attention_and_mlp(mode):
    model, vocab = torchtune_llama3_2()
    tokens = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    prepared = qatfx.prepare_pt2e(model.train(), qatfx.Int8DynActInt4WeightQuantizer(32), (tokens,),
                                  lora=qatfx.LoRA(rank=4, alpha=8, targets=TORCHTUNE_TARGETS, mode=mode))
    adapted = {n.rsplit(".", 1)[0] for n, p in prepared.named_parameters() if p.requires_grad}
    layers = len(model.layers)
    assert len(adapted) == 6 * layers and not any("k_proj" in n or n.startswith("output") for n in adapted)
    _train_lm(prepared, vocab)
    assert all(p.abs().max() > 0 for n, p in prepared.named_parameters() if n.endswith("_lora_b"))
    prepared.eval()
    merged = qatfx.merge_lora(prepared)
    converted = qatfx.convert_pt2e(merged)
    t = torch.randint(0, vocab, (3, 10), generator=torch.Generator().manual_seed(9))
    if mode == "merge_consistent":  # deploys what trained
        torch.testing.assert_close(converted(t), prepared(t).detach(), atol=0, rtol=0)
        assert merged.qatfx_lora_merge_gap == {}
    else:  # deploys fq(W + sBA), trained fq(W) + sBA: the gap is reported per adapted layer
        torch.testing.assert_close(converted(t), merged(t), atol=0, rtol=0)
        assert not torch.equal(converted(t), prepared(t))
        gaps = merged.qatfx_lora_merge_gap
        assert len(gaps) == 6 * layers and all(math.isfinite(db) and db > 0 for db in gaps.values())


def test_passes_are_dumped_and_summary_still_reads(tmp_path):
    config = qatfx.LoRA(rank=4, alpha=8, targets=TARGETS, mode="torchtune")
    prepared = qatfx.prepare_pt2e(_block(), qatfx.Int8DynActInt4WeightQuantizer(32), (_x(0),), lora=config, dump_dir=tmp_path)
    qatfx.merge_lora(prepared)
    dumped = {p.name for p in tmp_path.iterdir()}
    assert any("add_lora" in name for name in dumped) and any("merge_lora" in name for name in dumped)
    assert len(qatfx.summary(prepared).quantized) == 7
