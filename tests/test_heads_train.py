"""Training: batched == sequential for the same seeds, seeds reproduce and differ, heads learn."""
import numpy as np
import pytest
import torch

from heads.fusion import list_fusions
from heads.models import HeadConfig
from heads.train import HeadData, TrainSettings, train_heads
from store_factory import IMAGE, TEXT, make_features


pytestmark = pytest.mark.usefixtures("one_thread")


C = 4
SETTINGS = TrainSettings(batch_size=32, max_epochs=8, patience=3, lr=3e-3)


def make_data(d_img=16, d_txt=12, noise=1.0, seed=0):
    """Class-dependent Gaussian features (class means + noise * `noise`); 200 train / 50 val / 50 test."""
    data = make_features(classes=C, per_split=(200, 50, 50), features={IMAGE: d_img, TEXT: d_txt},
                         separation=1.0, noise=noise, seed=seed)
    return data.features[IMAGE], data.features[TEXT], data.labels, data.splits


def tiny(strategy, fusion, dims=(16, 12)):
    if strategy in ("image", "text"):
        dims = (dims[0],) if strategy == "image" else (dims[1],)
    return HeadConfig(strategy, fusion, dims, C, middle_dim=20, fusion_dim=10)


def summary(results):
    return [(r.test_accuracy, r.test_macro_f1, r.best_epoch, r.epochs_run, r.best_val_accuracy) for r in results]


CELLS = [(s, f) for s in ("2A", "2B") for f in list_fusions()] + [("image", None), ("text", None)]


@pytest.mark.parametrize("strategy,fusion", CELLS)
def test_batched_equals_sequential(strategy, fusion):
    xi, xt, y, split = make_data()
    feats = [xi, xt] if strategy not in ("image", "text") else ([xi] if strategy == "image" else [xt])
    data = HeadData.from_arrays(feats, y, split)
    cfg = tiny(strategy, fusion)
    batched = train_heads(cfg, [0, 1, 2], data, SETTINGS, batched=True)
    sequential = train_heads(cfg, [0, 1, 2], data, SETTINGS, batched=False)
    assert summary(batched) == summary(sequential)
    for a, b in zip(batched, sequential):  # identical RNG streams and kernels: identical weights
        for k in a.params:
            assert torch.equal(a.params[k], b.params[k]), k


@pytest.mark.parametrize("strategy", ["1A", "1B"])
def test_direct_fusion_strategies_batched_equals_sequential(strategy):
    xi, xt, y, split = make_data(d_img=8, d_txt=8)
    data = HeadData.from_arrays([xi, xt], y, split)
    cfg = HeadConfig(strategy, "gated", (8, 8), C, fusion_dim=10)
    assert summary(train_heads(cfg, [3, 4], data, SETTINGS)) == \
        summary(train_heads(cfg, [3, 4], data, SETTINGS, batched=False))


def test_seed_reproduces_and_differs():
    xi, xt, y, split = make_data()
    data = HeadData.from_arrays([xi, xt], y, split)
    cfg = tiny("2A", "concat")
    a, b, c = (train_heads(cfg, [s], data, SETTINGS)[0] for s in (0, 0, 1))
    assert summary([a]) == summary([b])
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert not all(torch.equal(a.params[k], c.params[k]) for k in a.params)


def test_heads_learn_separable_classes():
    xi, xt, y, split = make_data(noise=0.5)
    data = HeadData.from_arrays([xi, xt], y, split)
    for r in train_heads(tiny("2A", "add"), [0, 1], data, TrainSettings(batch_size=32, max_epochs=20, lr=1e-2)):
        assert r.test_accuracy > 0.9  # chance is 0.25


def test_stopped_heads_keep_their_best_epoch():
    xi, xt, y, split = make_data()
    data = HeadData.from_arrays([xi, xt], y, split)
    for r in train_heads(tiny("2A", "product"), [0, 1, 2], data, TrainSettings(batch_size=32, max_epochs=30,
                                                                               patience=2)):
        assert r.epochs_run <= 30 and r.best_epoch <= r.epochs_run
        assert r.epochs_run == 30 or r.epochs_run - r.best_epoch == 2


