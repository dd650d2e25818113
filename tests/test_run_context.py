"""A sweep's settings are resolved once, into one frozen RunContext (heads/context.py)."""
import dataclasses
import os

import pytest
import torch

from heads.context import RunContext


def test_resolved_once_from_the_users_words():
    cpu = torch.device("cpu")
    auto = RunContext.resolve(cpu, precision="auto", jobs=None, memory_budget=None)
    assert auto.precision == "fp32"          # "auto" on a CPU, even one with native bf16 (measured: sweep_scale.md)
    assert auto.jobs == len(os.sched_getaffinity(0)) and auto.memory_budget > 0
    asked = RunContext.resolve(cpu, precision="bf16", jobs=3, memory_budget=0)
    assert (asked.precision, asked.jobs, asked.memory_budget) == ("bf16", 3, 0)   # 0: stream every cell
    with pytest.raises(dataclasses.FrozenInstanceError):
        asked.jobs = 1
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        RunContext.resolve(cpu, precision="fp8", jobs=1, memory_budget=None)
