"""qatfx.debug.dump: one folder per run with index.html, a page per pass (FX passes and the
Inductor-side stages) with added / removed / changed nodes highlighted, the text dumps, and
no external resource. One TinyLM goes through prepare, convert and a qatfx compile."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import qatfx
import qatfx.debug
from qatfx.graph.meta import SOURCE_META_KEY
from qatfx.instrument import dumping, settings, svg, trace
from qatfx.instrument.snapshot import diff, snapshot
from qatfx.passes import infra
from qatfx.passes.infra import PassResult, run_pass
from tests.debug.html_rows import parse
from tests.models import TinyLM, tokens
from tests.passes.broken_pass import breaks_graph

FX_PASSES = ["annotate", "insert_fake_quant", "eval", "convert"]
INDUCTOR_STAGES = ["fuse_linear", "fuse_epilogue", "decompose", "eliminate_dead_code"]


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dump") / "run"
    torch._dynamo.reset()
    with qatfx.debug.dump(folder):
        prepared = qatfx.prepare_pt2e(TinyLM(layers=1), qatfx.Int8DynActInt4WeightQuantizer(32), (tokens(),))
        prepared.eval()
        converted = qatfx.convert_pt2e(prepared)
        with torch.no_grad():
            torch.compile(converted, backend="qatfx")(tokens())
    return folder


def index_rows(folder):
    return [r for r in parse(folder / "index.html").rows if r.cell_classes and r.cell_classes[0] == "num"]


def page(folder, name):
    (path,) = folder.glob(f"[0-9][0-9]_{name}.html")
    return path


def test_index_lists_every_pass_in_order(dumped):
    rows = index_rows(dumped)
    names = [r.cell("name").split("\n")[0] for r in rows]
    assert names == FX_PASSES + INDUCTOR_STAGES
    run_by = [r.cells[2] for r in rows]
    assert run_by[:4] == ["prepare_pt2e", "prepare_pt2e", ".eval()", "convert_pt2e"]
    assert all(re.fullmatch(r"torch\.compile \[\d+/\d+\]", r) for r in run_by[4:])
    # Every numbered pass has its page and both text dumps, numbered in order.
    numbers = [r.cells[0] for r in rows if r.cells[0]]
    assert numbers == [f"{i:02d}" for i in range(1, len(numbers) + 1)]
    for number, name in zip(numbers, names):
        stem = f"{number}_{name if name in FX_PASSES else 'inductor_' + name}"
        for suffix in (".html", ".before.txt", ".after.txt"):
            assert (dumped / f"{stem}{suffix}").exists(), stem + suffix
    # The per-rule counters of the Inductor stages (TinyLM: every linear fused).
    fuse = rows[names.index("fuse_linear")]
    assert "w4a8_linear" in fuse.cells[8]
    assert "decompose_quantize_dynamic" in rows[names.index("decompose")].cells[8]
    manifest = json.loads((dumped / "dump.json").read_text())
    assert [e["title"] for e in manifest["entries"]] == names


def _marked(parser, cls, side="after"):
    return {r.row_id.split("-", 1)[1] for r in parser.rows if r.cls == cls and r.row_id.startswith(side + "-")}


def test_insert_fake_quant_page_highlights_the_fake_quant_nodes(dumped):
    parsed = parse(page(dumped, "insert_fake_quant"))
    after = (dumped / page(dumped, "insert_fake_quant").name.replace(".html", ".after.txt")).read_text()
    fake_quants = set(re.findall(r"^(\w+) +call_function +fake_quantize\.default ", after, re.M))
    assert len(fake_quants) == 8 + 5  # 7 block linears + lm_head weights; 5 distinct linear inputs
    assert _marked(parsed, "added") == fake_quants
    assert not _marked(parsed, "removed", "before")
    # The linears now read the fake-quantized operands: their arguments changed.
    changed = _marked(parsed, "changed")
    assert changed and all(name.startswith("linear") for name in changed)
    # The "Changes" table lists the same nodes, each with its creator and source line.
    added_rows = [r for r in parsed.rows if r.cls == "added" and not r.row_id]
    assert {r.cell("name") for r in added_rows} == fake_quants
    for row in added_rows:
        assert row.cells[5] == "insert_fake_quant"  # made by
        assert row.cells[6].startswith("qatfx/passes/insert_fake_quant.py:"), row.cells[6]
    # Nodes from torch.export point at the model's line.
    embedding = next(r for r in parsed.rows if r.row_id == "after-embedding")
    assert embedding.cells[6].startswith("qatfx/recipes/model.py:") and embedding.cells[5] == "torch.export"


def test_convert_page_replaces_fake_quant_with_quantize_dequantize(dumped):
    parsed = parse(page(dumped, "convert"))
    removed = _marked(parsed, "removed", "before")
    added = _marked(parsed, "added")
    # Every fake-quant goes, and the float weights with them (packed int4 buffers instead;
    # lm_head's stays: the tied embedding reads it).
    assert len({n for n in removed if n.startswith("fq_")}) == 13
    weights = {n[len("fq_"):] for n in removed if n.startswith("fq_") and n.endswith("_weight")}
    assert {n for n in removed if not n.startswith("fq_")} == weights - {"lm_head_weight"}
    assert len({n for n in added if n.startswith("dq_")}) == 13
    assert any(n.endswith("_weight_packed") for n in added)
    # Removed nodes are shown (struck through) in the graph before, not after.
    assert not removed & {r.row_id[len("after-"):] for r in parsed.rows if r.row_id.startswith("after-")}


def test_annotate_page_shows_the_annotations(dumped):
    parsed = parse(page(dumped, "annotate"))
    changed = [r for r in parsed.rows if r.cls == "changed" and r.row_id.startswith("after-")]
    assert len(changed) == 8  # every linear site
    assert all("annotation=LinearAnnotation(layer=" in r.cells[-1] for r in changed)
    assert "int4/group32/sym" in changed[0].cells[-1]


def test_inductor_stage_names_its_rules_and_counters(dumped):
    parsed = parse(page(dumped, "inductor_fuse_linear"))
    counters = {r.cells[0]: int(r.cells[1]) for r in parsed.rows if len(r.cells) == 2 and r.cells[1].isdigit()}
    assert counters == {"w4a8_linear": 7, "w4a8_linear_bias": 1}
    fused = [r for r in parsed.rows if r.cls == "added" and r.row_id.startswith("after-") and "w4a8_linear" in r.cells[3]]
    assert len(fused) == 8
    for row in fused:
        assert row.cells[5].startswith("inductor:fuse_linear/w4a8_linear")
        assert re.match(r"qatfx/lowering/patterns\.py:\d+ in to_fused_linear", row.cells[6]), row.cells[6]


def test_text_dumps_say_who_made_each_node(dumped):
    text = (dumped / page(dumped, "insert_fake_quant").name.replace(".html", ".after.txt")).read_text()
    line = next(line for line in text.splitlines() if line.startswith("fq_lm_head_weight "))
    assert "made_by=insert_fake_quant" in line and "at=qatfx/passes/insert_fake_quant.py:" in line
    inductor = (dumped / page(dumped, "inductor_fuse_linear").name.replace(".html", ".after.txt")).read_text()
    assert "made_by=inductor:fuse_linear" in inductor


def test_pages_are_self_contained(dumped):
    pages = sorted(dumped.glob("*.html"))
    assert len(pages) == 1 + 7
    for path in pages:
        parsed = parse(path)
        assert not parsed.tags & {"script", "link", "iframe", "img"}, path.name
        for link in parsed.links:
            assert not re.match(r"^(https?:|//|file:)", link), (path.name, link)
            target = link.split("#")[0]
            assert not target or (dumped / target).exists(), (path.name, link)


@pytest.mark.skipif(not svg.available(), reason="needs pydot and graphviz's dot")
def test_each_page_draws_the_graph(dumped):
    text = page(dumped, "insert_fake_quant").read_text()
    drawing = text[text.index("<svg"): text.index("</svg>")]
    assert drawing.count('fill="#ccf5d3"') == 13  # the added fake-quants, in green
    assert "fq_lm_head_weight" in drawing


def test_without_graphviz_the_page_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(svg, "available", lambda: False)
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4)))

    def add_relu(g):
        out = next(n for n in g.graph.nodes if n.op == "output")
        with g.graph.inserting_before(out):
            relu = g.graph.call_function(torch.relu, (out.args[0],))
        out.args = (relu,)
        return PassResult(g, True)

    run_pass(gm, "add_relu", add_relu, dump_dir=tmp_path)
    text = (tmp_path / "01_add_relu.html").read_text()
    assert "<svg" not in text and "install pydot and graphviz" in text
    assert _marked(parse(tmp_path / "01_add_relu.html"), "added") == {"relu"}


def test_a_failing_pass_is_dumped_and_named(tmp_path):
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))

    with pytest.raises(RuntimeError, match="breaks_graph"):
        run_pass(gm, "breaks_graph", breaks_graph, dump_dir=tmp_path)
    (row,) = index_rows(tmp_path)
    assert row.cls == "failed" and "invalid graph" in row.cell("name")
    assert "The pass failed" in (tmp_path / "01_breaks_graph.html").read_text()


def test_explicit_dump_dirs_reach_every_stage_without_a_dump_block(tmp_path, monkeypatch):
    monkeypatch.delenv("QATFX_DUMP_DIR", raising=False)
    prepared = qatfx.prepare_pt2e(TinyLM(layers=1), qatfx.Int8DynActInt4WeightQuantizer(32), (tokens(),), dump_dir=tmp_path / "fx")
    converted = qatfx.convert_pt2e(prepared.eval())
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(converted, backend="qatfx", options={"qatfx_dump_dir": tmp_path / "inductor"})(tokens())
    assert [r.cell("name").split("\n")[0] for r in index_rows(tmp_path / "fx")] == FX_PASSES
    assert [r.cell("name").split("\n")[0] for r in index_rows(tmp_path / "inductor")] == INDUCTOR_STAGES


def test_a_folder_used_again_keeps_its_passes(tmp_path):
    def identity(g):
        return PassResult(g, False)

    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    run_pass(gm, "first", identity, dump_dir=tmp_path)
    dumping._FOLDERS.clear()  # as if a later process opened the folder
    run_pass(gm, "second", identity, dump_dir=tmp_path)
    assert [r.cell("name") for r in index_rows(tmp_path)] == ["first", "second"]
    assert (tmp_path / "02_second.html").exists()


def test_env_var_gives_each_process_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("QATFX_DUMP_DIR", str(tmp_path))
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    run_pass(gm, "noop", lambda g: PassResult(g, False), dump_dir=settings.resolve_dump_dir())
    (run,) = tmp_path.iterdir()
    assert re.fullmatch(rf"run-\d{{8}}-\d{{6}}-{os.getpid()}", run.name)
    assert qatfx.debug.current_dump_dir() == run
    assert {p.name for p in run.iterdir()} >= {"index.html", "01_noop.html", "01_noop.before.txt"}


def test_dumping_off_costs_nothing(monkeypatch):
    monkeypatch.delenv("QATFX_DUMP_DIR", raising=False)
    assert not trace.enabled()  # no TORCH_TRACE either

    def no_formatting(*args, **kwargs):
        raise AssertionError("a graph was formatted with dumping off")

    monkeypatch.setattr(infra, "format_graph", no_formatting)
    monkeypatch.setattr(settings, "_process_run_dir", no_formatting)
    prepared = qatfx.prepare_pt2e(TinyLM(layers=1), qatfx.Int8DynActInt4WeightQuantizer(32), (tokens(),))
    assert not prepared._create_node_hooks
    assert not any(SOURCE_META_KEY in n.meta for n in prepared.graph.nodes)


def test_diff_matches_nodes_by_name_and_target():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    before = snapshot(gm.graph, "test")
    relu = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
    with gm.graph.inserting_after(relu):
        sig = gm.graph.call_function(torch.sigmoid, (relu.args[0],))
    relu.replace_all_uses_with(sig)
    gm.graph.erase_node(relu)
    changes = diff(before, snapshot(gm.graph, "test"))
    assert [n.name for n in changes.added] == ["sigmoid"]
    assert [n.name for n in changes.removed] == ["_1"]
    assert [(old.args, new.args) for old, new in changes.changed] == [("%_1", "%sigmoid")]


def test_dump_blocks_nest():
    with qatfx.debug.dump("outer") as outer:
        with qatfx.debug.dump("inner"):
            assert qatfx.debug.current_dump_dir() == Path("inner")
        assert qatfx.debug.current_dump_dir() == outer
    assert settings._scope.get() is None


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.long
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)")
def test_pages_render_in_headless_chromium_without_console_errors(dumped, tmp_path):
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
    ]
    for name in ("index", "02_insert_fake_quant", "05_inductor_fuse_linear"):
        url = (dumped / f"{name}.html").as_uri()
        dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert "<table>" in dom.stdout
        # Console messages (a script error, a resource that failed to load) are logged as CONSOLE.
        assert not [line for line in dom.stderr.splitlines() if "CONSOLE" in line], dom.stderr[-2000:]
        png = tmp_path / f"{name}.png"
        shot = subprocess.run(
            [CHROMIUM, *flags, f"--screenshot={png}", "--window-size=1400,1000", url], capture_output=True, text=True, timeout=120
        )
        assert shot.returncode == 0 and png.stat().st_size > 10_000, shot.stderr[-2000:]
        keep = os.environ.get("QATFX_SCREENSHOT_DIR")  # to look at them
        if keep:
            shutil.copy(png, Path(keep) / png.name)


@pytest.mark.skipif(not svg.available(), reason="needs pydot and graphviz's dot")
def test_large_graphs_are_drawn_around_their_changes():
    class Chain(torch.nn.Module):
        def forward(self, x):
            for _ in range(svg.FULL_MAX_NODES):
                x = torch.relu(x)
            return x

    gm = torch.fx.symbolic_trace(Chain())
    before = snapshot(gm.graph, "test")
    middle = list(gm.graph.nodes)[100]
    with gm.graph.inserting_after(middle):
        neg = gm.graph.call_function(torch.neg, (middle,))
    user = next(u for u in middle.users if u is not neg)
    user.replace_input_with(middle, neg)
    after = snapshot(gm.graph, "test")
    drawing, note = svg.draw(before, after, diff(before, after))
    # Drawn: the new neg, the relu it reads, the relu now reading it (changed) and that
    # relu's user; not the other 197 relus.
    assert note.startswith("drawn: the 4 nodes within one edge of a change")
    assert drawing.count('class="node"') == 4
