"""One run's settings, resolved once at its entry point: the device, the precision, the worker processes and the
memory budget a sweep's cells are trained with.

`heads sweep` (heads/sweep.py) resolves a `RunContext` from its `SweepSettings` before any work and hands the
same frozen object to everything below it (the data cache, the dispatch to workers or ranks, the trainer, the
end-to-end runs, the closing summary), so no function further down reads a default or resolves a name again.
Defaults live in one place, the settings dataclasses (SweepSettings, TrainSettings); the CLI reads them from there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from embedstore.defaults import resolve_precision


@dataclass(frozen=True)
class RunContext:
    device: torch.device      # where heads train (under torchrun: this rank's)
    precision: str            # "bf16" | "fp32": what TrainSettings.precision ("auto" too) means on this device
    jobs: int                 # worker processes training cells at once (1: this process)
    memory_budget: int        # bytes a cell's features may take in memory; beyond it they stream from the store

    @classmethod
    def resolve(cls, device: torch.device, *, precision: str, jobs: int | None,
                memory_budget: int | None) -> "RunContext":
        """`device` already resolved (resolve_device, or training_processes under torchrun); None for `jobs` /
        `memory_budget`: the cores this process may use (1 on CUDA) / half the memory available now."""
        from embedstore.streaming import default_memory_budget
        from heads.dispatch import default_jobs

        return cls(device, resolve_precision(precision, device), jobs or default_jobs(device),
                   memory_budget if memory_budget is not None else default_memory_budget())
