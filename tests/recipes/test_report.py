"""The demo's recovery column: a percentage only where PTQ's loss stands out of the seed
spread. Per-seed numbers shaped like the `qatfx demo --seeds 3` rows of docs/demo.md (same
means and spreads to about 1e-3)."""

from qatfx.recipes.demo import RowResult
from qatfx.recipes.report import _recovered_cell

CONTROL = [5.7196, 5.7347, 5.7498]  # sample std 0.0151


def test_a_ptq_loss_under_three_seed_spreads_is_within_noise():
    int4 = RowResult("int4 g32", CONTROL, [5.7468, 5.7617, 5.7766], [5.7227, 5.7434, 5.7641])
    assert _recovered_cell(int4).startswith("within noise (PTQ loss 0.0270 < 3 x seed std 0.0207)")


def test_a_ptq_loss_far_above_the_spread_gets_its_share():
    int3 = RowResult("int3 per-channel", CONTROL, [5.9695, 5.9903, 6.0111], [5.7701, 5.7796, 5.7891])
    # per seed (PTQ - QAT) / (PTQ - control): 0.798, 0.824, 0.850
    assert _recovered_cell(int3) == "82% ± 3%"


def test_one_seed_says_the_spread_is_unknown():
    row = RowResult("int4 g32", [5.7171], [5.7446], [5.7199])
    assert _recovered_cell(row) == "90% (1 seed: spread unknown, run --seeds 3)"


def test_ptq_that_lost_nothing_has_no_share():
    assert _recovered_cell(RowResult("int8", [5.7, 5.7], [5.69, 5.7], [5.7, 5.7])) == "n/a (PTQ lost nothing)"
