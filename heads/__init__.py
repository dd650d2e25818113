"""Fusion heads over the feature store: operators, the strategy registry (heads/strategies.py: 1-A/1-B/2-A/2-B,
unimodal baselines, decision-level models, 3-A/3-B), batched training, sweeps and reports. See docs/ARCHITECTURE.md.

In a notebook: `inputs_for(store, strategy)` names the feature sets a strategy reads, and `FusionHead` is one
head as a scikit-learn estimator (fit / predict / predict_proba / score / save_pretrained / from_pretrained) over
one 2-D X, the modalities' columns side by side (`feature_matrices(store, names)` gives a store's splits so);
`heads.ensemble.ensemble(results_dirs, top_k="auto")` averages the top-k saved heads of sweeps, ranked by
validation accuracy.
"""
import importlib

# Each public name, by the module that defines it: imported on first use (PEP 562), not with the package. Every
# process that imports any heads module runs this file first -- each `--jobs` worker and torchrun rank of a sweep
# included -- and the estimator alone pulls in scikit-learn's model selection (about a second of CPU per process).
_PUBLIC = {
    "FeatureMatrices": "heads.estimator", "FusionHead": "heads.estimator", "feature_matrices": "heads.estimator",
    "Fusion": "heads.fusion", "create_fusion": "heads.fusion", "list_fusions": "heads.fusion",
    "register_fusion": "heads.fusion",
    "inputs_for": "heads.inputs",
    "HeadConfig": "heads.models", "StackedHead": "heads.models",
    "Strategy": "heads.strategies", "get_strategy": "heads.strategies", "list_strategies": "heads.strategies",
    "register_strategy": "heads.strategies",
    "HeadData": "heads.train", "HeadResult": "heads.train", "TrainSettings": "heads.train",
    "train_heads": "heads.train",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value   # found here from now on, without this hook
        return value
    if name == "ensemble":   # the module (a function of that name here would hide it): heads.ensemble.ensemble(...)
        return importlib.import_module("heads.ensemble")
    raise AttributeError(f"module 'heads' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC, "ensemble"})
