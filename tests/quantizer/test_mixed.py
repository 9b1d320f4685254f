"""MixedQuantizer: rules by layer name or module class, first match wins, None leaves a layer
in float, embeddings follow the rules, tied pairs get one scheme, unmatched rules warn."""

import copy
import warnings

import pytest
import torch

import qatfx
from qatfx.quantizer import UnmatchedRuleWarning
from qatfx.spec import int4_per_group_embedding, int8_per_row_embedding
from tests.models import TinyLM, tokens

W8 = qatfx.Int8DynActInt8WeightQuantizer()
W4 = qatfx.Int8DynActInt4WeightQuantizer(32)


def schemes(module) -> dict:
    return {r.layer: r.scheme for r in qatfx.summary(module).layers}


def prepare(quantizer, tie=False, seed=0, **kwargs):
    torch.manual_seed(seed)
    return qatfx.prepare_pt2e(TinyLM(tie=tie).eval(), quantizer, (tokens(),), **kwargs)


def test_first_matching_rule_wins_none_is_float_and_the_rest_take_the_default():
    quantizer = qatfx.MixedQuantizer(
        [("lm_head", W8), ("blocks.0.*", None), ("*.q_proj", W8), ("blocks.1.q_proj", None)], default=W4
    )
    found = schemes(prepare(quantizer))
    assert found["lm_head"] == "8da8w"
    assert all(found[f"blocks.0.{p}"] == "float" for p in ("q_proj", "k_proj", "down_proj"))
    assert found["blocks.1.q_proj"] == "8da8w"  # rule 2 comes before rule 3
    assert found["blocks.1.k_proj"] == found["blocks.1.down_proj"] == "8da4w"
    skipped = {r.layer: r.skip_reason for r in qatfx.summary(prepare(quantizer)).skipped}
    assert "rule 1 ('blocks.0.*' -> float)" in skipped["blocks.0.v_proj"]


def test_module_class_rules_match_the_layers_module():
    # a class rule matches the class of the module that ran the linear (here nn.Linear)
    quantizer = qatfx.MixedQuantizer([(torch.nn.Linear, W8)], default=None)
    assert set(schemes(prepare(quantizer)).values()) == {"8da8w"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(qatfx.presets.PRESETS))
@pytest.mark.parametrize("tie", [False, True])
def test_prepared_equals_converted_exactly_for_every_preset(name, tie, dtype):
    torch.manual_seed(3)
    model = TinyLM(tie=tie).to(dtype).eval()
    prepared = qatfx.prepare_pt2e(model, qatfx.presets.preset(name), (tokens(),))
    converted = qatfx.convert_pt2e(prepared)
    for seed in range(3):
        t = tokens(batch=2, seq=5 + seed, seed=seed)
        torch.testing.assert_close(converted(t), prepared(t), atol=0, rtol=0)


def test_embeddings_follow_the_rules_with_each_quantizers_embedding_spec():
    emb4 = qatfx.Int8DynActInt4WeightQuantizer(32, embedding_spec=int4_per_group_embedding(32))
    quantizer = qatfx.MixedQuantizer([("embed", emb4)], default=W4)
    reports = {r.layer: r for r in qatfx.summary(prepare(quantizer)).layers}
    assert reports["embed"].weight_spec == int4_per_group_embedding(32)
    # a rule whose quantizer has no embedding_spec leaves the table in float, saying so
    quantizer = qatfx.MixedQuantizer([("lm_head", qatfx.Int8DynActInt8WeightQuantizer(embedding_spec=int8_per_row_embedding()))], default=W4)
    reports = {r.layer: r for r in qatfx.summary(prepare(quantizer)).layers}
    assert reports["lm_head"].scheme == "8da8w"
    assert "no embedding_spec" in reports["embed"].skip_reason


def test_a_tied_pair_given_two_schemes_is_refused_naming_both_rules():
    emb8 = qatfx.Int8DynActInt8WeightQuantizer(embedding_spec=int8_per_row_embedding())
    emb4 = qatfx.Int8DynActInt4WeightQuantizer(32, embedding_spec=int4_per_group_embedding(32))
    quantizer = qatfx.MixedQuantizer([("lm_head", emb8), ("embed", emb4)], default=W4)
    with pytest.raises(ValueError) as info:
        prepare(quantizer, tie=True)
    message = str(info.value)
    assert "rule 0 ('lm_head' -> 8da8w)" in message and "rule 1 ('embed' -> 8da4w)" in message
    assert "int8/PerChannel/sym" in message and "int4/group32/sym" in message
    # the same scheme on both sides is one table, one grid
    ok = qatfx.MixedQuantizer([("lm_head", emb8), ("embed", emb8)], default=W4)
    reports = {r.layer: r for r in qatfx.summary(prepare(ok, tie=True)).layers}
    assert reports["embed"].tied_to == "lm_head" and reports["lm_head"].scheme == "8da8w"


