import pytest
import torch

import qatfx
from qatfx.passes.infra import run_pass
from tests.models import TinyLM, tokens
from tests.passes.broken_pass import breaks_graph


def test_dump_dir_argument_writes_every_pass_in_order(tmp_path):
    prepared = qatfx.prepare_pt2e(TinyLM(), qatfx.Int8DynActInt4WeightQuantizer(32), (tokens(),), dump_dir=tmp_path)
    prepared.eval()
    qatfx.convert_pt2e(prepared)
    names = sorted(p.name for p in tmp_path.iterdir())
    passes = ["annotate", "insert_fake_quant", "eval", "convert"]
    assert names == sorted(
        [f"{i:02d}_{name}.{kind}" for i, name in enumerate(passes, start=1) for kind in ("after.txt", "before.txt", "html")]
        + ["dump.json", "index.html"]
    )
    after = (tmp_path / "02_insert_fake_quant.after.txt").read_text()
    assert "torch.ops.qatfx.fake_quantize.default" in after
    # each node line says which pass made it, with shape and dtype
    assert any("fq_lm_head_weight" in line and "made_by=insert_fake_quant" in line and "float32[96, 64]" in line for line in after.splitlines())
    assert "made_by=convert" in (tmp_path / "04_convert.after.txt").read_text()


def test_env_var_enables_dumps(tmp_path, monkeypatch):
    monkeypatch.setenv("QATFX_DUMP_DIR", str(tmp_path))
    qatfx.prepare_pt2e(TinyLM(), qatfx.Int8DynActInt4WeightQuantizer(32), (tokens(),))
    (run,) = tmp_path.glob("run-*")  # one folder per process
    assert (run / "01_annotate.before.txt").exists() and (run / "index.html").exists()


def test_invalid_graph_names_the_pass():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))

    with pytest.raises(RuntimeError, match="qatfx pass 'breaks_graph' produced an invalid graph"):
        run_pass(gm, "breaks_graph", breaks_graph)
