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
A fitted model is a `DecisionModel`: arrays only (scaler mean/scale, coefficients, intercepts, w), saved in the
model-folder convention (kind "linear") and reloaded with identical probabilities.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.special import log_softmax

from embedstore.metrics import classification_metrics
from embedstore.model_folder import load_pretrained, save_pretrained
from heads.logistic import Fit, fit_multinomial
from heads.results import saved_is_at_least_as_good
from heads.selection import best_by_validation
from heads.strategies import get_strategy

KIND = "linear"
# stacking reads log-probabilities; a class a regression is sure against gives ~ -700 (float64 underflow of the
# softmax): floor them so one such value cannot dominate the stacker's standardisation-free inputs
LOG_FLOOR = -30.0
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


@dataclass
class Linear:
    """One fitted (scaler +) multinomial logistic regression as arrays: logits = ((x - mean) / scale) @ coef.T + b."""
    mean: np.ndarray        # (D,)
    scale: np.ndarray       # (D,)
    coef: np.ndarray        # (C, D)
    intercept: np.ndarray   # (C,)
    C: float
    converged: bool = True

    def log_proba(self, x: np.ndarray) -> np.ndarray:   # (n, D) -> (n, C)
        z = ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.coef.T + self.intercept
        return log_softmax(z, axis=1)

    @property
    def n_parameters(self) -> int:   # coefficients + intercepts (the scaler's statistics are not trained)
        return int(self.coef.size + self.intercept.size)


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
    if solver == "torch":
        out, start = [], None
        for C in sorted(Cs):
            (fit,) = fit_multinomial(x, y, n_classes, [C], standardize=standardize, init=[start], max_iter=max_iter,
                                     dtype=TORCH_DTYPE, device=device)
            out.append(_from_fit(fit))
            start = fit
        return out
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, dtype=np.float64)
    if standardize:
        mean, scale = x.mean(0), x.std(0)
        scale = np.where(scale > 0, scale, 1.0)   # StandardScaler's rule for constant columns
    else:
        mean, scale = np.zeros(x.shape[1]), np.ones(x.shape[1])
    z = (x - mean) / scale
    lr, out = LogisticRegression(max_iter=max_iter, warm_start=True), []   # multinomial, lbfgs
    for C in sorted(Cs):
        with warnings.catch_warnings():   # recorded as Linear.converged (and in the row), not printed per fit
            warnings.simplefilter("ignore", ConvergenceWarning)
            lr.set_params(C=C).fit(z, y)
        out.append(_as_linear(lr, mean, scale, n_classes))
    return out


def _from_fit(fit: Fit) -> Linear:
    return Linear(fit.mean, fit.scale, fit.coef, fit.intercept, fit.C, fit.converged)


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


def out_of_fold(x: np.ndarray, y: np.ndarray, C: float, n_classes: int, folds: int, seed: int,
                max_iter: int, *, solver: str = "torch", start: Linear | None = None, device="cpu") -> np.ndarray:
    """(n, C) log-probabilities of each train row from a regression fit on the other folds (`_out_of_fold`)."""
    return _out_of_fold(x, y, C, n_classes, folds, seed, max_iter, solver=solver, start=start, device=device)[0]


def _out_of_fold(x: np.ndarray, y: np.ndarray, C: float, n_classes: int, folds: int, seed: int, max_iter: int, *,
                 solver: str, start: Linear | None, device) -> tuple[np.ndarray, bool]:
    """(n, C) log-probabilities of each train row from a regression fit on the other folds (stratified folds,
    drawn from `seed`; each fold's regression standardised on its own rows). "torch": the folds' regressions as
    one stack (one matmul over all rows per step), each started from `start` (the regression of all train rows,
    when given: near every fold's optimum, which the start does not change)."""
    from sklearn.model_selection import StratifiedKFold

    smallest = min(int(c) for c in np.bincount(y) if c > 0)
    if smallest < 2:
        raise ValueError(f"stacking needs at least 2 train rows of every class for its out-of-fold predictions; "
                         f"a class has {smallest}: add train rows, or leave ST out of --strategies")
    k = min(folds, smallest)
    out = np.empty((len(y), n_classes))
    with warnings.catch_warnings():   # a class with fewer than k rows: sklearn warns, folds stay valid
        warnings.simplefilter("ignore", UserWarning)
        splits = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y))
    if solver == "torch":
        models = [_from_fit(f) for f in fit_multinomial(
            x, y, n_classes, [C] * k, row_sets=[rows for rows, _ in splits], init=[start] * k, max_iter=max_iter,
            dtype=TORCH_DTYPE, device=device)]
    else:
        models = [_fit_path(x[rows], y[rows], [C], n_classes, max_iter, solver="sklearn")[0] for rows, _ in splits]
    for model, (_, held_out) in zip(models, splits):
        out[held_out] = model.log_proba(x[held_out])
    return out, all(m.converged for m in models)


