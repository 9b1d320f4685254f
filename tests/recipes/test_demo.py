"""The demo's QAT+LoRA rows against their own float control (the same adapters trained with
fake-quant off), and the perplexity plot's row labels. Tiny preset, on the project's docs
(no download); the whole tiny demo with its exports is in test_cli.py."""

import copy
import itertools
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import qatfx
from qatfx.graph.meta import CONVERTED
from qatfx.graph.regions import model_stage
from qatfx.recipes.demo import (
    PRESETS,
    SCHEMES,
    DemoResult,
    RowResult,
    demo_setup,
    finetune_config,
    prepare_row,
    ptq,
    run_demo,
    train_control,
)
from qatfx.recipes.report import markdown_report, perplexity_figure

ROOT = Path(__file__).resolve().parents[2]
LORA = "int4 g32 QAT+LoRA (r=8)"
LORA_TORCHTUNE = "int4 g32 QAT+LoRA (r=8, torchtune)"


@pytest.fixture(scope="module")
def docs_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))))
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # the tiny float model, pretrained once for the module


@pytest.fixture(scope="module")
def setup(docs_text, cache_dir):
    return demo_setup(PRESETS["tiny"], docs_text, cache_dir)


@pytest.fixture(scope="module")
def lora_control(setup):
    return train_control(setup, SCHEMES[LORA], finetune_config(setup.preset, 0), 0)


def test_both_lora_rows_share_one_lora_control_and_full_qat_rows_the_float_one():
    preset = PRESETS["tiny"]
    lora, torchtune, int4 = (SCHEMES[name].control(preset) for name in (LORA, LORA_TORCHTUNE, "int4 g32"))
    # with fake-quant off the two modes compute the same float function: one control
    assert lora == torchtune and lora.lora.mode == "merge_consistent" and lora.lr == preset.lora_lr
    assert int4 == SCHEMES["int3 per-channel"].control(preset) and int4.lora is None and int4 != lora
    # a LoRA control is a graph prepared with the row's quantizer: another quantizer, another control
    for other in (replace(SCHEMES[LORA], bits=3, group_size=None), replace(SCHEMES[LORA], learnable=True)):
        assert other.control(preset) != lora and other.control(preset).lora == lora.lora


def test_lora_control_trains_the_adapters_alone_with_fake_quant_off(setup, lora_control):
    model = lora_control.model
    assert not qatfx.fake_quant_enabled(model)
    start = prepare_row(setup, SCHEMES[LORA], finetune_config(setup.preset, 0).seed)  # the QAT row's start
    base = setup.base.state_dict()
    trained = dict(model.named_parameters())
    adapters = [name for name in trained if name.endswith(("_lora_a", "_lora_b"))]
    assert len(adapters) == 2 * 6  # q/v/o/gate/up/down of the one block
    for name, param in trained.items():
        if name in adapters:  # trained away from the QAT row's starting adapters
            assert param.requires_grad and not torch.equal(param, start.get_parameter(name)), name
        else:  # the frozen float model, exactly
            assert not param.requires_grad and torch.equal(param, base[name]), name


def test_lora_control_ptq_is_the_merged_control_converted(setup, lora_control):
    merged = qatfx.merge_lora(lora_control.model)
    # merge_consistent with fake-quant off: the merged float model is the control, bit for bit
    assert setup.perplexity(merged, desc="eval merged control") == lora_control.ppl
    converted = ptq(setup, SCHEMES[LORA], lora_control)
    assert model_stage(converted) == CONVERTED
    # convert == fake-quant on (the contract): PTQ quantizes the control's own trained adapters
    quantized_control = copy.deepcopy(lora_control.model)
    qatfx.enable_fake_quant(quantized_control)
    with torch.no_grad():
        assert torch.equal(converted(setup.example), quantized_control.eval()(setup.example))


