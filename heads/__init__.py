"""Fusion heads over the feature store: operators, the strategy registry (heads/strategies.py: 1-A/1-B/2-A/2-B,
unimodal baselines, decision-level models, 3-A/3-B), batched training, sweeps and reports. See docs/ARCHITECTURE.md.

In a notebook: `inputs_for(store, strategy)` names the feature sets a strategy reads, and `FusionHead` is one
head as a scikit-learn estimator (fit / predict / predict_proba / score / save_pretrained / from_pretrained) over
one 2-D X, the modalities' columns side by side (`feature_matrices(store, names)` gives a store's splits so);
`heads.ensemble.ensemble(results_dirs, top_k="auto")` averages the top-k saved heads of sweeps, ranked by
validation accuracy.
"""
from heads import ensemble  # the module (a function of that name here would hide it): heads.ensemble.ensemble(...)
from heads.estimator import FeatureMatrices, FusionHead, feature_matrices
from heads.fusion import Fusion, create_fusion, list_fusions, register_fusion
from heads.inputs import inputs_for
from heads.models import HeadConfig, StackedHead
from heads.strategies import Strategy, get_strategy, list_strategies, register_strategy
from heads.train import HeadData, HeadResult, TrainSettings, train_heads

__all__ = ["Fusion", "create_fusion", "list_fusions", "register_fusion", "FusionHead", "feature_matrices",
           "FeatureMatrices", "HeadConfig", "StackedHead", "HeadData", "HeadResult", "TrainSettings", "train_heads",
           "inputs_for", "Strategy", "get_strategy", "list_strategies", "register_strategy"]
