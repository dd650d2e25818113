"""Decision-level models over a store's pooled features, fit in the sweep's process (issue #11, items 1 and 4):
fusion has to beat the best *simple* model, not only the weakest head.

- `LR-image`, `LR-text`, `LR-concat`: StandardScaler + multinomial logistic regression on one modality's
  pooled features, or both concatenated; C from `c_grid`, chosen by validation accuracy. The regressions minimise
  scikit-learn's LogisticRegression objective (lbfgs, multinomial, L2, intercept unpenalised, gradient tolerance
  1e-4); `LinearSettings.solver` says who minimises it: "torch" (heads/logistic.py: the C grid, or ST's folds, as
  one stack of problems, full batch, L-BFGS; issue #18: as fast as the heads) or "sklearn" (LogisticRegression,
  the C grid walked as a warm-started path), kept for comparison. Both reach the same optimum within the
  tolerance (tests/test_logistic.py; benchmarks/results/decision_speed.md).
- `LF` (late fusion): log p = w * log p_image + (1 - w) * log p_text (renormalised) from the two per-modality
  regressions; w on an even grid over [0, 1], chosen by validation accuracy (ties: lower validation log-loss,
  then the smaller w).
- `ST` (stacking): K-fold (stratified, folds drawn from the seed) out-of-fold log-probabilities of the two
  per-modality regressions on the train rows; the full-train regressions' on val/test; a multinomial logistic
  regression over [log p_image, log p_text] fit on the out-of-fold train rows, its C chosen on validation.

Nothing is chosen by test. The full-train per-modality regressions are fit once per row set (`DecisionFits`) and
shared by LR-image, LR-text, LF and ST; only ST depends on the seed (its folds), so the others repeat over seeds.
A fitted model is a `DecisionModel` (heads/decision_model.py): arrays only, saved as a model folder of kind "linear".
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.special import log_softmax

from embedstore.metrics import classification_metrics
from embedstore.store import DataWarning
from heads.decision_model import KIND, DecisionModel, Linear, stack_input
from heads.logistic import fit_multinomial, standardization, standardized
from heads.rows import result_row
from heads.strategies import get_strategy

# a train row farther from the others than this many times a typical row is (the largest |x - column median| of a
# row) is no backbone's feature vector, and it would swamp the standardisation: one row at 3e38 (finite in a
# float32 store) among 120 moves the float64 mean to 2.5e36, below whose precision every other row's variation
# vanishes, and LR-image fell to chance without a word. The fits leave such rows out, counted and warned
EXTREME_ROW_FACTOR = 1e3
SOLVERS = ("torch", "sklearn")
# the torch solver's float type: on the real catalog's LR-image path float32 reached gtol 1e-4 in as many
# iterations as float64, as close to sklearn's coefficients at the chosen C, in half the time; at C = 10 the
# objective is flat and both stop anywhere in the region the tolerance allows (benchmarks/results/decision_speed.md).
# Results are returned as float64 either way
TORCH_DTYPE = torch.float32


@dataclass(frozen=True)
class LinearSettings:
    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)   # inverse L2 strength, chosen on validation
    w_steps: int = 21          # late-fusion weights 0, 0.05, ..., 1
    folds: int = 5             # stacking's out-of-fold predictions
    max_iter: int = 500        # lbfgs iterations per fit
    solver: str = "torch"      # "torch" (heads/logistic.py) or "sklearn" (LogisticRegression; the old rows' solver)

    def __post_init__(self):
        object.__setattr__(self, "c_grid", tuple(float(c) for c in self.c_grid))
        if not self.c_grid or any(not np.isfinite(c) or c <= 0 for c in self.c_grid):
            raise ValueError(f"c_grid must be positive finite numbers, got {self.c_grid}")
        if self.w_steps < 2:
            raise ValueError(f"w_steps must be at least 2 (0 and 1), got {self.w_steps}")
        if self.folds < 2:
            raise ValueError(f"folds must be at least 2, got {self.folds}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {self.max_iter}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")

    def to_dict(self) -> dict:
        """The rows' `train_settings` and run-key part. Rows made before the solver was a setting were made by
        scikit-learn: "sklearn" is left out, so they keep their keys; "torch" rows get keys of their own."""
        doc = asdict(self)
        return {k: v for k, v in doc.items() if not (k == "solver" and v == "sklearn")}


def _as_linear(lr, mean, scale, n_classes: int) -> Linear:
    """sklearn's fitted LogisticRegression over all `n_classes` (classes absent from train: never predicted)."""
    coef, intercept = lr.coef_, lr.intercept_
    if coef.shape[0] == 1:   # two classes: sigmoid(z) = softmax([0, z])
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    full_coef = np.zeros((n_classes, coef.shape[1]))
    full_intercept = np.full(n_classes, -1e4)
    full_coef[lr.classes_], full_intercept[lr.classes_] = coef, intercept
    return Linear(mean, scale, full_coef, full_intercept, float(lr.C), bool(np.all(lr.n_iter_ < lr.max_iter)))


