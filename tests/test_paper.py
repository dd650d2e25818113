"""`embed paper` end to end on a tiny generated catalog: every report file, table and finding; a second run
skips every step and retrains nothing; a changed setting re-runs only what depends on it."""
import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.embed import embed
from tests.catalog_factory import make_fashion_catalog
from heads.strategies import list_strategies


pytestmark = pytest.mark.usefixtures("one_thread", "sweeps_in_this_process")   # conftest.py


SMALL = ["--image-backbone", "tiny-resnet", "--text-backbone", "tiny-bert", "--image-size", "64", "--seeds", "0,1",
         "--manifest-seeds", "0,1", "--min-items", "16", "--items-per-class", "16", "--train", "10", "--val", "3",
         "--test", "3", "--text-s3-epochs", "1", "--head-epochs", "10", "--module-epochs", "10", "--workers", "0",
         "--no-progress", "--device", "cpu"]
TABLES = ("table3_image_strategies", "table4_text_strategies", "table5_multimodal_strategies",
          "table6_fusion_operators", "table7_unimodal_vs_multimodal")


def run(catalog, out, *extra):
    result = CliRunner().invoke(embed, ["paper", str(catalog), "--out", str(out), *SMALL, *extra])
    assert result.exit_code == 0, result.output
    steps = [line for line in result.output.splitlines() if re.search(r": (run \(|skipped \()", line)]
    return result.output, steps


def results_files(out):
    return {p: p.read_bytes() for p in sorted(out.glob("manifest-seed-*/results/*/runs.jsonl"))}


def ran(steps, needle):
    return [s for s in steps if needle in s and ": run (" in s]


@pytest.mark.slow
def test_paper_end_to_end_then_skip_then_rerun_what_changed(tmp_path):
    info = make_fashion_catalog(tmp_path / "catalog", classes=("Tshirts", "Watches", "Casual Shoes", "Handbags"),
                                per_class=20, as_zip=True)
    out = tmp_path / "paper"
    output, steps = run(info.path, out)
    assert steps and all(": run (new)" in s for s in steps), output
    report = out / "report"
    for name in TABLES:
        assert (report / f"{name}.csv").stat().st_size > 0
    for name in ("report.md", "confusion_matrix.png", "confusion_matrix.csv", "heads_accuracy.png",
                 "heads_training_time.png", "modules_accuracy.png", "modules_training_time.png"):
        assert (report / name).stat().st_size > 0, name
    md = (report / "report.md").read_text()
    for title in ("Table 3", "Table 4", "Table 5", "Table 6", "Table 7", "## Confusion matrix of the best model",
                  "## Differences from the paper"):
        assert title in md, title
    findings = md.split("## Findings of the paper, checked")[1].split("\n## ")[0]
    verdicts = re.findall(r"^- \*\*(HELD|NOT HELD|NOT DECIDED)\*\*", findings, flags=re.M)
    assert len(verdicts) == 7 and set(verdicts) <= {"HELD", "NOT HELD"}, findings
    targets = md.split("## Targets for the fused model")[1].split("\n## ")[0]
    assert "Choices were made on manifest 0 only" in targets
    assert len(re.findall(r"^- \*\*(MET|NOT MET)\*\*", targets, flags=re.M)) == 3, targets
    assert re.search(r"validation against its test accuracy: \S+: manifest 0 \(chose it\): validation [\d.]+ %, "
                     r"test [\d.]+ %", md), md
    assert "| LF | (none) |" in md and "(ensemble)" in md and "logistic regression" in md
    assert "| image only: a head over the image backbone's pooled features (image) |" in md  # modality named once
    assert "tiny-resnet" in md and "Image S3: skipped" in md and "3-A/3-B (end to end): skipped" in md
    assert "60x80 px" in md  # the generated catalog's photo size, read from the catalog
    # the tables' numbers come from the runs: image S2's mean over both manifests x both seeds
    accs = [json.loads((out / f"manifest-seed-{m}/modules/image-s2-seed-{s}/metrics.json").read_text())
            ["test_accuracy"] for m in (0, 1) for s in (0, 1)]
    mean, std = 100 * np.mean(accs), 100 * np.std(accs, ddof=1)
    assert f"| S2 (middle layer + classifier) | 4 | {mean:.2f} ± {std:.2f} |" in md
    runs = results_files(out)
    assert len(runs) == 2 * 3  # per manifest: pooled + one modules sweep per seed
    # the report's ensemble is a multimodal model: its pool leaves the unimodal heads and regressions out (with
    # them, the top 1 by validation was the text head alone on a real manifest)
    ensembled = json.loads((out / "manifest-seed-0/results/pooled/ensembles.jsonl").read_text().splitlines()[-1])
    assert ensembled["multimodal_only"] and ensembled["unimodal_left_out"] >= 4

    # a second run skips every step and writes no result
    metrics = {p: p.stat().st_mtime_ns for p in out.glob("manifest-seed-*/modules/*/metrics.json")}
    output, again = run(info.path, out)
    assert len(again) == len(steps) and all(": skipped (current" in s for s in again), output
    assert results_files(out) == runs
    assert {p: p.stat().st_mtime_ns for p in metrics} == metrics

    # other head settings: the sweeps (and the report) re-run; manifests, features and modules do not
    output, changed = run(info.path, out, "--head-epochs", "8")
    assert {s.split("] ")[-1].split(":")[0] for s in ran(changed, "")} == {
        "sweep results/pooled (2-A, 2-B, baselines, LR, LF, ST)", "sweep results/modules-seed-0 (1-A, 1-B, LFM)",
        "sweep results/modules-seed-1 (1-A, 1-B, LFM)", "ensemble results/pooled/ensembles.jsonl", "report"}, output
    rows = [json.loads(line) for p in results_files(out) for line in p.read_text().splitlines()]
    heads = [r for r in rows if r["strategy"] not in list_strategies(trainer="linear")]   # regressions have no epochs
    assert heads and all(r["train_settings"]["max_epochs"] == 8 for r in heads)  # stale runs removed
    assert {r["strategy"] for r in rows} >= {"LF", "ST", "LFM", "LR-text"}

    # more S3 epochs: text S3 resumes; nothing upstream or beside it re-runs
    output, changed = run(info.path, out, "--head-epochs", "8", "--text-s3-epochs", "2")
    assert len(ran(changed, "finetune text-s3-seed-0")) == 2, output
    for name in ("prepare", "extract", "text-s2", "image-s1", "results/pooled"):
        assert not ran(changed, name), (name, output)


def test_paper_refuses_one_manifest(tmp_path):
    result = CliRunner().invoke(embed, ["paper", str(tmp_path), "--out", str(tmp_path / "o"), "--manifest-seeds", "0"])
    assert result.exit_code == 2 and "at least two manifest seeds" in result.output
