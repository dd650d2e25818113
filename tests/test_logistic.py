"""The torch solver of the decision-level regressions (heads/logistic.py): sklearn's optimum, many problems at
once, absent classes, binary problems, and the solver as a setting (its own run keys)."""
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from embedstore.fingerprint import fingerprint
from heads.decision import DecisionFits, LinearSettings, out_of_fold
from heads.logistic import ABSENT_INTERCEPT, fit_multinomial, standardization
from heads.train import HeadData

pytestmark = pytest.mark.usefixtures("one_thread")


def problem(n=300, d=12, k=4, seed=0):
    """Overlapping classes (not separable: a finite optimum at every C), columns offset and scaled unevenly so
    that the standardisation matters."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = rng.normal(size=(k, d))[y] * 0.7 + rng.normal(size=(n, d))
    return x * rng.uniform(0.5, 5.0, size=d) + rng.normal(size=d) * 10, y


def sklearn_fit(x, y, C):
    mean, scale = standardization(x)
    lr = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit((x - mean) / scale, y)
    return lr, (x - mean) / scale


@pytest.mark.parametrize("k", [4, 2])
@pytest.mark.parametrize("C", [0.05, 1.0])
def test_torch_fit_is_sklearns_optimum(k, C):
    x, y = problem(k=k)
    lr, z = sklearn_fit(x, y, C)
    (fit,) = fit_multinomial(x, y, k, [C], tol=1e-8, max_iter=2000)
    assert fit.converged and fit.gradient <= 1e-7   # float64 stops where the loss no longer changes
    coef, intercept = lr.coef_, lr.intercept_
    if k == 2:   # sklearn's binary regression: one vector; ours in its form, the first class 0
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    else:        # softmax is unchanged by a constant added to every class's intercept: compare centred
        intercept, fit.intercept = intercept - intercept.mean(), fit.intercept - fit.intercept.mean()
    np.testing.assert_allclose(fit.coef, coef, atol=1e-6 * np.abs(coef).max())
    np.testing.assert_allclose(fit.intercept, intercept, atol=1e-5)
    probabilities = torch.softmax(torch.from_numpy(z @ fit.coef.T + fit.intercept), 1).numpy()
    np.testing.assert_allclose(probabilities, lr.predict_proba(z), atol=1e-6)
    assert (probabilities.argmax(1) == lr.predict(z)).all()


def test_default_tolerance_gives_sklearns_predictions():
    """At the settings the sweep uses (gtol 1e-4 for both), the two solvers predict the same classes."""
    x, y = problem(n=600, d=30, k=5, seed=1)
    mean, scale = standardization(x)
    for C in LinearSettings().c_grid:
        lr = LogisticRegression(C=C, max_iter=500).fit((x - mean) / scale, y)
        (fit,) = fit_multinomial(x, y, 5, [C], max_iter=500)
        z = (x - mean) / scale
        assert np.mean((z @ fit.coef.T + fit.intercept).argmax(1) == lr.predict(z)) >= 0.995


def test_stacked_problems_are_each_fit_alone():
    """Problems of one stack (own rows, own standardisation, own C, one started elsewhere) reach the optimum
    each reaches alone: the shared line search changes the path, not the solution."""
    x, y = problem(n=240, k=3, seed=2)
    rows = [np.arange(0, 180), np.arange(60, 240), np.r_[0:60, 120:240]]
    Cs = [0.1, 1.0, 10.0]
    start = fit_multinomial(x, y, 3, [1.0], tol=1e-9)[0]
    stacked = fit_multinomial(x, y, 3, Cs, row_sets=rows, init=[None, start, None], tol=1e-9, max_iter=3000)
    for g, fit in enumerate(stacked):
        (alone,) = fit_multinomial(x[rows[g]], y[rows[g]], 3, [Cs[g]], tol=1e-9, max_iter=3000)
        np.testing.assert_allclose(fit.mean, alone.mean)
        np.testing.assert_allclose(fit.coef, alone.coef, atol=1e-5 * np.abs(alone.coef).max())
        assert fit.converged and fit.C == Cs[g]


def test_a_class_absent_from_the_rows_is_never_predicted():
    x, y = problem(n=200, k=4, seed=3)
    keep = y != 2
    (fit,) = fit_multinomial(x[keep], y[keep], 5, [1.0])   # classes 2 and 4 have no row
    assert np.all(fit.coef[[2, 4]] == 0) and np.all(fit.intercept[[2, 4]] == ABSENT_INTERCEPT)
    z = (x - fit.mean) / fit.scale
    assert not np.isin((z @ fit.coef.T + fit.intercept).argmax(1), [2, 4]).any()
    lr, zk = sklearn_fit(x[keep], y[keep], 1.0)
    assert np.mean((zk @ fit.coef.T + fit.intercept).argmax(1) == lr.predict(zk)) >= 0.99


def test_max_iter_reached_is_not_converged():
    x, y = problem(seed=4)
    (fit,) = fit_multinomial(x, y, 4, [10.0], max_iter=2, tol=1e-12)
    assert not fit.converged and fit.n_iter == 2


def test_out_of_fold_torch_matches_sklearn():
    x, y = problem(n=300, k=3, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = out_of_fold(x, y, 0.5, 3, 5, 0, 500, solver="torch")
        theirs = out_of_fold(x, y, 0.5, 3, 5, 0, 500, solver="sklearn")
    np.testing.assert_allclose(np.exp(ours), np.exp(theirs), atol=2e-3)
    assert np.mean(ours.argmax(1) == theirs.argmax(1)) >= 0.99


def test_decision_fits_choose_the_same_under_both_solvers():
    """The whole decision path (C chosen on validation, LF's w, ST's stacker) gives the same choices and test
    accuracies whichever solver minimises the regressions."""
    rng = np.random.default_rng(6)
    n, k = 400, 4
    y = np.arange(n) % k
    split = np.array(["train"] * 240 + ["val"] * 80 + ["test"] * 80)
    image = rng.normal(size=(k, 20))[y] * 0.6 + rng.normal(size=(n, 20))
    text = rng.normal(size=(k, 10))[y] * 0.9 + rng.normal(size=(n, 10))
    data = HeadData.from_arrays([image, text], y, split)
    results = {}
    for solver in ("sklearn", "torch"):
        fits = DecisionFits(data, {"image": 0, "text": 1}, k, LinearSettings(solver=solver))
        classes = [f"c{i}" for i in range(k)]
        results[solver] = {}
        for strategy in ("LR-image", "LR-text", "LR-concat", "LF", "ST"):
            model, val_acc, _, chosen = fits.model(strategy, 0, classes)
            results[solver][strategy] = (val_acc, fits.test_metrics(model)["accuracy"],
                                         {c: v for c, v in chosen.items() if "converged" not in c})
            assert chosen["converged"]
    assert results["torch"] == results["sklearn"]


def test_the_solver_is_a_setting_with_its_own_run_keys():
    with pytest.raises(ValueError, match="solver must be one of torch, sklearn, got 'newton'"):
        LinearSettings(solver="newton")
    old = {"c_grid": (0.01, 0.1, 1.0, 10.0), "w_steps": 21, "folds": 5, "max_iter": 500}   # before issue #18
    assert LinearSettings(solver="sklearn").to_dict() == old   # the rows sklearn made keep their run keys
    torch_doc = LinearSettings().to_dict()
    assert torch_doc == {**old, "solver": "torch"} and fingerprint(torch_doc) != fingerprint(old)
