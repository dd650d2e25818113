"""The report of `embed paper`: the paper's Tables 3-7 (pipelines/paper_tables.py), the paper's findings checked on
this data and how this run differs from the paper (pipelines/paper_findings.py), the fused model's targets
(pipelines/paper_targets.py), the best model's confusion matrix (pipelines/paper_confusion.py) and bar charts, as
Markdown + CSV + PNG in OUT/report/.

It only reads what the steps wrote (OUT/plan.json, modules' metrics.json, sweeps' runs.jsonl: summarized by
pipelines/paper_summaries.py) and never trains.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from heads.figures import figure_lines, plot_bars
from heads.tables import write_tables
from pipelines.paper_confusion import confusion
from pipelines.paper_findings import differences, findings
from pipelines.paper_summaries import best_multimodal, collect, groups, manifest_roles
from pipelines.paper_tables import build_tables
from pipelines.paper_targets import targets, targets_issue_20, validation_against_test

PLAN_FILE = "plan.json"       # what `embed paper` ran (pipelines/paper.py writes it; this report reads it)
REPORT_VERSION = 4         # part of the report step's stamp: a new layout re-renders an existing report


def report_inputs(out: str | Path) -> dict:
    """What the report depends on: the plan and the content of every result file it reads."""
    out = Path(out)
    plan = json.loads((out / PLAN_FILE).read_text())
    files = [Path(m["dir"]) / "metrics.json" for e in plan["manifests"] for m in e["modules"]]
    files += [Path(r["dir"]) / "runs.jsonl" for e in plan["manifests"] for r in e["results"]]
    files += [Path(e["ensembles"]) for e in plan["manifests"] if e.get("ensembles")]
    sha = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None for p in files}
    return {"plan": hashlib.sha256((out / PLAN_FILE).read_bytes()).hexdigest(), "files": sha,
            "report_version": REPORT_VERSION}


def write_paper_report(out: str | Path, report_dir: str | Path) -> list[Path]:
    """Write report.md, one CSV per table, bar charts and the confusion matrix; returns the paths written."""
    from embedstore.outputs import write_text_atomic

    out, report_dir = Path(out), Path(report_dir)
    plan = json.loads((out / PLAN_FILE).read_text())
    module_rows, head_rows = collect(plan)
    if not head_rows:
        raise FileNotFoundError(f"no head runs under {out}; run `embed paper CATALOG --out {out}` first")
    report_dir.mkdir(parents=True, exist_ok=True)
    tuning, check = manifest_roles(plan)
    modules, heads = groups(module_rows, tuning), groups(head_rows, tuning)
    manifests = ", ".join(map(str, tuning)) + (f" (tuning), {', '.join(map(str, check))} (check)" if check else "")
    md = ["# The 14-strategy comparison of Seo, Lee & Jang (2025) on this catalog", "",
          f"Catalog `{Path(plan['catalog']).name}`; manifests {manifests}; seeds "
          f"{plan['settings']['seeds']}. Accuracy and macro-F1 on the test split at the best validation epoch, mean ± "
          "std over all (manifest seed, seed) runs; the per-manifest columns are mean ± std over that manifest's "
          "seeds. Training time is per model (a head's share of its batched stack)."]
    table_lines, written = write_tables(build_tables(plan, modules, heads), report_dir)
    md += table_lines
    md += ["", "## Findings of the paper, checked", ""]
    choice = tuning[0]  # models are chosen on the first tuning manifest's validation split only
    md += [f"- **{verdict}**: {claim}. {evidence}." for claim, verdict, evidence in findings(modules, heads, choice)]
    md += ["", "## Targets for the fused model", "",
           f"Choices were made on manifest {choice} only: the multimodal model below is the one with the best "
           f"validation accuracy on manifest {choice}, and it is scored on every manifest's test split. Test "
           f"accuracy chose nothing. Issue #11's targets, on the tuning manifests {', '.join(map(str, tuning))}:", ""]
    md += [f"- **{verdict}**: {target}. {evidence}." for target, verdict, evidence
           in targets(modules, heads, tuning, choice)]
    md += ["", "## Targets of issue #20", "",
           f"The same model (chosen on manifest {choice}'s validation split). Tuning manifests: "
           f"{', '.join(map(str, tuning))}; check manifests, on which nothing was chosen (their validation splits "
           f"enter no choice): {', '.join(map(str, check)) or 'none'}.", ""]
    md += [f"- **{verdict}**: {target}. {evidence}." for target, verdict, evidence
           in targets_issue_20(modules, heads, tuning, check, choice)]
    md += ["", "How optimistic the choice is, the chosen model's validation against its test accuracy: "
           f"{validation_against_test(heads, tuning + check, choice)}."]
    md += ["", "## Confusion matrix of the best model", ""]
    best = best_multimodal(heads, cached_only=True, choice_manifest=choice)
    lines, paths = confusion(head_rows, best, report_dir) if best else (["No multimodal heads."], [])
    md += lines + ["", "![confusion matrix of the best fusion head](confusion_matrix.png)"] * bool(paths)
    written += paths
    md += ["", "## Differences from the paper", ""] + differences(plan, modules)
    spread = "± 1 sample std over all (manifest seed, seed) runs"
    figures = plot_bars(list(heads.values()), report_dir, prefix="heads_",
                        title="Fusion heads, decision-level models, baselines", spread=spread)
    figures += plot_bars(list(modules.values()), report_dir, prefix="modules_", title="Unimodal modules (S1-S3)",
                         spread=spread)
    written += figures
    md += ["", "## Figures", ""] + figure_lines(figures, spread)
    write_text_atomic(report_dir / "report.md", "\n".join(md) + "\n")
    return written + [report_dir / "report.md"]