def _fit_path(x, y, Cs, n_classes: int, max_iter: int, *, standardize: bool = True, solver: str = "torch",
              device="cpu") -> list[Linear]:
    """One regression per C in `Cs`, in increasing C, on features standardised once, on these rows. "sklearn":
    each warm-started from the previous solution (a regularisation path, as LogisticRegressionCV walks it: the
    problem is strictly convex, so the start changes the iterations needed, not the optimum); "torch": likewise,
    one torch L-BFGS per C (heads/logistic.py). Not one stack of all Cs: its problems share one line search and
    L-BFGS memory, and the stack took ~2x the iterations of the hardest C alone (decision_speed.md)."""
    if solver == "torch":   # standardised, and an overflow refused, inside fit_multinomial
        out, start = [], None
        for C in sorted(Cs):
            (fit,) = fit_multinomial(x, y, n_classes, [C], standardize=standardize, init=[start], max_iter=max_iter,
                                     dtype=TORCH_DTYPE, device=device)
            out.append(fit)
            start = fit
        return out
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, dtype=np.float64)
    mean, scale = standardization(x) if standardize else (np.zeros(x.shape[1]), np.ones(x.shape[1]))
    z = standardized(x, mean, scale)
    lr, out = LogisticRegression(max_iter=max_iter, warm_start=True), []   # multinomial, lbfgs
    for C in sorted(Cs):
        with warnings.catch_warnings():   # recorded as Linear.converged (and in the row), not printed per fit
            warnings.simplefilter("ignore", ConvergenceWarning)
            lr.set_params(C=C).fit(z, y)
        out.append(_as_linear(lr, mean, scale, n_classes))
    return out


def extreme_rows(x: np.ndarray) -> np.ndarray:
    """(n,) True for the rows of x (n, D) that are not finite, or lie more than EXTREME_ROW_FACTOR times farther
    from the column medians than the median row does (distance: a row's largest |x - median|)."""
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x).all(axis=1)
    if not finite.any():
        return ~finite
    with np.errstate(over="ignore"):
        distance = np.abs(x[finite] - np.median(x[finite], axis=0)).max(axis=1)   # (n_finite,)
    positive = distance[distance > 0]
    extreme = np.zeros(len(x), dtype=bool)
    if len(positive):   # rows all alike have no scale to be extreme against
        extreme[finite] = ~(distance <= EXTREME_ROW_FACTOR * np.median(positive))
    return extreme | ~finite


