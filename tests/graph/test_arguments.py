"""op_arguments: a custom op's arguments by schema name, positional or keyword, with defaults."""

import torch

import qatfx  # noqa: F401  registers the qatfx:: ops
from qatfx.graph.arguments import op_arguments


def _graph_calling(target, args, kwargs):
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    return graph.call_function(target, (x, *args), kwargs)


def test_positional_keyword_and_default_arguments_by_name():
    fq = _graph_calling(
        torch.ops.qatfx.fake_quantize.default, (),
        dict(qmin=-8, qmax=7, group_size=32, symmetric=True, eps=None, scale_dtype=torch.float32),
    )
    args = op_arguments(fq)
    assert args["x"].name == "x"
    assert (args["qmin"], args["qmax"], args["group_size"], args["symmetric"]) == (-8, 7, 32, True)
    assert args["enabled"] is True  # the schema's default: the call left it out

    dq = _graph_calling(torch.ops.qatfx.dequantize_int4.default, (None, None, 64, torch.bfloat16), {})
    assert {k: v for k, v in op_arguments(dq).items() if k != "packed"} == {
        "scales": None, "group_sums": None, "group_size": 64, "out_dtype": torch.bfloat16,
    }