def test_bf16_on_the_cpu_still_learns_and_batched_matches_sequential():
    xi, xt, y, split = make_data()
    data = HeadData.from_arrays([xi, xt], y, split)
    settings = TrainSettings(batch_size=32, max_epochs=8, patience=3, lr=3e-3, precision="bf16")
    batched = train_heads(tiny("2A", "concat"), [0, 1], data, settings)
    assert summary(batched) == summary(train_heads(tiny("2A", "concat"), [0, 1], data, settings, batched=False))
    assert all(r.test_accuracy > 0.6 for r in batched)  # chance is 0.25
    fp32 = train_heads(tiny("2A", "concat"), [0, 1], data, SETTINGS)
    assert any(not torch.equal(a.params[k], b.params[k]) for a, b in zip(batched, fp32) for k in a.params), \
        "bf16 must really change the arithmetic"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        TrainSettings(precision="fp8")


def test_balanced_class_weights_are_sklearns_and_change_training():
    from sklearn.utils.class_weight import compute_class_weight

    from heads.train import _class_weights   # private: nothing public exposes the weights the loss uses
    xi, xt, y, split = make_data()
    keep = (split != "train") | (y != 0) | (np.arange(len(y)) < 20)   # class 0 rare in train: 5 of 155
    data = HeadData.from_arrays([xi[keep], xt[keep]], y[keep], split[keep])
    train_labels = y[keep][split[keep] == "train"]
    expected = compute_class_weight("balanced", classes=np.arange(C), y=train_labels)
    assert np.allclose(_class_weights(data.train, C, "balanced").numpy(), expected)
    cfg = tiny("2A", "concat")
    plain = train_heads(cfg, [0], data, SETTINGS)[0]
    weighted = train_heads(cfg, [0], data, TrainSettings(**{**SETTINGS.__dict__, "class_weight": "balanced"}))[0]
    assert not all(torch.equal(plain.params[k], weighted.params[k]) for k in plain.params)
    with pytest.raises(ValueError, match="class weight"):
        TrainSettings(class_weight="inverse")


def test_a_head_whose_loss_turns_non_finite_stops_as_diverged_and_others_go_on():
    xi, xt, y, split = make_data()
    data = HeadData.from_arrays([xi, xt], y, split)
    cfg = tiny("2A", "concat")
    # lr so large that some heads' losses overflow: they must stop and say so, the others are unaffected
    huge = TrainSettings(**{**SETTINGS.__dict__, "lr": 1e30, "clip_norm": 1e30})
    results = train_heads(cfg, [0, 1], data, huge)
    assert all(r.diverged for r in results)
    assert all(r.epochs_run == 1 for r in results)
    fine = train_heads(cfg, [0, 1], data, SETTINGS)
    assert not any(r.diverged for r in fine)


@pytest.mark.parametrize("name,value", [("max_epochs", 0), ("batch_size", -5), ("lr", -1.0), ("lr", float("nan")),
                                        ("patience", 0), ("weight_decay", float("inf"))])
def test_training_settings_refuse_useless_values_naming_them(name, value):
    with pytest.raises(ValueError, match=name.replace("_", "[-_]")):
        TrainSettings(**{name: value})


def test_a_test_split_is_optional():
    xi, xt, y, split = make_data()
    keep = split != "test"
    data = HeadData.from_arrays([xi[keep], xt[keep]], y[keep], split[keep], require_test=False)
    result = train_heads(tiny("2A", "add"), [0], data, SETTINGS)[0]
    assert data.test is None and result.test_accuracy is None and result.best_val_accuracy > 0.5
    with pytest.raises(ValueError, match="test"):
        HeadData.from_arrays([xi[keep], xt[keep]], y[keep], split[keep])
