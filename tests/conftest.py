"""Fixtures shared by the test files, and the `quick` subset (`pytest -m quick`)."""
import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n auto`: a worker per core (and one spare), so each keeps to one thread (and so do the processes it
    # starts); workers of two threads each on 2 cores would spend their time waiting on each other's barriers
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Unit tests of one part each, no extraction pipelines, subprocesses or torchrun: about a minute together (measured
# 1m12s on a shared 2-core machine under load, 20 s of CPU). A new file joins when it is as quick; slow or real
# tests inside these files stay out.
QUICK_FILES = frozenset((
    "test_catalog.py", "test_cli_options.py", "test_decision.py", "test_fusion.py", "test_heads_estimator.py",
    "test_heads_groups.py", "test_heads_models.py", "test_heads_reference.py", "test_heads_train.py",
    "test_manifest.py", "test_manifest_fractions.py", "test_metrics.py", "test_model_folder.py",
    "test_paper_findings.py", "test_paper_targets.py", "test_public_api.py", "test_readme_notebook.py",
    "test_store.py", "test_store_chunks.py", "test_training.py",
))


def pytest_xdist_auto_num_workers(config):
    """`pytest -n auto`: one worker more than the cores. Many tests wait on processes they start (kill -9 runs,
    torchrun ranks, CLI subprocesses), and a waiting worker leaves its core to the spare one. Measured on 2 idle
    cores, the whole suite: -n 2 311 s, -n 3 266 s, -n 4 296 s (2026-12-07)."""
    from heads.dispatch import default_jobs   # the cores this process may use, as the sweep counts them

    return default_jobs(torch.device("cpu")) + 1


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).name in QUICK_FILES and not item.get_closest_marker("slow") \
                and not item.get_closest_marker("real"):
            item.add_marker(pytest.mark.quick)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared machine thread barriers cost milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sweeps_in_this_process(monkeypatch):
    """Pipelines that sweep with the default `--jobs` (`embed paper`, `embed demo`: they have no such option) train
    their heads in this process instead of spawning one worker per core, each importing torch again (on 2 busy
    cores ~8 s per sweep, against ~2 s of training in the paper test). Where the heads train does not change what
    they learn (heads/dispatch.py); the worker pools themselves are tested with an explicit --jobs 2
    (test_sweep_grid.py, test_hostile_sweep.py) and the default's value in test_run_context.py."""
    import heads.dispatch
    from heads.context import RunContext

    monkeypatch.setattr(heads.dispatch, "default_jobs", lambda device: 1)
    # where a sweep resolves its default: if that moves, this fixture must follow (or it silently does nothing)
    assert RunContext.resolve(torch.device("cpu"), precision="auto", jobs=None, memory_budget=0).jobs == 1
