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
    (lambda xi, xt: xi[0],
     r"X must be 2-D \(rows, features\), got shape \(16,\); Reshape your data: X.reshape\(1, -1\) for one row"),
    (lambda xi, xt: [xi[0], xt[0]], r"X is not a numeric 2-D array"),
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


# ---------------------------------------------------------------- one 2-D X: scikit-learn's tools work on it

WIDTHS = (16, 12)


def side_by_side(n=300, seed=0):
    xi, xt, y = make_data(seed)   # 300 rows
    return np.hstack([xi, xt])[:n], y[:n]  # (n, 28): image columns, then text columns


def test_one_matrix_with_input_widths_gives_the_list_inputs_head():
    """The 2-D X split at input_widths is the list [X_image, X_text]: same weights, same predictions."""
    xi, xt, y = make_data()
    X = np.hstack([xi, xt])
    from_matrix = FusionHead("2A", "gated", input_widths=WIDTHS, **FAST).fit(X[:250], y[:250])
    from_list = FusionHead("2A", "gated", **FAST).fit([xi[:250], xt[:250]], y[:250])
    assert from_matrix.input_widths_ == (16, 12) and from_matrix.n_features_in_ == 28
    assert all(torch.equal(from_matrix.params_[k], from_list.params_[k]) for k in from_list.params_)
    np.testing.assert_array_equal(from_matrix.predict(X[250:]), from_list.predict([xi[250:], xt[250:]]))
    np.testing.assert_array_equal(from_list.predict(X[250:]), from_list.predict([xi[250:], xt[250:]]))


def test_clone_keeps_the_parameters_and_drops_the_fit():
    X, y = side_by_side()
    head = FusionHead("2B", "add", input_widths=WIDTHS, num_threads=None, **FAST).fit(X, y)
    copy = clone(head)
    assert copy.get_params() == head.get_params() and copy.input_widths == WIDTHS
    assert not hasattr(copy, "params_") and not hasattr(copy, "classes_")
    copy.set_params(lr=1e-2, fusion="concat")
    assert copy.get_params()["lr"] == 1e-2 and head.get_params()["lr"] == FAST["lr"]


def test_cross_val_score_splits_rows_not_modalities():
    from sklearn.model_selection import cross_val_score

    X, y = side_by_side(240)
    scores = cross_val_score(FusionHead("2A", input_widths=WIDTHS, **FAST), X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.8  # chance is 0.25


def test_grid_search_over_two_parameters():
    from sklearn.model_selection import GridSearchCV

    X, y = side_by_side(180)
    search = GridSearchCV(FusionHead("2A", input_widths=WIDTHS, **FAST),
                          {"fusion": ["concat", "add"], "lr": [3e-3, 1e-2]}, cv=2).fit(X, y)
    assert len(search.cv_results_["params"]) == 4
    assert search.best_params_["fusion"] in ("concat", "add") and search.best_score_ > 0.8
    assert isinstance(search.best_estimator_, FusionHead) and search.best_estimator_.input_widths_ == WIDTHS


def test_a_pipeline_with_a_scaler_in_front():
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = side_by_side()
    pipeline = make_pipeline(StandardScaler(), FusionHead("2A", "gated", input_widths=WIDTHS, **FAST))
    pipeline.fit(X[:250] * 50 + 7, y[:250])  # badly scaled columns: the scaler fixes them
    assert pipeline.score(X[250:] * 50 + 7, y[250:]) > 0.8
    assert list(pipeline.classes_) == sorted(NAMES)


def test_scikit_learns_check_estimator_passes_for_a_baseline():
    """Every check of sklearn.utils.estimator_checks (a few seconds with a small head). A multimodal head cannot
    take part: the checks fit X of 1 to 10 columns, and a 2A head needs input_widths that add up to its X."""
    from sklearn.utils.estimator_checks import check_estimator

    head = FusionHead("image", batch_size=32, max_epochs=10, patience=3, lr=1e-2, middle_dim=16, device="cpu")
    results = check_estimator(head, on_fail=None)
    failed = [(r["check_name"], str(r["exception"]).splitlines()[:1]) for r in results if r["status"] == "failed"]
    assert not failed and len(results) > 40


def test_fit_and_predict_run_on_num_threads_and_restore_the_callers(monkeypatch):
    """The sweep trains on one thread (fastest for small heads); the estimator did not, so a notebook's fit ran
    on every core, many times slower."""
    X, y = side_by_side(120)
    seen = []

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return train_heads(*args, **kwargs)

    monkeypatch.setattr(heads.estimator, "train_heads", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        head = FusionHead("2A", input_widths=WIDTHS, **FAST).fit(X, y)  # num_threads=1 by default
        assert seen == [1] and torch.get_num_threads() == 2
        FusionHead("2A", input_widths=WIDTHS, num_threads=None, **FAST).fit(X, y)
        assert seen == [1, 2]  # None: torch's own setting
        head.predict(X)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="num_threads must be an integer of at least 1"):
            FusionHead("2A", input_widths=WIDTHS, num_threads=0, **FAST).fit(X, y)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kwargs,X_of,message", [
    ({}, lambda X: X, r"X is one array of 28 columns, but strategy 2A reads image and text columns side by side:"
                      r" say where they split with input_widths, e.g. FusionHead\('2A', input_widths=\(1280, 384\)\)"),
    ({"input_widths": (16, 10)}, lambda X: X, r"X has 28 columns, but input_widths=\(16, 10\) add up to 26"),
    ({"input_widths": (28,)}, lambda X: X, r"input_widths=\(28,\) gives 1 width\(s\), but strategy 2A reads 2"),
    ({"input_widths": (16, -12)}, lambda X: X, r"input_widths must be positive integers"),
    ({"input_widths": WIDTHS}, lambda X: X[:0], r"X has 0 rows; fit needs training rows"),
    ({"input_widths": WIDTHS}, lambda X: X[:, :0], r"X has 0 feature\(s\)"),
    ({"input_widths": WIDTHS}, lambda X: X[0], r"X must be 2-D"),
])
def test_bad_matrices_are_one_line_value_errors(kwargs, X_of, message):
    X, y = side_by_side()
    with pytest.raises(ValueError, match=message) as error:
        FusionHead("2A", **kwargs, **FAST).fit(X_of(X), y[:len(X_of(X))] if X_of(X).ndim == 2 else y)
    assert "\n" not in str(error.value)