@pytest.mark.parametrize("regions", [None, "auto"])
def test_a_rule_that_matches_nothing_warns_with_the_closest_names(regions):
    quantizer = qatfx.MixedQuantizer([("*.q_prj", None), (torch.nn.Conv1d, None), ("lm_head", W8)], default=W4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare(quantizer, regions=regions)
    messages = [str(w.message) for w in caught if issubclass(w.category, UnmatchedRuleWarning)]
    assert len(messages) == 2, messages
    assert "rule 0 ('*.q_prj' -> float) matched no layer" in messages[0] and "blocks.0.q_proj" in messages[0]
    assert "rule 1 (Conv1d -> float)" in messages[1]


def test_presets_match_the_output_layer_of_a_tied_model_without_warnings():
    for name in qatfx.presets.PRESETS:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnmatchedRuleWarning)
            prepared = prepare(qatfx.presets.preset(name), tie=True)
        assert schemes(prepared)["lm_head"] == {"executorch_llama": "8da8w", "llama_cpp_q4_0": "ggml-8da8w", "vllm_w4a16": "float"}[name]


def test_region_capture_applies_the_rules_per_region():
    quantizer = qatfx.MixedQuantizer([("lm_head", W8), ("*.down_proj", None)], default=W4)
    torch.manual_seed(0)
    model = TinyLM(tie=False).eval()
    whole = schemes(qatfx.prepare_pt2e(copy.deepcopy(model), quantizer, (tokens(),)))
    regional = qatfx.prepare_pt2e(copy.deepcopy(model), quantizer, (tokens(),), regions="auto")
    assert schemes(regional) == whole
    assert whole["blocks.1.down_proj"] == "float" and whole["lm_head"] == "8da8w" and whole["blocks.1.up_proj"] == "8da4w"


@pytest.mark.parametrize(
    "rules, default, error, words",
    [
        ([("lm_head",)], W4, TypeError, "a rule is (pattern, quantizer or None)"),
        ([("lm_head", "8da8w")], W4, TypeError, "give a qatfx Quantizer"),
        ([(3, W8)], W4, TypeError, "is not a layer-name pattern"),
        ([(int, W8)], W4, TypeError, "is not an nn.Module class"),
        ([("lm_head", qatfx.MixedQuantizer([], default=W4))], W4, TypeError, "give a qatfx Quantizer"),
        ("lm_head", W4, TypeError, "list of (pattern, quantizer) pairs"),
        ([("lm_head", None)], None, ValueError, "quantizes nothing"),
        ([], "8da4w", TypeError, "default must be a qatfx Quantizer"),
    ],
)
def test_bad_rules_are_refused_naming_the_rule(rules, default, error, words):
    with pytest.raises(error, match=None) as info:
        qatfx.MixedQuantizer(rules, default=default)
    assert words in str(info.value)


def test_a_tied_pair_in_two_regions_given_two_schemes_is_refused_naming_both_rules():
    """Region capture exports the embedding and lm_head separately; the tensor they share
    still gets one grid."""
    emb8 = qatfx.Int8DynActInt8WeightQuantizer(embedding_spec=int8_per_row_embedding())
    emb4 = qatfx.Int8DynActInt4WeightQuantizer(32, embedding_spec=int4_per_group_embedding(32))
    conflicting = qatfx.MixedQuantizer([("lm_head", emb8), ("embed", emb4)], default=W4)
    with pytest.raises(ValueError, match=r"rule 1 \('embed' -> 8da4w\).*rule 0 \('lm_head' -> 8da8w\).*share one weight tensor"):
        prepare(conflicting, tie=True, regions="auto")
    prepared = prepare(qatfx.presets.executorch_llama(), tie=True, regions="auto")  # one spec for both: fine
    assert {r.layer: r.scheme for r in qatfx.summary(prepared).layers}["embed"] == "8w"
