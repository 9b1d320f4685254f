"""The README's quickstart runs as written."""

import runpy
from pathlib import Path


import qatfx

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_runs_and_converted_equals_prepared(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "8 quantized, 0 skipped" in out  # 1 block: q, k, v, o, gate, up, down; lm_head
    assert "converted == prepared exactly: True" in out


def test_size_one_example_dim_warns(caplog):
    import torch

    with caplog.at_level("WARNING", logger="qatfx"):
        qatfx.prepare_pt2e(torch.nn.Linear(64, 8), qatfx.Int8DynActInt4WeightQuantizer(32), (torch.randn(1, 64),))
    assert "dim of size 1" in caplog.text


