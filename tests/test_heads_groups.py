"""Cells of one shape in one stacked step (heads/groups.py): which heads may share a step, and a head trained in
a cross-cell group is bit-identical to the same head trained alone (fp32 and bf16 on the CPU)."""
import pytest
import torch

from heads.dispatch import Task, group_tasks
from heads.groups import GroupHead
from heads.grid import Cell
from heads.models import HeadConfig, StackedHead
from heads.train import HeadData, TrainSettings, train_group, train_heads
from tests.test_heads_train import SETTINGS, make_data, summary, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def key(strategy, fusion, **kw):
    return StackedHead(tiny(strategy, fusion, **kw)).shape_key()


def test_same_shape_means_every_parameter_shape_and_the_strategy():
    for s in ("1A", "2A", "2B"):
        dims = (8, 8) if s == "1A" else (16, 12)
        assert key(s, "add", dims=dims) == key(s, "average", dims=dims) == key(s, "product", dims=dims)
        assert len({key(s, f, dims=dims) for f in ("add", "concat", "gated")}) == 3   # wider input / gate weights
    assert key("2A", "add") != key("2B", "add")          # 2-B has per-modality classifiers
    assert StackedHead(HeadConfig("1A", "add", (8, 8), 4, fusion_dim=10)).shape_key() != \
        StackedHead(HeadConfig("1A", "add", (6, 6), 4, fusion_dim=10)).shape_key()
    assert key("2A", "add") != StackedHead(HeadConfig("2A", "add", (16, 12), 4, middle_dim=20, fusion_dim=10,
                                                      dropout=0.1)).shape_key()


def test_a_group_of_different_shapes_is_refused_naming_the_cells():
    with pytest.raises(ValueError, match="2A-add, 2A-concat have different shapes"):
        GroupHead([tiny("2A", "add"), tiny("2A", "concat")])


# heads of three operators, interleaved so each operator appears in two segments of the stack
MIXED = [("add", 0), ("average", 1), ("product", 0), ("add", 2), ("average", 0), ("product", 1)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("strategy", ["2A", "2B", "1A"])
def test_a_head_in_a_cross_cell_group_is_bit_identical_to_it_alone(strategy, precision):
    dims = (8, 8) if strategy == "1A" else (16, 12)
    xi, xt, y, split = make_data(d_img=dims[0], d_txt=dims[1])
    data = HeadData.from_arrays([xi, xt], y, split)
    # patience 2 over 10 epochs: heads stop at different epochs, so the group shrinks mid-training
    settings = TrainSettings(batch_size=32, max_epochs=10, patience=2, lr=3e-3, precision=precision)
    heads = [(tiny(strategy, f, dims=dims), seed) for f, seed in MIXED]
    grouped = train_group(heads, data, settings)
    assert {r.group_size for r in grouped} == {len(MIXED)}
    assert len({r.epochs_run for r in grouped}) > 1, "the test needs heads that leave the group early"
    for (config, seed), g in zip(heads, grouped):
        for alone in (train_heads(config, [seed], data, settings)[0],
                      train_heads(config, [seed], data, settings, batched=False)[0]):
            assert summary([g]) == summary([alone]) and g.seed == alone.seed == seed
            for k in g.params:
                assert torch.equal(g.params[k], alone.params[k]), (config.cell, seed, k)


def test_the_gated_operator_groups_its_seeds_with_its_gate_weights_per_head():
    xi, xt, y, split = make_data()
    data = HeadData.from_arrays([xi, xt], y, split)
    config = tiny("2A", "gated")
    grouped = train_group([(config, 3), (config, 4)], data, SETTINGS)
    assert grouped[0].params["fusion.weight"].shape[0] == 1
    assert summary(grouped) == summary(train_heads(config, [3, 4], data, SETTINGS, batched=False))


def _task(strategy, fusion, sets, seeds=(0, 1)):
    dims = {"i": 16, "t": 12, "di": 8, "dt": 8}
    config = HeadConfig(strategy, fusion, tuple(dims[s] for s in sets), 4, middle_dim=20, fusion_dim=10)
    cell = Cell(strategy, fusion, tuple(sets), ("i", "t") if strategy in ("image", "text") else tuple(sets),
                ("img", "txt"))
    return Task(cell, config, list(seeds))


def test_tasks_group_by_rows_and_shape_in_grid_order():
    tasks = [_task("1A", "add", ("di", "dt")), _task("1A", "concat", ("di", "dt")),
             _task("1A", "product", ("di", "dt")), _task("2A", "add", ("i", "t")), _task("2A", "gated", ("i", "t")),
             _task("2A", "average", ("i", "t"), seeds=(2,)), _task("image", None, ("i",)),
             _task("text", None, ("t",))]
    groups = group_tasks(tasks)
    assert [[t.cell.name for t in g] for g in groups] == [
        ["1A-add", "1A-product"], ["1A-concat"], ["2A-add", "2A-average"], ["2A-gated"], ["image"], ["text"]]
    assert group_tasks(tasks, enabled=False) == [[t] for t in tasks]
