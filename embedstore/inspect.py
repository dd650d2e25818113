"""`embed inspect`: what a store holds, in words a person can check."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from embedstore.image_pipeline import recorded_pipeline
from embedstore.store import SPLITS, FeatureStore, label_problem


def describe_store(path: str | Path) -> list[str]:
    """Items per split, classes, every feature set with shape, dtype, provenance and skipped items."""
    with FeatureStore(path, check_labels=False) as store:  # damaged labels are described, not refused
        split_counts = Counter(store.split.tolist())
        lines = [
            f"store       {store.path}",
            f"manifest    sha256 {store.manifest_sha256}",
            f"created     {store.attrs.get('created', '?')}",
            "items       " + ", ".join(f"{split} {split_counts.get(split, 0):,}" for split in SPLITS)
            + f" (total {len(store.ids):,})",
            f"classes     {len(store.classes)}: {', '.join(store.classes[:8])}{' …' if len(store.classes) > 8 else ''}",
        ]
        sets = store.feature_sets
        if not sets:
            lines.append("features    none yet: run `embed extract`")
        damaged = 0
        for name, info in sorted(sets.items()):
            p = info.provenance
            skipped = {k: v for k, v in info.counts.items() if k.startswith("skipped") and v}
            state = "complete" if info.complete else f"INCOMPLETE ({info.counts.get('pending', '?')} rows pending)"
            layout = (f"chunks of {p['chunk_rows']} rows" if p.get("chunk_rows") else
                      "contiguous (written before row chunking; streamed in row blocks)")
            if bad := store.non_finite_rows(name):  # values edited or written by an older version: say so
                damaged += 1
                state = f"DAMAGED: {bad} rows marked ok hold NaN or inf (readers leave them out)"
            lines += [
                f"feature set {name}: ({len(store.ids)}, {info.dim}) {info.dtype}, {state}",
                f"    layout {layout}",
                f"    backbone {p.get('backbone')}  weights {p.get('weights_id')}  parameters {p.get('parameters', '?'):,}"
                if isinstance(p.get("parameters"), int) else
                f"    backbone {p.get('backbone')}  weights {p.get('weights_id')}",
                f"    preprocessing {p.get('preprocessing')}",
                *([f"    pipeline: {recorded_pipeline(p.get('preprocessing'))}"] if info.modality == "image" else []),
                f"    created {p.get('created', '?')}  versions {_short_versions(p.get('library_versions'))}",
                f"    rows ok {info.counts.get('ok', 0):,}; skipped "
                + (", ".join(f"{k.removeprefix('skipped: ')} {v}" for k, v in skipped.items()) or "none"),
            ]
        overall = "complete" if store.complete else "NOT complete"
        if damaged:
            overall = f"DAMAGED ({damaged} feature sets hold non-finite rows marked ok)"
        if labels := label_problem(store.labels, store.classes):  # every reader refuses such a store
            overall = f"DAMAGED ({labels}; readers refuse it: extract into a new --store)"
        lines.append(f"status      {overall}")
    return lines


def format_counts(counts: dict) -> str:
    """Rows per status as people read them: {"ok": 38, "skipped: missing image": 2} -> "ok: 38, skipped (missing
    image): 2" (what `embed extract`, the demo and `embed paper` print; never a Python dict)."""
    parts = []
    for name, n in counts.items():
        kind, _, reason = str(name).partition(": ")
        parts.append(f"{kind} ({reason}): {n:,}" if reason else f"{name}: {n:,}")
    return ", ".join(parts) or "no rows"


def _short_versions(versions) -> str:
    if not isinstance(versions, dict):
        return "?"
    return " ".join(f"{k} {versions[k]}" for k in ("torch", "transformers", "h5py") if k in versions)
