"""A decision-level model (LR-*, LF, ST, LFM: heads/decision.py fits them) as arrays: scaler mean/scale,
coefficients, intercepts, the late-fusion weight w. Saved in the model-folder convention (kind "linear") and
reloaded with identical probabilities; a damaged folder fails on load in one line naming its file and field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.special import log_softmax

from embedstore.model_folder import CONFIG_FILE, WEIGHTS_FILE, checked_tensor, load_pretrained, save_pretrained
from heads.strategies import get_strategy, list_strategies

KIND = "linear"
# stacking reads log-probabilities; a class a regression is sure against gives ~ -700 (float64 underflow of the
# softmax): floor them so one such value cannot dominate the stacker's standardisation-free inputs
LOG_FLOOR = -30.0


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


def stack_input(lp_image: np.ndarray, lp_text: np.ndarray) -> np.ndarray:
    return np.maximum(np.concatenate([lp_image, lp_text], axis=1), LOG_FLOOR)   # (n, 2C)


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
        return self.stacker.log_proba(stack_input(lp_image, lp_text))   # "stack"

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
        """The saved model, its config and every array checked first (one-line ValueErrors naming the folder's
        file and the field: a damaged folder fails here, not as a traceback in ensemble or predict)."""
        tensors, doc = load_pretrained(folder, kind=KIND)
        strategy, classes, weight = _checked_config(Path(folder), doc)
        parts = {name: _checked_linear(Path(folder), tensors, doc["parts"][name], name, len(classes))
                 for name in _parts_of(strategy)}
        stacker = parts.pop("stacker", None)
        model = cls(strategy, classes, parts, weight, stacker, metadata=doc)
        _check_recorded_inputs(Path(folder), model, doc)
        return model


def _parts_of(strategy: str) -> tuple[str, ...]:
    """The fitted regressions a strategy saves (the parts predict_log_proba uses), by its `combine`."""
    declared = get_strategy(strategy)
    return {"late-logits": (), "single": declared.modalities, "concat": ("concat",), "late": ("image", "text"),
            "stack": ("image", "text", "stacker")}[declared.combine]


def _config_error(folder: Path, field: str, problem: str) -> ValueError:
    return ValueError(f"{folder / CONFIG_FILE}: {field} {problem}; save the model again with `heads sweep`")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _checked_config(folder: Path, doc: dict) -> tuple[str, list, float | None]:
    """(strategy, classes, weight) of a saved model's config.json, each of the type and range it must have."""
    strategy = doc.get("strategy")
    linear = list_strategies(trainer="linear")
    if strategy not in linear:
        raise _config_error(folder, "strategy", f"is {strategy!r}, not one of {', '.join(linear)}")
    classes = doc.get("classes")
    if (not isinstance(classes, list) or not classes or len({str(c) for c in classes}) != len(classes)
            or not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in classes)):
        raise _config_error(folder, "classes", f"is {str(classes)[:60]!s}, not a list of distinct class names")
    weight = doc.get("weight")
    if get_strategy(strategy).combine in ("late", "late-logits"):
        if not _is_number(weight) or not 0 <= weight <= 1:
            raise _config_error(folder, "weight", f"is {weight!r}, not the image weight w of late fusion (a number "
                                                  "in [0, 1])")
    elif weight is not None:
        raise _config_error(folder, "weight", f"is {weight!r}, but {strategy} has no weight (null)")
    parts = doc.get("parts")
    if not isinstance(parts, dict) or set(parts) != set(_parts_of(strategy)):
        names = sorted(parts) if isinstance(parts, dict) else repr(parts)[:40]
        raise _config_error(folder, "parts", f"are {names}, not {strategy}'s fitted parts "
                                             f"({', '.join(_parts_of(strategy)) or 'none'})")
    for name, info in parts.items():
        if (not isinstance(info, dict) or not _is_number(info.get("C")) or info["C"] <= 0
                or not isinstance(info.get("converged"), bool)):
            raise _config_error(folder, f"parts.{name}", f"is {str(info)[:60]}, not {{\"C\": a positive number, "
                                                          "\"converged\": true or false}")
    return strategy, classes, None if weight is None else float(weight)


def _checked_linear(folder: Path, tensors: dict, info: dict, name: str, n_classes: int) -> Linear:
    """A part's arrays: mean, scale (D,), scale > 0; coef (C, D); intercept (C,); float32/64, finite. The stacker
    reads [log p_image, log p_text]: D = 2C."""
    mean = checked_tensor(tensors, f"{name}.mean", (2 * n_classes if name == "stacker" else None,), folder)
    width = mean.shape[0]
    if width == 0:
        raise ValueError(f"{folder / WEIGHTS_FILE}: {name}.mean is empty (a regression over no features); save the "
                         "model again")
    scale = checked_tensor(tensors, f"{name}.scale", (width,), folder)
    if not bool((scale > 0).all()):
        raise ValueError(f"{folder / WEIGHTS_FILE}: {name}.scale has values <= 0 (features are divided by it); save "
                         "the model again")
    coef = checked_tensor(tensors, f"{name}.coef", (n_classes, width), folder)
    intercept = checked_tensor(tensors, f"{name}.intercept", (n_classes,), folder)
    return Linear(*(t.numpy().astype(np.float64) for t in (mean, scale, coef, intercept)), C=float(info["C"]),
                  converged=info["converged"])


def _check_recorded_inputs(folder: Path, model: DecisionModel, doc: dict) -> None:
    """What the folder records about its inputs (the feature sets it reads, their widths, the class count)
    against its arrays, so ensemble and predict can trust both."""
    modalities = get_strategy(model.strategy).modalities
    inputs = doc.get("inputs")
    if inputs is not None and (not isinstance(inputs, list) or len(inputs) != len(modalities)
                               or not all(isinstance(n, str) for n in inputs)):
        raise _config_error(folder, "inputs", f"is {str(inputs)[:80]}, not {len(modalities)} feature set name(s) "
                                              f"({', '.join(modalities)})")
    config = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    dims, widths = config.get("input_dims"), model._input_widths()
    if dims is not None:
        ok = isinstance(dims, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in dims)
        if not ok or len(dims) != len(modalities) or (
                [sum(dims)] if get_strategy(model.strategy).combine == "concat" else dims) != widths:
            raise _config_error(folder, "config.input_dims", f"is {str(dims)[:60]}, but the arrays take features of "
                                                            f"widths {widths}")
    if config.get("num_classes") not in (None, len(model.classes)):
        raise _config_error(folder, "config.num_classes", f"is {config['num_classes']!r}, but classes names "
                                                          f"{len(model.classes)}")
