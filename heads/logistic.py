"""Multinomial logistic regressions fit with torch: several at once, full batch, L-BFGS (issue #18).

Each problem g of a stack is scikit-learn's LogisticRegression(C=C_g) (lbfgs, multinomial, intercept unpenalised)
on its own rows, standardised on those rows:

    minimise over W_g (D, K), b_g (K,):   (1 / n_g) * sum_{i in rows_g} -log softmax(z_i @ W_g + b_g)[y_i]
                                          + 1 / (2 C_g n_g) * ||W_g||^2,        z_i = (x_i - mean_g) / scale_g

which is sklearn's objective (C * sum of log-losses + 0.5 ||W||^2) divided by C n_g, the scaling its lbfgs
minimises and applies its gradient tolerance `tol` to. A class absent from a problem's rows is never predicted
(coefficients 0, intercept -1e4, as decision.py has always stored it); with exactly two classes present sklearn
fits a binary regression (one vector d, penalty 0.5 ||d||^2), whose optimum is the multinomial one with twice
the penalty (w_1 = -w_0 = d / 2); the coefficients are returned in sklearn's binary form (first class 0).

The problems share one pass over the data per evaluation: every problem's logits come from one matmul
(n, D) @ (D, G*K) over the rows standardised once, each problem's own standardisation folded into its weights
(z_g @ W = x_s @ (a_g * W) - c_g @ W, with a_g = s0 / scale_g, c_g = (mean_g - m0) / scale_g, both ~1 and ~0),
and its loss counts only its rows (weights 1 / n_g, 0 elsewhere: K folds of one matrix cost one matmul).
Why torch: on these machines numpy's OpenBLAS ran this matmul at about half of torch's MKL speed with one
thread (benchmarks/results/decision_speed.md), and the same code runs on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from heads.decision_model import Linear

ABSENT_INTERCEPT = -1e4   # a class with no training row: never predicted
HISTORY = 10              # L-BFGS memory, as scipy's L-BFGS-B in sklearn


@dataclass
class Fit(Linear):
    """One problem's solution, float64, in sklearn's form: a `Linear` (logits = ((x - mean) / scale) @ coef.T +
    intercept; `converged`: its gradient reached `tol`, or the solver stopped before max_iter, sklearn's meaning)
    and how the solver got there."""
    n_iter: int = 0         # L-BFGS iterations of the stack it was fit in
    gradient: float = 0.0   # max |gradient| of its (1 / C n_g scaled) objective at the solution


TOO_LARGE = ("features too large to standardise in float64 (their mean or variance overflows, or they are not "
             "finite); check the store's features (`embed inspect`)")


def standardization(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """StandardScaler's mean and scale (constant columns: scale 1); one-line ValueError when they overflow."""
    with np.errstate(over="ignore", invalid="ignore"):   # said below, in one line
        mean, scale = x.mean(0), x.std(0)
    if not (np.isfinite(mean).all() and np.isfinite(scale).all()):
        raise ValueError(TOO_LARGE)
    return mean, np.where(scale > 0, scale, 1.0)


def standardized(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(x - mean) / scale, or the one-line ValueError when it overflows (a solver would fail deep inside)."""
    with np.errstate(over="ignore", invalid="ignore"):
        z = (x - mean) / scale
    if not np.isfinite(z).all():
        raise ValueError(TOO_LARGE)
    return z


def fit_multinomial(x: np.ndarray, y: np.ndarray, n_classes: int, Cs, *, row_sets=None, standardize: bool = True,
                    init: list | None = None, max_iter: int = 500, tol: float = 1e-4,
                    dtype: torch.dtype = torch.float64, device="cpu") -> list[Fit]:
    """One `Fit` per C in `Cs` (problem g: C = Cs[g], rows = row_sets[g], all rows when None), minimised
    together by one torch L-BFGS (strong Wolfe line search). `init`: per problem None or an earlier Fit (any
    standardisation) to start from; the optimum does not depend on it (the problems are strictly convex)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64)
    n, d = x.shape
    k = n_classes
    Cs = [float(c) for c in Cs]
    g_count = len(Cs)
    row_sets = [np.arange(n)] * g_count if row_sets is None else [np.asarray(r) for r in row_sets]
    init = init or [None] * g_count
    if len(row_sets) != g_count or len(init) != g_count:
        raise ValueError(f"one row set and one init per C: {g_count} Cs, {len(row_sets)} row sets, {len(init)} inits")

    # every problem's standardisation, and the shared one the rows are standardised with once
    stats = [standardization(x[r]) if standardize else (np.zeros(d), np.ones(d)) for r in row_sets]
    m0, s0 = standardization(x) if standardize else (np.zeros(d), np.ones(d))
    present = np.zeros((g_count, k), dtype=bool)
    weights = np.zeros((n, g_count))   # (n, G): 1 / n_g on problem g's rows
    penalty = np.empty(g_count)
    for g, rows in enumerate(row_sets):
        present[g, np.unique(y[rows])] = True
        weights[rows, g] = 1.0 / len(rows)
        binary = present[g].sum() == 2   # sklearn's binary regression: the same optimum at twice the penalty
        penalty[g] = (2.0 if binary else 1.0) / (Cs[g] * len(rows))

    def t(a):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

    xs = t(standardized(x, m0, s0))                                                 # (n, D)
    a = t(np.stack([s0 / s for _, s in stats]))                                     # (G, D)
    c = t(np.stack([(m - m0) / s for m, s in stats]))                               # (G, D)
    w_rows, lam = t(weights), t(penalty)
    labels = torch.as_tensor(y, device=device)[:, None, None].expand(n, g_count, 1)
    absent = torch.as_tensor(~present, device=device)                               # (G, K)
    any_absent = bool(absent.any())

    w0, b0 = np.zeros((g_count, d, k)), np.zeros((g_count, k))
    for g, start in enumerate(init):
        if start is not None:   # the same logits in problem g's standardisation
            m, s = stats[g]
            coef = start.coef * (s / start.scale)                                   # (K, D)
            w0[g] = coef.T
            b0[g] = start.intercept + start.coef @ ((m - start.mean) / start.scale)
            b0[g][~present[g] | (start.intercept <= ABSENT_INTERCEPT)] = 0.0
    weight, bias = t(w0).requires_grad_(), t(b0).requires_grad_()

    # the objective is scaled by n so that L-BFGS's absolute curvature test (y.s > 1e-10) keeps its memory near
    # the optimum; the gradient tolerance is scaled alike
    scale = float(n)

    def objective():
        effective = (a[:, :, None] * weight).permute(1, 0, 2).reshape(d, g_count * k)   # (D, G*K)
        logits = (xs @ effective).view(n, g_count, k) + (bias - torch.einsum("gd,gdk->gk", c, weight))
        if any_absent:
            logits = logits.masked_fill(absent, ABSENT_INTERCEPT)
        nll = -torch.log_softmax(logits, dim=2).gather(2, labels).squeeze(2)          # (n, G)
        return scale * ((w_rows * nll).sum() + 0.5 * (lam * weight.pow(2).sum((1, 2))).sum())

    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=max_iter * 4,
                                  tolerance_grad=tol * scale, tolerance_change=1e-12, history_size=HISTORY,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    n_iter = int(optimizer.state[optimizer._params[0]].get("n_iter", 0))
    closure()   # the gradient at the solution (the line search's last evaluation may be another point)
    gradient = torch.maximum(weight.grad.abs().amax((1, 2)), bias.grad.abs().amax(1)) / scale
    gradient = gradient.double().cpu().numpy()

    out = []
    coefs = weight.detach().double().cpu().numpy().transpose(0, 2, 1)               # (G, K, D)
    intercepts = bias.detach().double().cpu().numpy()
    for g in range(g_count):
        coef, intercept = coefs[g].copy(), intercepts[g].copy()
        coef[~present[g]], intercept[~present[g]] = 0.0, ABSENT_INTERCEPT
        if present[g].sum() == 2:   # sklearn's binary form: the first class's coefficients 0
            first = np.flatnonzero(present[g])[0]
            live = present[g]
            coef[live], intercept[live] = coef[live] - coef[first], intercept[live] - intercept[first]
        converged = bool(gradient[g] <= tol or n_iter < max_iter)
        out.append(Fit(stats[g][0], stats[g][1], coef, intercept, Cs[g], converged, n_iter, float(gradient[g])))
    return out
