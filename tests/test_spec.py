"""QuantSpec: the narrow grid and the scale rule, validation, and defaults that leave every
existing spec, op call and description unchanged."""

import dataclasses

import pytest
import torch

from qatfx.spec import (
    GGML,
    TORCHAO,
    PerGroup,
    PerToken,
    QuantSpec,
    int4_per_group_weight,
    int8_per_token_activation,
    q4_0_weight,
    q8_0_activation,
)

BASE_KWARGS = {"qmin", "qmax", "group_size", "symmetric", "eps", "scale_dtype"}


def test_default_specs_are_unchanged():
    for spec in (int8_per_token_activation(), int8_per_token_activation(legacy_eps=False), int4_per_group_weight(32)):
        assert not spec.narrow and spec.scale_rule == TORCHAO
        assert set(spec.op_kwargs()) == BASE_KWARGS  # no scale_rule key: graphs keep their nodes
    act = int8_per_token_activation()
    assert (act.qmin, act.qmax) == (-128, 127)
    assert act.describe() == "int8/PerToken/asym"
    assert int4_per_group_weight(32).describe() == "int4/group32/sym"


def test_narrow_drops_the_most_negative_value():
    spec = QuantSpec(8, PerGroup(32), symmetric=True, narrow=True)
    assert (spec.qmin, spec.qmax) == (-127, 127)
    assert (spec.qmax - spec.qmin) / 2 == 127  # symmetric scale = absmax / 127
    assert (dataclasses.replace(spec, bits=4).qmin) == -7
    assert spec.op_kwargs()["qmin"] == -127 and "narrow" not in spec.op_kwargs()  # qmin carries it
    assert spec.describe() == "int8/group32/sym/narrow"


def test_narrow_needs_a_signed_grid():
    with pytest.raises(ValueError, match="signed=True or narrow=False"):
        QuantSpec(8, PerToken(), symmetric=False, signed=False, narrow=True)


def test_ggml_rule_needs_a_symmetric_spec():
    with pytest.raises(ValueError, match="symmetric=True"):
        QuantSpec(8, PerToken(), symmetric=False, scale_rule=GGML)


def test_unknown_scale_rule_is_refused():
    with pytest.raises(ValueError, match="unknown scale_rule 'llama'"):
        QuantSpec(8, PerGroup(32), symmetric=True, scale_rule="llama")


def test_ggml_rule_is_passed_to_the_ops_and_described():
    spec = q8_0_activation()
    assert spec.op_kwargs() == dict(
        qmin=-127, qmax=127, group_size=32, symmetric=True, eps=2.0**-25, scale_dtype=torch.float16, scale_rule="ggml"
    )
    assert spec.describe() == "int8/group32/sym/narrow/ggml"


def test_q8_0_eps_never_moves_an_fp16_scale():
    # fp16(max(d, eps)) == fp16(d) for every d >= 0 needs fp16(eps) == 0: 2^-25 is the tie
    # that rounds to even (0), and the largest such eps.
    eps = torch.tensor(q8_0_activation().eps)
    assert eps.to(torch.float16) == 0
    assert torch.nextafter(eps, torch.tensor(1.0)).to(torch.float16) > 0


def test_q4_0_weight_is_torchao_int4_with_fp16_scales():
    spec = q4_0_weight()
    plain = int4_per_group_weight(32, torch.float16)
    assert dataclasses.replace(spec, eps=None) == plain
    # 1 / fp16(eps) is finite in fp16 (1 / 2^-16 is not)
    assert torch.isfinite(1.0 / torch.tensor(spec.eps, dtype=torch.float16))
    assert not torch.isfinite(1.0 / torch.tensor(spec.eps / 2, dtype=torch.float16))