def test_predict_on_other_columns_names_the_fitted_widths():
    X, y = side_by_side()
    head = FusionHead("2A", input_widths=WIDTHS, **FAST).fit(X, y)
    with pytest.raises(ValueError, match=r"X has 20 features, but FusionHead is expecting 28 features as input "
                                         r"\(image 16 \+ text 12\)"):
        head.predict(X[:, :20])


def test_a_baseline_reads_every_column_or_its_one_width():
    X, y = side_by_side()
    for widths in (None, 28, (28,)):
        head = FusionHead("image", input_widths=widths, **FAST).fit(X, y)
        assert head.input_widths_ == (28,) and head.score(X, y) > 0.8


def test_read_only_input_as_from_a_dataframe_trains_without_a_warning():
    """pandas (copy-on-write) hands out read-only arrays; torch.from_numpy warned "The given NumPy array is not
    writable" on every fit and predict."""
    import warnings

    X, y = side_by_side()
    X.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head = FusionHead("2A", input_widths=WIDTHS, **FAST).fit(X, y)
        head.predict_proba(X)
        FusionHead("image", **FAST).fit(X, y).predict(X)  # one modality: no column split copies it


def test_save_and_load_keep_input_widths_and_take_the_matrix(tmp_path):
    X, y = side_by_side()
    head = FusionHead("2A", "gated", input_widths=WIDTHS, **FAST).fit(X[:250], y[:250])
    head.save_pretrained(tmp_path / "h")
    loaded = FusionHead.from_pretrained(tmp_path / "h")
    assert loaded.get_params() == head.get_params() and loaded.input_widths == WIDTHS
    np.testing.assert_array_equal(loaded.predict_proba(X[250:]), head.predict_proba(X[250:]))
    refit = clone(loaded).fit(X[:250], y[:250])  # a loaded head's parameters fit again as they are
    np.testing.assert_array_equal(refit.predict(X[250:]), head.predict(X[250:]))


def test_feature_matrices_puts_a_stores_sets_side_by_side(tmp_path):
    from embedstore.store import FeatureStore
    from embedstore.store_writer import write_store_from_arrays

    from heads import feature_matrices, inputs_for

    xi, xt, y = (a[:60] for a in make_data())
    labels = np.searchsorted(sorted(NAMES), y)
    split = np.array(["train", "val", "test"] * 20)
    write_store_from_arrays(tmp_path / "s.h5", ids=[str(i) for i in range(60)], labels=labels, splits=split,
                            classes=sorted(NAMES), manifest_sha256="m",
                            features={"image/a/pooled": (xi, {}), "text/b/pooled": (xt, {})})
    with FeatureStore(tmp_path / "s.h5") as store:
        data = feature_matrices(store, inputs_for(store, "2A"))
    assert data.input_widths == (16, 12) and data.names == ("image/a/pooled", "text/b/pooled")
    X_val, y_val = data.val
    np.testing.assert_array_equal(X_val, np.hstack([xi[1::3], xt[1::3]]))
    np.testing.assert_array_equal(y_val, y[1::3])
    assert [len(part[0]) for part in (data.train, data.val, data.test)] == [20, 20, 20]
