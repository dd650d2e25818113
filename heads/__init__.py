"""Fusion heads over the feature store: operators, strategies 1-A/1-B/2-A/2-B + unimodal baselines, batched
training, sweeps and reports. See docs/ARCHITECTURE.md."""
from heads.fusion import Fusion, create_fusion, list_fusions, register_fusion
from heads.estimator import FusionHead
from heads.models import HeadConfig, StackedHead
from heads.train import HeadData, HeadResult, TrainSettings, train_heads

__all__ = ["Fusion", "create_fusion", "list_fusions", "register_fusion", "FusionHead", "HeadConfig", "StackedHead",
           "HeadData", "HeadResult", "TrainSettings", "train_heads"]
