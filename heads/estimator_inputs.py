"""What FusionHead (heads/estimator.py) accepts as X and y, checked the way scikit-learn checks them: one 2-D X
of the modalities' columns side by side (image first), split at `input_widths`, or the older list of one matrix per
modality; numbers only, finite, writable copies; labels as given, one per row. Every refusal is one ValueError line
(scikit-learn's own wording where its estimator checks match on it).
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch
from scipy import sparse
from sklearn.exceptions import DataConversionWarning


def widths_param(widths, strategy: str, modalities: tuple[str, ...]) -> tuple[int, ...] | None:
    """The input_widths parameter as a tuple of positive ints, one per modality (None stays None)."""
    if widths is None:
        return None
    values = (widths,) if isinstance(widths, numbers.Integral) else widths
    try:
        values = tuple(values)
    except TypeError:
        values = None
    if values is None or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w > 0
                                 for w in values):
        raise ValueError(f"input_widths must be positive integers, one per modality, got {widths!r}; e.g. "
                         f"input_widths=({', '.join(EXAMPLE_WIDTHS[m] for m in modalities)})")
    if len(values) != len(modalities):
        raise ValueError(f"input_widths={widths!r} gives {len(values)} width(s), but strategy {strategy} reads "
                         f"{len(modalities)} ({', '.join(modalities)}); e.g. "
                         f"input_widths=({', '.join(EXAMPLE_WIDTHS[m] for m in modalities)}"
                         f"{',' if len(modalities) == 1 else ''})")
    return tuple(int(w) for w in values)


EXAMPLE_WIDTHS = {"image": "1280", "text": "384"}  # efficientnet_lite0, all-MiniLM-L6-v2


def is_modality_list(X) -> bool:
    """The older input: a list of per-modality (n, D_m) arrays (a list of rows is a matrix instead)."""
    return isinstance(X, (list, tuple)) and len(X) > 0 and all(getattr(x, "ndim", None) == 2 for x in X)


def modality_inputs(X, modalities: tuple[str, ...], widths: tuple[int, ...] | None, *, name: str,
                     fitted: bool = False, strategy: str | None = None) -> list[np.ndarray]:
    """X as float32 (n, D_m) arrays, one per modality, C-contiguous and writable (torch.from_numpy warns on a
    read-only array, e.g. from a pandas DataFrame), or a one-line ValueError saying what is wrong. `widths`: the
    columns of each modality (None: a multimodal X cannot be split; a baseline reads every column); `fitted`:
    they are the widths the head was fitted on (the messages say so)."""
    if is_modality_list(X):
        return [np.require(x, requirements=["C", "W"])
                for x in check_inputs(X, modalities, name=name, dims=widths, fitted=fitted)]
    matrix = as_matrix(X, name)
    columns = matrix.shape[1]
    if not columns:
        raise ValueError(f"{name} has 0 feature(s) (shape={matrix.shape}) while a minimum of 1 is required.")
    if widths is None:
        if len(modalities) > 1:
            raise ValueError(f"{name} is one array of {columns} columns, but strategy {strategy} reads "
                             f"{' and '.join(modalities)} columns side by side: say where they split with "
                             f"input_widths, e.g. FusionHead({strategy!r}, input_widths=(1280, 384)) for "
                             "[1280 image columns | 384 text columns]")
        widths = (columns,)
    if sum(widths) != columns:
        parts = " + ".join(f"{m} {w}" for m, w in zip(modalities, widths))
        if fitted:  # scikit-learn's wording (its check_estimator matches it)
            raise ValueError(f"{name} has {columns} features, but FusionHead is expecting {sum(widths)} features "
                             f"as input ({parts}); pass the same feature columns it was trained on, image first")
        raise ValueError(f"{name} has {columns} columns, but input_widths={widths} add up to {sum(widths)} "
                         f"({parts}); pass the modalities' columns side by side, image first, or fix input_widths")
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} holds NaN or infinite values in {int(bad.sum())} row(s) (first: row "
                         f"{int(np.flatnonzero(bad)[0])}); drop or impute those rows")
    edges = np.cumsum((0,) + tuple(widths))
    return [np.ascontiguousarray(matrix[:, a:b]) if len(widths) > 1 else np.require(matrix, requirements=["C", "W"])
            for a, b in zip(edges[:-1], edges[1:])]


class NotNumericError(TypeError, ValueError):
    """Features that are not numbers: a ValueError like every bad input here, and the TypeError that
    scikit-learn's estimators raise for it."""