def test_lora_rows_report_their_own_control_and_recover_against_it(setup, docs_text, cache_dir, lora_control):
    result = run_demo("tiny", 1, docs_text, cache_dir, rows=(LORA, LORA_TORCHTUNE))
    rows = {row.scheme: row for row in result.rows}
    merged_ptq = setup.perplexity(ptq(setup, SCHEMES[LORA], lora_control), desc="eval PTQ")
    for name in (LORA, LORA_TORCHTUNE):
        # the control train_control trains (adapters only, fake-quant off) and its merged PTQ
        assert rows[name].control_ppl == [lora_control.ppl] and rows[name].ptq_ppl == [merged_ptq]
        assert rows[name].control.startswith("LoRA adapters (rank 8, alpha 16, lr 0.003) trained in float")
    # the shared LoRA control trained once, and no full fine-tuning control at all
    assert [label for label in result.curves if label.startswith("float control")] == ["float control, LoRA r=8 (seed 0)"]
    report = markdown_report(result)
    assert f"float control of {LORA}, {LORA_TORCHTUNE}: LoRA adapters" in report
    # the table's "QAT recovers" is (PTQ - QAT) / (PTQ - control) of the LoRA control's numbers
    row = rows[LORA]
    ptq_ppl, qat_ppl = row.ptq_ppl[0], row.qat_ppl[0]
    share = (ptq_ppl - qat_ppl) / (ptq_ppl - lora_control.ppl)
    cell = "n/a (PTQ lost nothing)" if ptq_ppl <= lora_control.ppl else f"{100 * share:.0f}% (1 seed"
    assert f"| {LORA} | {lora_control.ppl:.4f} | {ptq_ppl:.4f} " in report and cell in report


def _label_boxes(names: list[str]) -> tuple[list, object]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [RowResult(name, [5.75, 5.76], [5.79, 5.80], [5.76, 5.77]) for name in names]
    fig = perplexity_figure(DemoResult("default", [0, 1], "test", {}, 1, 1, 5.9, rows, {}, 1.0))
    renderer = fig.canvas.get_renderer()  # Agg: where the saved PNG draws each label
    boxes = [label.get_window_extent(renderer) for label in fig.axes[0].get_xticklabels()]
    plt.close(fig)
    return boxes, fig.bbox


@pytest.mark.parametrize("count", [5, len(SCHEMES) + 1])
def test_perplexity_plot_row_labels_neither_overlap_nor_leave_the_figure(count):
    # every row name, the longest included, and a future row kind
    names = [*SCHEMES, "int3 per-channel QAT+KD+LSQ"][-count:]
    boxes, figure = _label_boxes(names)
    assert len(boxes) == count
    for a, b in itertools.pairwise(boxes):
        assert a.x1 < b.x0, "neighbouring row labels overlap"
    for box in boxes:
        assert figure.x0 <= box.x0 and box.x1 <= figure.x1 and figure.y0 <= box.y0, "a row label is clipped"


def test_recovery_rows_distill_from_the_start_model_and_train_their_scales(setup):
    """QAT+KD+LSQ: the float control is the full-QAT rows' one; the teacher is the starting
    float model, sharing every tensor with it (the row trains a copy: nothing is copied); the
    scales have their own learning rate and move."""
    from dataclasses import replace

    from qatfx.distillation import teacher_memory
    from qatfx.recipes.demo import qat_config

    name = "int3 per-channel QAT+KD+LSQ"
    scheme = SCHEMES[name]
    assert scheme.control(setup.preset) == SCHEMES["int3 per-channel"].control(setup.preset)
    finetune = replace(finetune_config(setup.preset, 0), steps=2, warmup_steps=1)
    prepared = prepare_row(setup, scheme, finetune.seed)
    scales = qatfx.learned_qparams(prepared)
    assert scales and all(r.weight_spec.learnable for r in qatfx.summary(prepared).layers if r.quantized)
    config, distill = qat_config(setup, scheme, finetune, prepared)
    assert config.scale_lr == setup.preset.scale_lr and distill.kd_weight == setup.preset.kd_weight
    memory = teacher_memory(distill.teacher)
    assert memory.copied_bytes == 0 and memory.shared_bytes > 0
    start = {n: p.detach().clone() for n, p in scales.items()}
    setup.train(prepared, config, desc=name, distill=distill)
    assert any(not torch.equal(p, start[n]) for n, p in scales.items())
    assert len(distill.parts["distillation"]) == 2
