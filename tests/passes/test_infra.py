import pytest
import torch

import qatfx
from qatfx.passes.convert import convert
from qatfx.passes.fake_quant_toggle import set_fake_quant_enabled
from qatfx.passes.infra import history, run_pass
from qatfx.passes.insert_fake_quant import insert_fake_quant
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


def test_a_pass_run_before_what_it_requires_names_the_missing_pass():
    prepared = qatfx.prepare_pt2e(TinyLM(), qatfx.Int8DynActInt4WeightQuantizer(32), (tokens(),))
    assert history(prepared) == ["annotate", "insert_fake_quant"]
    converted = qatfx.convert_pt2e(prepared.eval())
    assert history(converted) == ["annotate", "insert_fake_quant", "eval", "convert"]  # copied with the module

    captured = torch.export.export(TinyLM(), (tokens(),)).module()
    with pytest.raises(RuntimeError, match="pass 'convert' needs pass 'insert_fake_quant' to have run on this module first"):
        run_pass(captured, "convert", convert)
    with pytest.raises(RuntimeError, match="'insert_fake_quant' needs pass 'annotate'"):
        run_pass(captured, "insert_fake_quant", insert_fake_quant)


def test_declared_requirements_form_the_prepare_convert_schedule():
    assert insert_fake_quant.requires == ("annotate",)
    assert convert.requires == ("insert_fake_quant",)
    assert set_fake_quant_enabled(True).requires == ("insert_fake_quant",)