def _stack_input(lp_image: np.ndarray, lp_text: np.ndarray) -> np.ndarray:
    return np.maximum(np.concatenate([lp_image, lp_text], axis=1), LOG_FLOOR)   # (n, 2C)


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class DecisionModel:
    """A fitted linear strategy's model (LR-*, LF, ST, LFM, or any registered with trainer "linear"; how its parts
    combine is the strategy's `combine`). `predict_proba(features)`: one (n, D_m) array per modality the strategy
    reads (image first), the same order as `metadata["inputs"]` of a saved model."""
    strategy: str
    classes: list
    linears: dict[str, Linear]          # "image" / "text" / "concat"
    weight: float | None = None         # LF: the image weight w
    stacker: Linear | None = None       # ST: over [log p_image, log p_text], no scaling
    metadata: dict = field(default_factory=dict)

    @property
    def n_parameters(self) -> int:      # coefficients + intercepts (w is a chosen hyper-parameter, not trained)
        return sum(m.n_parameters for m in self.linears.values()) + (self.stacker.n_parameters if self.stacker else 0)

    @property
    def declared(self):
        return get_strategy(self.strategy)

    def predict_log_proba(self, features: list) -> np.ndarray:
        xs = self._check(features)
        combine = self.declared.combine
        if combine == "late-logits":   # the modules' logits: nothing fitted but w
            lp_image, lp_text = (log_softmax(x, axis=1) for x in xs)
            return log_softmax(self.weight * lp_image + (1 - self.weight) * lp_text, axis=1)
        if combine == "concat":
            return self.linears["concat"].log_proba(np.concatenate(xs, axis=1))
        if combine == "single":
            return self.linears[self.declared.modalities[0]].log_proba(xs[0])
        lp_image, lp_text = self.linears["image"].log_proba(xs[0]), self.linears["text"].log_proba(xs[1])
        if combine == "late":
            return log_softmax(self.weight * lp_image + (1 - self.weight) * lp_text, axis=1)
        return self.stacker.log_proba(_stack_input(lp_image, lp_text))   # "stack"

    def predict_proba(self, features: list) -> np.ndarray:   # (n, C)
        return np.exp(self.predict_log_proba(features))

    def predict(self, features: list) -> np.ndarray:         # (n,) class names
        return np.asarray(self.classes)[self.predict_log_proba(features).argmax(1)]

    def _input_widths(self) -> list[int]:
        """The widths predict takes: a concat's one concatenated width, the others one per modality."""
        combine = self.declared.combine
        if combine == "late-logits":   # the modules' logits
            return [len(self.classes)] * 2
        if combine in ("late", "stack"):
            return [self.linears[m].mean.shape[0] for m in ("image", "text")]
        part = "concat" if combine == "concat" else self.declared.modalities[0]
        return [self.linears[part].mean.shape[0]]

    def _check(self, features) -> list[np.ndarray]:
        modalities = self.declared.modalities
        if isinstance(features, np.ndarray):
            features = [features]
        if len(features) != len(modalities):
            raise ValueError(f"{self.strategy} reads {len(modalities)} feature array(s) ({', '.join(modalities)}), "
                             f"got {len(features)}")
        dims = self._input_widths()
        xs = [np.asarray(x, dtype=np.float64) for x in features]
        width = [sum(x.shape[1] for x in xs)] if self.declared.combine == "concat" else [x.shape[1] for x in xs]
        if any(x.ndim != 2 for x in xs) or width != dims:
            raise ValueError(f"{self.strategy} expects features of widths {dims}, got shapes "
                             f"{[x.shape for x in xs]}")
        return xs

    def save_pretrained(self, folder, *, metadata: dict | None = None):
        """model.safetensors (scaler mean/scale, coefficients, intercepts per part) + config.json."""
        tensors = {"weight": torch.tensor([np.nan if self.weight is None else self.weight])}  # never an empty file
        parts = {**self.linears, **({"stacker": self.stacker} if self.stacker else {})}
        for name, m in parts.items():
            for key in ("mean", "scale", "coef", "intercept"):
                tensors[f"{name}.{key}"] = torch.from_numpy(np.ascontiguousarray(getattr(m, key)))
        doc = {"strategy": self.strategy, "classes": list(self.classes), "weight": self.weight,
               "parts": {name: {"C": m.C, "converged": m.converged} for name, m in parts.items()},
               "formula": "log_softmax(((x - mean) / scale) @ coef.T + intercept) per part; LF: log_softmax(w * "
                          "image + (1 - w) * text); ST: stacker over max([image, text], %g)" % LOG_FLOOR}
        return save_pretrained(folder, tensors, {**(metadata or {}), **doc}, kind=KIND)

    @classmethod
    def from_pretrained(cls, folder) -> "DecisionModel":
        tensors, doc = load_pretrained(folder, kind=KIND)
        parts = {name: Linear(*(tensors[f"{name}.{k}"].numpy() for k in ("mean", "scale", "coef", "intercept")),
                              C=info["C"], converged=info["converged"]) for name, info in doc["parts"].items()}
        stacker = parts.pop("stacker", None)
        return cls(doc["strategy"], doc["classes"], parts, doc.get("weight"), stacker, metadata=doc)


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
        self._cache: dict = {}

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
        stacker, val_acc = fit_linear((_stack_input(oof_image, oof_text), self.splits["train"][1]),
                                      (_stack_input(lp_val["image"], lp_val["text"]), y_val), self.n_classes,
                                      self.settings, standardize=False, device=self.device)
        fits["stacker"] = stacker.converged
        model = DecisionModel(strategy, classes, {"image": image, "text": text}, stacker=stacker)
        seconds = s_image + s_text + o_image + o_text + time.perf_counter() - start
        return model, val_acc, seconds, {**chosen, "C_stack": stacker.C, "folds": self.settings.folds,
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
    """One result row per seed (the sweep's row schema; `common` holds the cell's shared fields) and its model;
    `on_row(row)` after each (the sweep's progress bar). LR-* and LF do not depend on the seed: their seeds
    repeat the same numbers, and the rows say so."""
    rows, models = [], []
    for seed in seeds:
        model, val_acc, seconds, chosen = fits.model(strategy, seed, classes)
        metrics = fits.test_metrics(model)
        rows.append({**common, "run_key": keys[seed], "seed": seed,
                     "test_accuracy": metrics["accuracy"], "test_macro_f1": metrics["macro_f1"],
                     "best_val_accuracy": val_acc, "best_epoch": None, "epochs_run": None, "diverged": False,
                     "train_seconds": seconds, "group_seconds": seconds, "group_size": 1, "batched": False,
                     "device": str(fits.device), "precision": fits.precision, "train_flops": 0.0,
                     "trainable_parameters": model.n_parameters, "chosen": chosen,
                     "seed_note": ("folds drawn from the seed" if get_strategy(strategy).seed_dependent else
                                   "deterministic: every seed gives this row (fits shared with the cell's other seeds)"),
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        models.append(model)
        if on_row is not None:
            on_row(rows[-1])
    return rows, models


def save_best(directory, rows: list[dict], models: list[DecisionModel], store: dict) -> bool:
    """Save the model of the best seed by validation accuracy (ties: the lower seed) unless the folder already
    holds one of the same store and settings that is at least as good on validation; True if it saved."""
    i = best_by_validation(range(len(rows)), val=lambda j: rows[j]["best_val_accuracy"], name=lambda j: rows[j]["seed"])
    row, directory = rows[i], Path(directory)
    meta = {"store": store, "run_key": row["run_key"], "seed": row["seed"], "config": row["config"],
            "train_settings": row["train_settings"], "best_val_accuracy": row["best_val_accuracy"],
            "test_accuracy": row["test_accuracy"], "test_macro_f1": row["test_macro_f1"], "chosen": row["chosen"],
            "inputs": list(row["store"]["feature_sets"])}
    identity = {k: meta[k] for k in ("store", "config", "train_settings")}
    if saved_is_at_least_as_good(directory, identity, row["best_val_accuracy"]):
        return False
    models[i].save_pretrained(directory, metadata=meta)
    return True
