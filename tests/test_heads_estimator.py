"""FusionHead, the scikit-learn-style estimator: string labels, optional eval set, the sweep's training code,
save_pretrained / from_pretrained, and one-line ValueErrors for bad input."""
import numpy as np
import pytest
import torch
from sklearn.base import clone

import heads.estimator
from heads import FusionHead
from heads.models import HeadConfig
from heads.train import HeadData, Split, TrainSettings, train_heads
from store_factory import IMAGE, TEXT, make_features


pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = np.array(["shirt", "bag", "watch", "shoe"])  # not sorted: classes_ must be
FAST = dict(batch_size=32, max_epochs=8, patience=3, lr=3e-3, middle_dim=20, fusion_dim=10, device="cpu")


def make_data(seed=0):
    data = make_features(classes=4, per_split=(200, 50, 50), features={IMAGE: 16, TEXT: 12}, separation=1.0,
                         noise=0.7, seed=seed)
    return data.features[IMAGE], data.features[TEXT], NAMES[data.labels]


@pytest.fixture(scope="module")
def fitted():
    xi, xt, y = make_data()
    head = FusionHead("2A", "gated", **FAST).fit([xi[:200], xt[:200]], y[:200],
                                                  eval_set=([xi[200:250], xt[200:250]], y[200:250]))
    return head, (xi, xt, y)


def test_string_labels_in_and_out(fitted):
    head, (xi, xt, y) = fitted
    assert list(head.classes_) == sorted(NAMES) and head.input_dims_ == (16, 12)
    test = [xi[250:], xt[250:]]
    predicted = head.predict(test)
    assert set(predicted) <= set(NAMES)
    probabilities = head.predict_proba(test)
    assert probabilities.shape == (50, 4) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert head.score(test, y[250:]) == pytest.approx((predicted == y[250:]).mean())
    assert head.score(test, y[250:]) > 0.8  # chance is 0.25
    assert 1 <= head.best_epoch_ <= head.n_epochs_ and head.best_val_accuracy_ > 0.8


def test_fit_is_the_sweeps_train_heads(monkeypatch):
    """The estimator's weights are exactly what train_heads (the sweep's code) gives for the same data."""
    xi, xt, y = make_data()
    calls = []

    def spy(config, seeds, data, settings, **kwargs):
        calls.append((config, seeds, settings))
        return train_heads(config, seeds, data, settings, **kwargs)

    monkeypatch.setattr(heads.estimator, "train_heads", spy)
    head = FusionHead("2B", "concat", seed=3, **FAST).fit([xi[:200], xt[:200]], y[:200],
                                                            eval_set=([xi[200:], xt[200:]], y[200:]))
    (config, seeds, settings), = calls
    assert seeds == [3] and config == HeadConfig("2B", "concat", (16, 12), 4, middle_dim=20, fusion_dim=10)
    assert settings == TrainSettings(batch_size=32, max_epochs=8, patience=3, lr=3e-3)
    index = np.searchsorted(head.classes_, y)

    def split(rows):
        return Split([torch.from_numpy(xi[rows]), torch.from_numpy(xt[rows])], torch.from_numpy(index[rows]))

    data = HeadData(split(slice(0, 200)), split(slice(200, 300)), split(slice(0, 0)))
    direct = train_heads(config, [3], data, settings)[0]
    assert all(torch.equal(direct.params[k], head.params_[k]) for k in direct.params)
    assert direct.test_accuracy is None  # no test split: no test metrics, not a crash


def test_without_eval_set_a_stratified_part_is_held_out():
    xi, xt, y = make_data()
    head = FusionHead("2A", **FAST).fit([xi, xt], y)  # fusion None -> concat
    assert head.config_.fusion == "concat" and head.score([xi, xt], y) > 0.8


def test_a_baseline_takes_one_array_and_integer_labels_stay_integers(tmp_path):
    xi, _, y = make_data()
    labels = np.searchsorted(sorted(NAMES), y) * 10  # 0, 10, 20, 30
    head = FusionHead("image", **FAST).fit(xi[:250], labels[:250])
    assert head.classes_.tolist() == [0, 10, 20, 30]
    head.save_pretrained(tmp_path / "h")
    loaded = FusionHead.from_pretrained(tmp_path / "h")
    assert loaded.predict(xi[250:]).dtype.kind == "i"
    np.testing.assert_array_equal(loaded.predict(xi[250:]), head.predict(xi[250:]))


