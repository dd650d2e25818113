"""`embed paper --image-resize pad --check-manifest-seeds ... --cross-fit K` on a tiny generated catalog: the store
and the image modules pad, the check manifest runs every step but chooses nothing, issue #20's targets are reported
beside issue #11's; given --cross-fit afterwards, an existing run only adds the cross-fit steps (every old step's
stamp unchanged), and the report shows the cross-fit rows beside the plain ones."""
import json
import re

import pytest
from click.testing import CliRunner

from cli.embed import embed
from embedstore.store import FeatureStore
from pipelines.paper_confusion import confusion
from pipelines.paper_summaries import collect, groups
from tests.catalog_factory import make_fashion_catalog

pytestmark = pytest.mark.usefixtures("one_thread", "sweeps_in_this_process")   # conftest.py

SMALL = ["--image-backbone", "tiny-resnet", "--text-backbone", "tiny-bert", "--image-size", "64", "--seeds", "0",
         "--manifest-seeds", "0,1", "--min-items", "16", "--items-per-class", "16", "--train", "10", "--val", "3",
         "--test", "3", "--text-s3-epochs", "1", "--head-epochs", "4", "--module-epochs", "4", "--workers", "0",
         "--fusions", "concat,gated", "--no-progress", "--device", "cpu"]


def run(catalog, out, *extra):
    result = CliRunner().invoke(embed, ["paper", str(catalog), "--out", str(out), *SMALL, *extra])
    assert result.exit_code == 0, result.output
    return result.output, [line for line in result.output.splitlines() if re.search(r": (run \(|skipped \()", line)]


def section(md: str, title: str) -> str:
    return md.split(f"## {title}")[1].split("\n## ")[0]


def table_row(md: str, first_cell: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {first_cell} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.slow
def test_padded_checked_then_cross_fitted(tmp_path):
    info = make_fashion_catalog(tmp_path / "catalog", classes=("Tshirts", "Watches", "Casual Shoes"), per_class=20)
    out = tmp_path / "paper"
    run(info.path, out, "--image-resize", "pad", "--check-manifest-seeds", "2")

    # the store's image features and every image module pad; text modules are untouched
    with FeatureStore(out / "manifest-seed-2/store.h5") as store:
        assert "image/tiny-resnet-64px-pad/pooled" in store.feature_sets
    for folder in (out / "manifest-seed-0/modules").glob("image-s*-seed-0"):
        assert json.loads((folder / "config.json").read_text())["backbone"]["build"]["image_resize"] == "pad"
    plan = json.loads((out / "plan.json").read_text())
    assert [(e["seed"], e["role"]) for e in plan["manifests"]] == [(0, "tuning"), (1, "tuning"), (2, "check")]
    md = (out / "report/report.md").read_text()
    assert "manifests 0, 1 (tuning), 2 (check)" in md and "accuracy % manifest 2 (check)" in md
    assert "white square (--image-resize pad" in md
    eleven = section(md, "Targets for the fused model")
    assert "Choices were made on manifest 0 only" in eleven and "tuning manifests 0, 1:" in eleven
    assert len(re.findall(r"^- \*\*(MET|NOT MET)\*\*", eleven, flags=re.M)) == 3, eleven
    twenty = section(md, "Targets of issue #20")
    verdicts = re.findall(r"^- \*\*(MET|NOT MET)\*\*: (.*)$", twenty, flags=re.M)
    assert len(verdicts) == 2, twenty
    assert "98.5 % mean test accuracy on the tuning manifests" in verdicts[0][1]
    assert "over its runs on the tuning manifests 0, 1" in verdicts[0][1]
    assert all(f"manifest {m}: " in verdicts[1][1] for m in (0, 1, 2)) and "check manifests 2" in verdicts[1][1]
    assert "(cross-fit)" not in md

    stamps = {p: p.read_bytes() for p in out.glob("manifest-seed-*/**/*.stamp.json")}
    runs = {p: p.read_bytes() for p in out.glob("manifest-seed-*/results/*/runs.jsonl")}
    output, steps = run(info.path, out, "--image-resize", "pad", "--check-manifest-seeds", "2", "--cross-fit", "2")
    ran = sorted({s.split("] ")[-1].split(":")[0] for s in steps if ": run (" in s})
    # per manifest: the pair's modules (image S2, text S3) cross-fitted, their store and sweep; the ensemble (it pools
    # the new folder too) and the report
    assert ran == ["ensemble results/pooled/ensembles.jsonl", "finetune image-s2-seed-0-cross-fit-2",
                   "finetune text-s3-seed-0-cross-fit-2", "module features module-stores/seed-0-cross-fit.h5",
                   "report", "sweep results/modules-cross-fit-seed-0 (1-A, 1-B, LFM)"], output
    for path, before in stamps.items():
        if "ensembles.jsonl" not in path.name:
            assert path.read_bytes() == before, path
    assert all(p.read_bytes() == before for p, before in runs.items())
    assert len(list(out.glob("manifest-seed-*/modules/text-s3-seed-0-cross-fit-2/folds/fold-1"))) == 3

    plan = json.loads((out / "plan.json").read_text())
    variants = [r.get("variant") for r in plan["manifests"][0]["results"]]
    assert variants == [None, None, "cross-fit K=2"]
    md = (out / "report/report.md").read_text()
    # Table 5: 1A and 1A (cross-fit) side by side, each with its best operator; LFM and LFM (cross-fit) rows
    for name in ("1A", "1A (cross-fit)", "1B", "1B (cross-fit)"):
        row = table_row(md, name)
        assert row[1] in ("concat", "gated") and row[2] == "3", row   # 1 seed x 3 manifests
    assert table_row(md, "LFM (cross-fit)")[1] == "(none)"
    assert "| 1A (cross-fit) acc % |" in md   # Table 6: a column per strategy and variant
    table6 = md.split("Table 6")[1].split("Table 7")[0]
    assert "concat (cross-fit)" not in table6 and "(cross-fit)" in table_row(table6, "fusion")[2]
    assert "(LFM (cross-fit))" in md   # Table 7
    findings = section(md, "Findings of the paper, checked")
    assert "(cross-fit)" not in findings.split("multimodal error")[0]   # the paper's protocol: plain runs only
    assert "Cross-fitting (not in the paper)" in md
    # a cross-fit group chosen as the best fusion head: its confusion matrix scores the head the sweep saved
    # under its cell's name in the cross-fit results folder
    module_rows, head_rows = collect(plan)
    lines, paths = confusion(head_rows, groups(head_rows)["1A-concat (cross-fit)"], tmp_path)
    assert paths and "results/modules-cross-fit-seed-0/heads/1A-concat" in lines[0], lines


def test_paper_refuses_bad_new_options_in_one_line(tmp_path):
    base = ["paper", str(tmp_path), "--out", str(tmp_path / "o"), "--manifest-seeds", "0,1"]
    for extra, message in ((["--check-manifest-seeds", "1,3"], "not tuning manifest seeds"),
                           (["--cross-fit", "1"], "--cross-fit must be an integer of at least 2")):
        result = CliRunner().invoke(embed, base + extra)
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(embed, base + ["--image-resize", "squash"])
    assert result.exit_code == 2 and "'squash' is not one of 'crop', 'pad'" in result.output
