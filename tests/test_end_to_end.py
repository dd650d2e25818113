"""Strategies 3-A / 3-B trained end to end: shapes and gradients for every operator, learning, resume, a
2-process torchrun run against one process, and `heads sweep --strategies 3A`. Tiny random backbones
(tiny-resnet on 64 px images, tiny-bert) and generated catalogs."""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cli.heads import heads
from embedstore.backbones import create_backbone
from embedstore.catalog import open_catalog
from embedstore.extract import extract
from embedstore.extract_plan import ExtractSettings
from embedstore.training import predict
from embedstore.manifest import SplitSettings, prepare_manifest
from embedstore.synthetic_catalog import make_fashion_catalog
from heads.strategies import list_strategies
from embedstore.fingerprint import fingerprint
from heads.end_to_end import (RESUME_KEYS, EndToEndModel, EndToEndSettings, PairItems, load_end_to_end,
                              train_end_to_end)
from heads.fusion import list_fusions

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
QUICK = dict(image_backbone="tiny-resnet", text_backbone="tiny-bert", image_size=SIZE, workers=0, progress=False,
             batch_size=8, lr=3e-3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("end_to_end")
    # no defects: a skipped image would make the two processes' batches differ in size in the torchrun test
    info = make_fashion_catalog(root / "catalog", per_class=24, as_zip=True, defects=False)
    manifest = prepare_manifest(open_catalog(info.path), SplitSettings(min_items=24, items_per_class=24, train=14,
                                                                       val=4, test=6, seed=0))
    manifest.save(root / "manifest.json")
    return {"root": root, "manifest": manifest, "manifest_path": root / "manifest.json"}


def backbones():
    return (create_backbone("image", "tiny-resnet", image_size=SIZE), create_backbone("text", "tiny-bert"))


def train(world, out, **options):
    settings = EndToEndSettings(**{**QUICK, "max_epochs": 3, "patience": 10, **options})
    return train_end_to_end(world["manifest_path"], out, settings, backbones=backbones()).metrics


@pytest.mark.parametrize("strategy", list_strategies(trainer="end-to-end"))
def test_forward_shapes_for_every_operator_and_gradients_reach_both_backbones(strategy):
    image, text = backbones()
    tokens = text.tokenize(["Puma Men Black Tshirt", "Titan Women Analog Watch", "Nike Canvas Sneakers"])
    images = torch.randn(3, 3, SIZE, SIZE)
    for fusion in list_fusions():
        model = EndToEndModel(image, text, 4, strategy=strategy, fusion=fusion)
        logits = model({"images": images, **tokens})
        assert logits.shape == (3, 4) and torch.isfinite(logits).all(), fusion
        model.zero_grad()
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
        first_conv = model.image.backbone.trunk.conv1.weight if hasattr(model.image.backbone.trunk, "conv1") \
            else next(model.image.backbone.parameters())
        assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0, fusion
        embeddings = model.text.backbone.model.embeddings.word_embeddings.weight
        assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0, fusion
        assert model.parameter_counts()["non_trainable"] == 0
        assert (model.image.head.classifier is None) == (strategy == "3A")  # 3-A fuses the 500-d layers
    with pytest.raises(ValueError, match="registered"):
        EndToEndSettings(fusion="max").check()


@pytest.mark.parametrize("strategy,fusion", [("3A", "concat"), ("3B", "gated")])
def test_training_learns_well_above_chance_and_saves_safetensors(world, tmp_path, strategy, fusion):
    metrics = train(world, tmp_path / "run", strategy=strategy, fusion=fusion, max_epochs=4)
    assert metrics["test_accuracy"] >= 0.7, metrics["history"]  # chance is 1/3
    assert metrics["trainable_parameters"] > 0 and metrics["non_trainable_parameters"] == 0
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert any(k.startswith("image.backbone.") for k in saved) and any(k.startswith("text.backbone.") for k in saved)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["settings"]["strategy"] == strategy and config["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    assert (config["format"], config["kind"]) == ("embedstore-model", "end-to-end")
    # the loader rebuilds the trained model: it reproduces the recorded test accuracy
    model, loaded = load_end_to_end(tmp_path / "run")
    data = PairItems(world["manifest"], model.image.backbone, model.text.backbone,
                     EndToEndSettings(**loaded["settings"]), torch.device("cpu"))
    labels, predicted = predict(model, data.batches("test"), torch.device("cpu"))
    assert (labels == predicted).mean() == metrics["test_accuracy"]


def test_resume_continues_from_the_last_epoch_like_an_uninterrupted_run(world, tmp_path):
    quick = dict(max_steps_per_epoch=3)
    whole = train(world, tmp_path / "whole", max_epochs=2, **quick)
    first = train(world, tmp_path / "split", max_epochs=1, **quick)
    assert first["epochs"] == 1 and (tmp_path / "split" / "checkpoint.safetensors").is_file()
    resumed = train(world, tmp_path / "split", max_epochs=2, **quick)
    assert resumed["resumed_from_epoch"] == 1 and resumed["epochs"] == 2
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in whole["history"]]
    a, b = (load_file(str(tmp_path / name / "checkpoint.safetensors")) for name in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # weights and AdamW moments
    assert "estimated_full_epoch_seconds" in resumed and resumed["steps_per_full_epoch"] == 6  # 42 items / 8
    with pytest.raises(ValueError, match="fusion="):
        train(world, tmp_path / "split", max_epochs=3, fusion="add", **quick)


# run by torchrun as a script, and exec'd by the test for the one-process run (the same code; a third process
# would only add seconds of imports)
DDP_SCRIPT = """
import json, sys
import torch
from embedstore.backbones import create_backbone
from heads.end_to_end import EndToEndSettings, train_end_to_end

def train(manifest, out, settings_json):
    torch.set_num_threads(1)
    settings = EndToEndSettings(**json.loads(settings_json))
    backbones = (create_backbone("image", "tiny-resnet", image_size=64), create_backbone("text", "tiny-bert"))
    for module in backbones[1].modules():  # BERT's own dropout draws differently in one process and in two
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    train_end_to_end(manifest, out, settings, backbones=backbones)

if __name__ == "__main__":
    train(*sys.argv[1:4])
"""


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one_process_with_the_same_global_batch(world, tmp_path):
    # no dropout, no flips and frozen batch-norm statistics: then 2 x 4 items per step is the same step as 1 x 8
    common = {**QUICK, "dropout": 0.0, "flip": False, "freeze_batchnorm": True, "max_epochs": 2, "patience": 10,
              "max_steps_per_epoch": 4, "lr": 1e-3}
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script_globals = {"__name__": "ddp_script"}
    exec(compile(DDP_SCRIPT, str(script), "exec"), script_globals)
    script_globals["train"](str(world["manifest_path"]), str(tmp_path / "one"), json.dumps({**common, "batch_size": 8}))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          str(script), str(world["manifest_path"]), str(tmp_path / "two"),
                          json.dumps({**common, "batch_size": 4})], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two"))
    assert (m1["processes"], m2["processes"]) == (1, 2)
    assert [h["steps"] for h in m1["history"]] == [h["steps"] for h in m2["history"]] == [4, 4]
    for h1, h2 in zip(m1["history"], m2["history"]):
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], rel=2e-3)  # float sums in another order
        assert h1["val_accuracy"] == h2["val_accuracy"]
    a, b = (load_file(str(tmp_path / name / "checkpoint.safetensors")) for name in ("one", "two"))
    assert a.keys() == b.keys()
    # Not element by element: Adam turns the float noise of gradients that are zero in exact arithmetic (an
    # attention key bias shifts every score of a query alike) into +-lr steps. The model as a whole must agree.
    weights = [k for k in a if k.startswith("model.") and a[k].is_floating_point()]
    difference = torch.cat([(a[k] - b[k]).flatten() for k in weights])
    reference = torch.cat([a[k].flatten() for k in weights])
    assert difference.norm() / reference.norm() < 1e-3
    assert (difference.abs() > 1e-4).float().mean() < 1e-3
    assert m1["test_accuracy"] == m2["test_accuracy"]