def test_save_pretrained_round_trip(fitted, tmp_path):
    head, (xi, xt, _) = fitted
    head.save_pretrained(tmp_path / "h", metadata={"note": "kept"})
    loaded = FusionHead.from_pretrained(tmp_path / "h")
    assert loaded.config_ == head.config_ and loaded.get_params() == head.get_params()
    assert list(loaded.classes_) == list(head.classes_) and loaded.metadata_["note"] == "kept"
    assert loaded.metadata_["kind"] == "fusion-head" and loaded.metadata_["format_version"] == 1
    np.testing.assert_array_equal(loaded.predict_proba([xi, xt]), head.predict_proba([xi, xt]))
    with pytest.raises(ValueError, match="metadata may not set classes"):
        head.save_pretrained(tmp_path / "x", metadata={"classes": []})


def test_it_is_a_scikit_learn_estimator(fitted):
    head, _ = fitted
    copy = clone(head)
    assert copy.get_params() == head.get_params() and not hasattr(copy, "params_")
    assert "FusionHead(" in repr(head)


@pytest.mark.parametrize("make_input,message", [
    (lambda xi, xt: [xi], r"takes 2 input\(s\) \(image, text\), got 1; pass \[X_image, X_text\]"),
    (lambda xi, xt: [xi, xt[:, :5]], r"X\[1\] \(text\) has 5 features per row, but the head was fitted on 12"),
    (lambda xi, xt: [xi, np.where(np.arange(len(xt))[:, None] == 3, np.nan, xt)],
     r"X\[1\] \(text\) holds NaN or infinite values in 1 row\(s\) \(first: row 3\)"),
    (lambda xi, xt: [xi, xt[:10]], r"the inputs have 300 vs 10 rows"),
    (lambda xi, xt: [xi, np.full(xt.shape, "a")], r"X\[1\] \(text\) is not numeric"),
    (lambda xi, xt: [xi[0], xt[0]], r"must be 2-D"),
])
def test_bad_inputs_are_one_line_value_errors(fitted, make_input, message):
    head, (xi, xt, _) = fitted
    with pytest.raises(ValueError, match=message) as error:
        head.predict(make_input(xi, xt))
    assert "\n" not in str(error.value)


def test_predict_before_fit_is_a_value_error():
    xi, xt, _ = make_data()
    with pytest.raises(ValueError, match="not fitted yet; call fit"):
        FusionHead("2A").predict([xi, xt])


@pytest.mark.parametrize("kwargs,fit_args,message", [
    ({}, lambda xi, xt, y: ([xi, xt], y[:10]), "300 labels|10 labels for 300 rows"),
    ({}, lambda xi, xt, y: ([xi, xt], np.full(len(y), "one")), "one class"),
    ({}, lambda xi, xt, y: ([xi, xt], np.array([1, "a"] * 150, dtype=object)), "mixes label types"),
    ({"strategy": "4C"}, lambda xi, xt, y: ([xi, xt], y), "unknown strategy '4C'"),
    ({"strategy": "1A"}, lambda xi, xt, y: ([xi, xt], y), "sizes must match"),
])
def test_bad_fit_arguments_are_one_line_value_errors(kwargs, fit_args, message):
    xi, xt, y = make_data()
    with pytest.raises(ValueError, match=message):
        FusionHead(**{"strategy": "2A", **kwargs}, **FAST).fit(*fit_args(xi, xt, y))


def test_eval_set_labels_must_be_known_classes():
    xi, xt, y = make_data()
    with pytest.raises(ValueError, match="eval_set y holds labels not in y: 'hat'"):
        FusionHead("2A", **FAST).fit([xi, xt], y, eval_set=([xi[:5], xt[:5]], ["hat"] * 5))
    with pytest.raises(ValueError, match=r"eval_set X\[0\] \(image\) has 3 features"):
        FusionHead("2A", **FAST).fit([xi, xt], y, eval_set=([xi[:5, :3], xt[:5]], y[:5]))


def test_a_head_folder_written_before_the_convention_still_loads(fitted, tmp_path):
    """The previous `heads sweep` wrote model.safetensors + config.json without format keys or estimator params."""
    import json

    from safetensors.torch import save_file

    head, (xi, xt, _) = fitted
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v[0].contiguous() for k, v in head.params_.items()}, str(old / "model.safetensors"))
    (old / "config.json").write_text(json.dumps({"config": head.config_.to_dict(), "seed": 0,
                                                 "classes": head.classes_.tolist(), "best_val_accuracy": 0.9}))
    loaded = FusionHead.from_pretrained(old)
    assert loaded.get_params()["middle_dim"] == 20 and loaded.config_ == head.config_
    np.testing.assert_array_equal(loaded.predict_proba([xi, xt]), head.predict_proba([xi, xt]))
    (old / "config.json").write_text(json.dumps({"config": {"strategy": "2A"}, "classes": []}))
    with pytest.raises(ValueError, match="holds no valid head config"):
        FusionHead.from_pretrained(old)