def as_matrix(X, name: str) -> np.ndarray:
    if sparse.issparse(X):
        raise ValueError(f"{name} is a sparse matrix; FusionHead takes dense arrays: pass X.toarray()")
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().float().numpy()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", np.exceptions.ComplexWarning)  # numpy would drop imaginary parts
            array = np.asarray(X, dtype=np.float32)
    except np.exceptions.ComplexWarning:
        raise ValueError(f"Complex data not supported: {name} holds complex numbers; pass real-valued features") \
            from None
    except TypeError as error:  # e.g. "float() argument must be a string or a real number, not 'dict'"
        raise NotNumericError(f"{name} is not numeric ({str(error).splitlines()[0]}); pass feature arrays (e.g. "
                              "from heads.feature_matrices)") from None
    except ValueError:
        raise ValueError(f"{name} is not a numeric 2-D array (rows of equal length); pass feature arrays (e.g. "
                         "from heads.feature_matrices)") from None
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {array.shape}; Reshape your data: "
                         "X.reshape(1, -1) for one row, X.reshape(-1, 1) for one feature")
    return array


def check_inputs(X, modalities: tuple[str, ...], *, name: str, dims: tuple[int, ...] | None = None,
                  fitted: bool = True) -> list:
    """A list of float32 (n, D_m) arrays, one per modality, or a one-line ValueError saying what is wrong."""
    if len(X) != len(modalities):
        wanted = ", ".join(f"X_{m}" for m in modalities)
        raise ValueError(f"{name}: this head takes {len(modalities)} input(s) ({', '.join(modalities)}), got "
                         f"{len(X)}; pass [{wanted}], or one array of their columns side by side")
    arrays = []
    for i, (x, modality) in enumerate(zip(X, modalities)):
        label = f"{name}[{i}] ({modality})"
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().float().numpy()
        try:
            array = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"{label} is not numeric; pass feature arrays (e.g. from store.arrays)") from None
        if array.ndim != 2:
            raise ValueError(f"{label} must be 2-D (rows, features), got shape {array.shape}")
        if dims is not None and array.shape[1] != dims[i]:
            raise ValueError(f"{label} has {array.shape[1]} features per row, but "
                             + (f"the head was fitted on {dims[i]}; pass the same feature set it was trained on"
                                if fitted else f"input_widths gives {dims[i]}; fix input_widths or the input"))
        bad = ~np.isfinite(array).all(axis=1)
        if bad.any():
            raise ValueError(f"{label} holds NaN or infinite values in {int(bad.sum())} row(s) (first: row "
                             f"{int(np.flatnonzero(bad)[0])}); drop or impute those rows")
        arrays.append(array)
    rows = [len(a) for a in arrays]
    if len(set(rows)) > 1:
        raise ValueError(f"{name}: the inputs have {' vs '.join(map(str, rows))} rows; row i must be the same "
                         "product in every input")
    return arrays


def check_labels(y, n_rows: int, *, name: str) -> np.ndarray:
    if y is None:
        raise ValueError(f"FusionHead requires {name} to be passed, but the target {name} is None")
    labels = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if labels.ndim == 2 and labels.shape[1] == 1:  # a column vector, as scikit-learn takes it (with a warning)
        warnings.warn(f"A column-vector {name} was passed when a 1d array was expected. Please change the shape "
                      f"of {name} to (n_samples, ), for example using ravel().", DataConversionWarning, stacklevel=3)
        labels = labels.ravel()
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per row), got shape {labels.shape}")
    if len(labels) != n_rows:
        raise ValueError(f"{name} has {len(labels)} labels for {n_rows} rows of features")
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise ValueError(f"Input {name} contains NaN or infinity; drop those rows")
    if labels.dtype == object:
        try:
            labels = labels.astype(str) if all(isinstance(v, str) for v in labels) else labels.astype(np.int64)
        except (TypeError, ValueError):
            raise ValueError(f"{name} mixes label types (e.g. numbers and strings); use one type") from None
    return labels
