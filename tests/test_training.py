"""The shared training loop (embedstore/training.py), metrics in one place, device and autocast from defaults."""
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from embedstore import defaults, extract, extract_loop, finetune, training
from embedstore.metrics import classification_metrics
from heads import end_to_end


def test_modules_and_end_to_end_share_one_loop():
    for name in ("fit", "predict", "training_processes", "check_training_numbers"):
        assert getattr(finetune, name) is getattr(training, name)
        assert getattr(end_to_end, name) is getattr(training, name)


def test_device_and_autocast_come_from_defaults():
    # older imports keep working, and they are the defaults' functions (LOCAL_RANK % device_count under torchrun)
    assert extract.resolve_device is defaults.resolve_device
    assert extract_loop.autocast_for is defaults.autocast_for is training.autocast_for
    with defaults.autocast_for(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")  # fp32 on a CPU, as before


def test_macro_f1_over_every_class_it_is_told_of():
    labels, predictions = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0])
    present = classification_metrics(labels, predictions, n_classes=2)
    every = classification_metrics(labels, predictions, n_classes=3)  # class 2: absent from both, F1 0
    assert present["accuracy"] == every["accuracy"] == 0.75
    assert every["macro_f1"] == pytest.approx(present["macro_f1"] * 2 / 3)
    with pytest.raises(TypeError):   # the class count is required: no caller can fall back to "classes present"
        classification_metrics(labels, predictions)


class _Separable:
    """Two well-separated classes of 2-d points: the loop's data protocol."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.x = {s: torch.randn(n, 2, generator=generator) for s, n in (("train", 64), ("val", 32), ("test", 32))}
        self.y = {s: (x[:, 0] > 0).long() for s, x in self.x.items()}
        self.x = {s: x + 3 * (2 * self.y[s][:, None] - 1) for s, x in self.x.items()}

    def train_size(self):
        return 64

    def train_batches(self, batch_size, sampler, generator):
        order = torch.tensor(list(sampler))
        for begin in range(0, len(order), batch_size):
            yield self.x["train"][order[begin:begin + batch_size]], self.y["train"][order[begin:begin + batch_size]]

    def batches(self, split):
        yield self.x[split], self.y[split]


@dataclass
class _Settings:  # what fit reads (checkpoints store it as JSON, so a dataclass)
    seed: int = 0
    batch_size: int = 16
    max_epochs: int = 20
    patience: int = 2
    max_steps_per_epoch: int | None = None
    progress: bool = False


def test_fit_stops_early_and_scores_through_the_shared_metrics(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    summary = training.fit(model, _Separable(), _Settings(), torch.device("cpu"),
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.1), clip=None,
                           checkpoint_dir=tmp_path, resume_keys=("seed", "batch_size"))
    assert summary["best_val_accuracy"] == 1.0
    assert summary["stopped_early"] and summary["epochs"] == summary["best_epoch"] + _Settings.patience
    assert (tmp_path / training.CHECKPOINT).is_file() and (tmp_path / training.BEST).is_file()