def _score(log_p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, log-loss) of (n, C) log-probabilities."""
    return float((log_p.argmax(1) == y).mean()), float(-log_p[np.arange(len(y)), y].mean())


def fit_linear(train: tuple, val: tuple, n_classes: int, settings: LinearSettings, *,
               standardize: bool = True, device="cpu") -> tuple[Linear, float]:
    """The regression of the C in settings.c_grid with the best validation accuracy (ties: lower validation
    log-loss, then the smaller C): (model, its validation accuracy). Fit on `train` only."""
    best, best_key = None, None
    for model in _fit_path(*train, settings.c_grid, n_classes, settings.max_iter, standardize=standardize,
                           solver=settings.solver, device=device):
        acc, loss = _score(model.log_proba(val[0]), val[1])
        if best_key is None or (acc, -loss) > best_key:
            best, best_key = model, (acc, -loss)
    return best, best_key[0]


def late_weight(lp_image: np.ndarray, lp_text: np.ndarray, y: np.ndarray, steps: int) -> tuple[float, float]:
    """(w, validation accuracy) of log_softmax(w * lp_image + (1 - w) * lp_text), w on an even grid over [0, 1]."""
    best, best_key = 0.0, None
    for w in np.linspace(0.0, 1.0, steps):
        acc, loss = _score(log_softmax(w * lp_image + (1 - w) * lp_text, axis=1), y)
        if best_key is None or (acc, -loss) > best_key:
            best, best_key = float(w), (acc, -loss)
    return best, best_key[0]


def stacking_folds(y: np.ndarray, folds: int, classes=None) -> tuple[int, str | None]:
    """(K, why) for stacking's out-of-fold predictions over train labels `y` (n,): K = min(folds, the fewest train
    rows of a class present), since a stratified fold needs a row of every class; `why` names that class when K
    is below `folds`. K < 2 (a class with one train row, e.g. a --fractions class dealt 1/1/1): no stacking."""
    counts = np.bincount(np.asarray(y, dtype=np.int64))
    present = np.flatnonzero(counts)
    if len(present) == 0:
        return 0, "stacking needs train rows; there are none"
    fewest = int(present[np.argmin(counts[present])])
    k = min(int(folds), int(counts[fewest]))
    if k >= folds:
        return k, None
    name = repr(str(classes[fewest])) if classes is not None else str(fewest)
    rows = f"{counts[fewest]} train row{'s' if counts[fewest] != 1 else ''}"
    if k < 2:
        return k, (f"stacking's out-of-fold predictions need at least 2 train rows of every class, and class {name} "
                   f"has {rows}; add train rows (or --min-items) for ST, or leave ST out of --strategies")
    return k, f"{k} out-of-fold folds instead of {folds}: class {name} has {rows}"


def out_of_fold(x: np.ndarray, y: np.ndarray, C: float, n_classes: int, folds: int, seed: int,
                max_iter: int, *, solver: str = "torch", start: Linear | None = None, device="cpu") -> np.ndarray:
    """(n, C) log-probabilities of each train row from a regression fit on the other folds (`_out_of_fold`)."""
    return _out_of_fold(x, y, C, n_classes, folds, seed, max_iter, solver=solver, start=start, device=device)[0]


def _out_of_fold(x: np.ndarray, y: np.ndarray, C: float, n_classes: int, folds: int, seed: int, max_iter: int, *,
                 solver: str, start: Linear | None, device) -> tuple[np.ndarray, bool]:
    """(n, C) log-probabilities of each train row from a regression fit on the other folds (stratified folds,
    drawn from `seed`; fewer than `folds` when a class has fewer train rows: `stacking_folds`; each fold's
    regression standardised on its own rows). "torch": the folds' regressions as one stack (one matmul over all rows
    per step), each started from `start` (the regression of all train rows, when given: near every fold's optimum,
    which the start does not change)."""
    from sklearn.model_selection import StratifiedKFold

    k, why = stacking_folds(y, folds)
    if k < 2:
        raise ValueError(why)
    out = np.empty((len(y), n_classes))
    with warnings.catch_warnings():   # a class with fewer than k rows: sklearn warns, folds stay valid
        warnings.simplefilter("ignore", UserWarning)
        splits = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y))
    if solver == "torch":
        models = fit_multinomial(
            x, y, n_classes, [C] * k, row_sets=[rows for rows, _ in splits], init=[start] * k, max_iter=max_iter,
            dtype=TORCH_DTYPE, device=device)
    else:
        models = [_fit_path(x[rows], y[rows], [C], n_classes, max_iter, solver="sklearn")[0] for rows, _ in splits]
    for model, (_, held_out) in zip(models, splits):
        out[held_out] = model.log_proba(x[held_out])
    return out, all(m.converged for m in models)


# ------------------------------------------------------------------------------------- fits shared in a sweep


def split_arrays(split, columns: tuple[int, ...]) -> tuple[list[np.ndarray], np.ndarray]:
    """([(n, D_m) float64 per column], (n,) labels) of a HeadData split, in memory or streamed."""
    xs, ys = [[] for _ in columns], []
    for inputs, y in split.eval_batches(65536):
        for i, c in enumerate(columns):
            xs[i].append(inputs[c].float().cpu().numpy().astype(np.float64))
        ys.append(y.cpu().numpy())
    return [np.concatenate(x) for x in xs], np.concatenate(ys).astype(np.int64)


class DecisionFits:
    """The fits of one row set (a HeadData with image and/or text columns), each made once and timed."""

    def __init__(self, data, columns: dict[str, int], n_classes: int, settings: LinearSettings, *, device="cpu"):
        self.settings, self.n_classes, self.columns = settings, n_classes, columns
        # the torch solver's device (the sweep's); scikit-learn fits on the CPU
        self.device = torch.device(device) if settings.solver == "torch" else torch.device("cpu")
        order = tuple(columns.values())
        self.splits = {}
        for name in ("train", "val", "test"):
            xs, y = split_arrays(getattr(data, name), order)
            self.splits[name] = ({m: xs[i] for i, m in enumerate(columns)}, y)
        self.train_rows_left_out = self._leave_out_extreme_train_rows()
        self._cache: dict = {}

    def _leave_out_extreme_train_rows(self) -> int:
        """Leave the train rows that are extreme in any modality (extreme_rows) out of every fit, in one line.
        Validation and test rows stay: an extreme one is one item predicted from huge standardised values, finite,
        which cannot drag the others down."""
        xs, y = self.splits["train"]
        extreme = np.zeros(len(y), dtype=bool)
        for x in xs.values():
            extreme |= extreme_rows(x)
        n = int(extreme.sum())
        if n:
            warnings.warn(f"{n} of {len(y)} train rows left out of the decision-level fits (LR-*, LF, ST): their "
                          f"features are not finite or over {EXTREME_ROW_FACTOR:g} times farther from the other rows "
                          "than a typical row, and would swamp the standardisation", DataWarning, stacklevel=3)
            self.splits["train"] = ({m: x[~extreme] for m, x in xs.items()}, y[~extreme])
        return n

    def _x(self, split: str, part: str) -> np.ndarray:
        xs = self.splits[split][0]
        return np.concatenate([xs["image"], xs["text"]], axis=1) if part == "concat" else xs[part]

    def _timed(self, key, make):
        if key not in self._cache:
            start = time.perf_counter()
            value = make()
            self._cache[key] = (value, time.perf_counter() - start)
        return self._cache[key]

    def linear(self, part: str) -> tuple[tuple[Linear, float], float]:
        """((model, validation accuracy), seconds) of the regression on `part` ("image" / "text" / "concat")."""
        y = {s: self.splits[s][1] for s in self.splits}
        return self._timed(("linear", part), lambda: fit_linear((self._x("train", part), y["train"]),
                                                                (self._x("val", part), y["val"]),
                                                                self.n_classes, self.settings, device=self.device))

    def oof(self, part: str, seed: int) -> tuple[tuple[np.ndarray, bool], float]:
        """(((n, C) out-of-fold log-probabilities, whether every fold's fit converged), seconds)."""
        (model, _), _ = self.linear(part)
        return self._timed(("oof", part, seed), lambda: _out_of_fold(
            self._x("train", part), self.splits["train"][1], model.C, self.n_classes, self.settings.folds, seed,
            self.settings.max_iter, solver=self.settings.solver, start=model, device=self.device))

    @property
    def precision(self) -> str:
        return "fp64" if self.settings.solver == "sklearn" or TORCH_DTYPE == torch.float64 else "fp32"

    def model(self, strategy: str, seed: int, classes: list) -> tuple[DecisionModel, float, float, dict]:
        """(model, validation accuracy, seconds its fits took in all, chosen settings)."""
        declared = get_strategy(strategy)
        combine = declared.combine
        if combine in ("single", "concat"):
            part = declared.modalities[0] if combine == "single" else "concat"
            (m, val_acc), secs = self.linear(part)
            return DecisionModel(strategy, classes, {part: m}), val_acc, secs, {"C": m.C, "converged": m.converged}
        y_val = self.splits["val"][1]
        if combine == "late-logits":
            start = time.perf_counter()
            lp_image, lp_text = (log_softmax(self._x("val", m), axis=1) for m in ("image", "text"))
            w, val_acc = late_weight(lp_image, lp_text, y_val, self.settings.w_steps)
            return (DecisionModel(strategy, classes, {}, weight=w), val_acc, time.perf_counter() - start, {"w": w})
        (image, _), s_image = self.linear("image")
        (text, _), s_text = self.linear("text")
        lp_val = {p: m.log_proba(self._x("val", p)) for p, m in (("image", image), ("text", text))}
        # every fit a model rests on, and whether it converged (the row's "converged" is all of them)
        fits = {"image": image.converged, "text": text.converged}
        chosen = {"C_image": image.C, "C_text": text.C}
        if combine == "late":
            start = time.perf_counter()
            w, val_acc = late_weight(lp_val["image"], lp_val["text"], y_val, self.settings.w_steps)
            model = DecisionModel(strategy, classes, {"image": image, "text": text}, weight=w)
            return model, val_acc, s_image + s_text + time.perf_counter() - start, {
                **chosen, "w": w, "converged": all(fits.values()), "fits_converged": fits}
        ((oof_image, fits["image folds"]), o_image), ((oof_text, fits["text folds"]), o_text) = \
            self.oof("image", seed), self.oof("text", seed)
        start = time.perf_counter()
        stacker, val_acc = fit_linear((stack_input(oof_image, oof_text), self.splits["train"][1]),
                                      (stack_input(lp_val["image"], lp_val["text"]), y_val), self.n_classes,
                                      self.settings, standardize=False, device=self.device)
        fits["stacker"] = stacker.converged
        model = DecisionModel(strategy, classes, {"image": image, "text": text}, stacker=stacker)
        seconds = s_image + s_text + o_image + o_text + time.perf_counter() - start
        folds = stacking_folds(self.splits["train"][1], self.settings.folds)[0]   # the folds out_of_fold used
        return model, val_acc, seconds, {**chosen, "C_stack": stacker.C, "folds": folds,
                                         "converged": all(fits.values()), "fits_converged": fits}

    def test_metrics(self, model: DecisionModel) -> dict:
        xs, y = self.splits["test"]
        parts = [xs[m] for m in get_strategy(model.strategy).modalities]
        predicted = model.predict_log_proba(parts).argmax(1)
        return classification_metrics(y, predicted, n_classes=self.n_classes)


def model_config(strategy: str, input_dims: tuple[int, ...], n_classes: int) -> dict:
    """A row's `config`: what the model is (its fitting settings are the row's `train_settings`)."""
    return {"strategy": strategy, "kind": KIND, "input_dims": list(input_dims), "num_classes": n_classes,
            "seed_dependent": get_strategy(strategy).seed_dependent}


def cell_rows(fits: DecisionFits, strategy: str, seeds, keys: dict, common: dict, classes: list, *,
              on_row=None) -> tuple[list[dict], list[DecisionModel]]:
    """One result row per seed (heads/rows.py; `common` holds the cell's shared arguments: names, config, settings,
    store, parameters behind the features) and its model; `on_row(row)` after each (the sweep's progress bar).
    LR-* and LF do not depend on the seed: their seeds repeat the same numbers, and the rows say so."""
    rows, models = [], []
    for seed in seeds:
        model, val_acc, seconds, chosen = fits.model(strategy, seed, classes)
        metrics = fits.test_metrics(model)
        left_out = {"train_rows_left_out": n} if (n := fits.train_rows_left_out) else {}
        rows.append(result_row(
            **common, run_key=keys[seed], seed=seed,
            test_accuracy=metrics["accuracy"], test_macro_f1=metrics["macro_f1"], best_val_accuracy=val_acc,
            best_epoch=None, epochs_run=None, diverged=False, train_seconds=seconds, group_seconds=seconds,
            group_size=1, batched=False, device=str(fits.device), precision=fits.precision, train_flops=0.0,
            trainable_parameters=model.n_parameters, chosen=chosen,
            seed_note=("folds drawn from the seed" if get_strategy(strategy).seed_dependent else
                       "deterministic: every seed gives this row (fits shared with the cell's other seeds)"),
            **left_out))
        models.append(model)
        if on_row is not None:
            on_row(rows[-1])
    return rows, models