def test_heads_sweep_writes_end_to_end_rows_like_the_cached_ones(world, tmp_path):
    store = tmp_path / "store.h5"
    extract(world["manifest_path"], store, ExtractSettings(image_backbone="tiny-resnet", text_backbone="tiny-bert",
                                                           image_size=SIZE, workers=0, progress=False))
    out, runner = tmp_path / "results", CliRunner()
    args = ["sweep", str(store), "--out", str(out), "--fusions", "concat", "--seeds", "0", "--no-baselines",
            "--max-epochs", "2", "--end-to-end-epochs", "1", "--max-steps-per-epoch", "1", "--device", "cpu", "--jobs", "1"]
    result = runner.invoke(heads, [*args, "--strategies", "3A"])
    assert result.exit_code == 2 and "--manifest" in result.output
    result = runner.invoke(heads, [*args, "--strategies", "2A,3A", "--manifest", str(world["manifest_path"])])
    assert result.exit_code == 0, result.output
    rows = {row["strategy"]: row for row in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert set(rows) == {"2A", "3A"}
    cached, e2e = rows["2A"], rows["3A"]
    assert set(cached) <= set(e2e), set(cached) - set(e2e)  # the same columns (and a few more)
    assert e2e["cell"] == "3A-concat" and e2e["seed"] == 0 and e2e["non_trainable_parameters"] == 0
    assert e2e["trainable_parameters"] > cached["trainable_parameters"] and 0 <= e2e["test_accuracy"] <= 1
    assert e2e["best_epoch"] == 1 and e2e["train_seconds"] > 0 and e2e["estimated_full_epoch_seconds"] > 0
    assert e2e["train_settings"]["image_backbone"] == "tiny-resnet" and e2e["train_settings"]["image_size"] == SIZE
    result = runner.invoke(heads, [*args, "--strategies", "3A", "--manifest", str(world["manifest_path"])])
    assert result.exit_code == 0 and "skipped 1" in result.output, result.output


def test_end_to_end_runs_honour_the_sweeps_precision_and_auto_keeps_the_old_run_keys(world, tmp_path):
    """--precision reaches 3-A/3-B (it used to be ignored: autocast followed the device alone). "auto" stays out of
    the run key, so rows made before the setting existed still count as done; "bf16" is another run."""
    store = tmp_path / "store.h5"
    extract(world["manifest_path"], store, ExtractSettings(image_backbone="tiny-resnet", text_backbone="tiny-bert",
                                                           image_size=SIZE, workers=0, progress=False))
    out = tmp_path / "results"
    args = ["sweep", str(store), "--out", str(out), "--fusions", "concat", "--seeds", "0", "--no-baselines",
            "--strategies", "3A", "--manifest", str(world["manifest_path"]), "--end-to-end-epochs", "1",
            "--max-steps-per-epoch", "1", "--device", "cpu"]
    for precision in ("auto", "bf16"):
        result = CliRunner().invoke(heads, [*args, "--precision", precision])
        assert result.exit_code == 0, result.output
    auto, bf16 = map(json.loads, (out / "runs.jsonl").read_text().splitlines())
    assert (auto["precision"], bf16["precision"]) == ("fp32", "bf16") and auto["run_key"] != bf16["run_key"]
    # the key of an "auto" run is the recipe's from before: no precision among the settings it fingerprints
    old_fields = [k for k in RESUME_KEYS + ("max_epochs", "patience") if k != "precision"]
    identity = {k: v for k, v in auto["train_settings"].items() if k in old_fields}
    assert auto["run_key"] == fingerprint({"settings": identity, "manifest_sha256": auto["store"]["manifest_sha256"],
                                           "backbones": {m: p["weights_id"] for m, p in
                                                         auto["store"]["backbones"].items()}})
