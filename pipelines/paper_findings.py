"""`embed paper`'s report compared with the paper: its findings checked on this run's summaries
(pipelines/paper_summaries.py), each HELD / NOT HELD / NOT DECIDED with the numbers that decide it, and how this run
differs from the paper (backbones, photo sizes, reduced training).

The paper's claims are checked on mean test accuracy, as the paper states them; the multimodal model they compare is
chosen by validation accuracy on the choice manifest, never by test. The claims about strategies and operators
compare the paper's protocol: runs over cross-fitted modules ("(cross-fit)" groups) are left out of them.
"""
from __future__ import annotations

import numpy as np

from pipelines.paper_summaries import best_module, best_multimodal, cached_strategies
from pipelines.paper_targets import operator_strategies, variant_of

PAPER_BACKBONES = {"image": "resnet50", "text": "bert-base-uncased"}
PAPER_ERROR_RATIOS = {"text": 1 / 2, "image": 1 / 7}  # multimodal error / unimodal error in the paper
RATIO_TOLERANCE = 1.5      # "about": within a factor 1.5 of the paper's ratio
SPEED_RATIO_RANGE = (1.5, 3.0)  # "about twice as fast"


def _verdict(held: bool | None) -> str:
    return "NOT DECIDED" if held is None else "HELD" if held else "NOT HELD"


def findings(modules: dict, heads: dict, choice_manifest: int | None = None) -> list[tuple[str, str, str]]:
    """(the paper's claim, HELD / NOT HELD, the numbers that decide it)."""
    out = []

    def acc(c):
        return f"{c['cell']} {100 * c['accuracy_mean']:.2f} %"

    for modality, winner in (("image", 2), ("text", 3)):
        mine = [c for k, c in modules.items() if k.startswith(f"{modality} S")]
        best = best_module(modules, modality)
        ran = ", ".join(acc(c) for c in mine)
        missing = [s for s in (1, 2, 3) if f"{modality} S{s}" not in modules]
        note = f" (S{', S'.join(map(str, missing))} not run)" if missing else ""
        out.append((f"{modality} S{winner} is the best {modality} strategy",
                    _verdict(best is not None and best["cell"] == f"{modality} S{winner}"),
                    f"mean test accuracy: {ran}{note}"))

    plain = {k: c for k, c in heads.items() if not variant_of(k)}   # the paper's protocol: no cross-fitting
    strategy_best = {}
    for s in operator_strategies():
        mine = [c for k, c in plain.items() if k.startswith(f"{s}-")]
        if mine:
            strategy_best[s] = max(mine, key=lambda c: c["accuracy_mean"])
    top = max(strategy_best.values(), key=lambda c: c["accuracy_mean"]) if strategy_best else None
    out.append(("1-A is the best multimodal strategy",
                _verdict(None if top is None else top["cell"].startswith("1A-")),
                "best operator of each strategy: " + ", ".join(acc(c) for c in strategy_best.values())))
    t = {s: np.mean([c["train_seconds_mean"] for k, c in plain.items() if k.startswith(f"{s}-")])
         for s in ("1A", "1B") if any(k.startswith(f"{s}-") for k in plain)}
    ratio = t["1B"] / t["1A"] if len(t) == 2 and t["1A"] > 0 else None
    low, high = SPEED_RATIO_RANGE
    out.append(("1-A trains about twice as fast as 1-B",
                _verdict(None if ratio is None else low <= ratio <= high),
                "not measured" if ratio is None else
                f"mean training time per head over all operators: 1-A {t['1A']:.3f} s, 1-B {t['1B']:.3f} s; "
                f"1-B / 1-A = {ratio:.2f} (HELD when {low} <= ratio <= {high})"))

    per_fusion = {}
    for k, c in plain.items():
        if k.split("-")[0] in cached_strategies():
            per_fusion.setdefault(k.split("-", 1)[1], []).append(c["accuracy_mean"])
    means = {f: float(np.mean(v)) for f, v in per_fusion.items()}
    winner = max(means, key=means.get) if means else None
    out.append(("concatenation is the best fusion operator", _verdict(None if winner is None else winner == "concat"),
                "mean test accuracy over 1-A, 1-B, 2-A, 2-B: " +
                ", ".join(f"{f} {100 * v:.2f} %" for f, v in sorted(means.items(), key=lambda x: -x[1]))))

    multi = best_multimodal(heads, choice_manifest=choice_manifest)
    for modality, label in (("text", "half"), ("image", "a seventh")):
        uni = best_module(modules, modality)
        target = PAPER_ERROR_RATIOS[modality]
        if multi is None or uni is None or uni["accuracy_mean"] >= 1:
            out.append((f"multimodal error is about {label} of {modality}-only's", _verdict(None), "not measured"))
            continue
        e_multi, e_uni = 1 - multi["accuracy_mean"], 1 - uni["accuracy_mean"]
        r = e_multi / e_uni
        out.append((f"multimodal error is about {label} of {modality}-only's",
                    _verdict(target / RATIO_TOLERANCE <= r <= target * RATIO_TOLERANCE),
                    f"error {100 * e_multi:.2f} % ({multi['cell']}) / {100 * e_uni:.2f} % ({uni['cell']}) = {r:.3f}; "
                    f"paper {target:.3f}; HELD within a factor {RATIO_TOLERANCE} of it"))
    return out


def differences(plan: dict, modules: dict) -> list[str]:
    """Markdown bullets: how this run differs from the paper (read from the plan, the store and the summaries)."""
    from embedstore.store import FeatureStore

    s, lines = plan["settings"], []
    with FeatureStore(plan["manifests"][0]["store"]) as store:
        for modality in ("image", "text"):
            p = store.feature_sets[store.find(modality, "pooled")].provenance
            size = f" at {p['preprocessing']['image_size']} px" if modality == "image" else ""
            same = "as in the paper" if p["backbone"] == PAPER_BACKBONES[modality] else \
                f"the paper used {PAPER_BACKBONES[modality]}"
            lines.append(f"- {modality} backbone: **{p['backbone']}**{size}, weights `{p['weights_id']}` ({same}).")
    photos = plan.get("catalog_images", {})
    sizes = ", ".join(f"{k} px ({n})" for k, n in sorted(photos.get("sizes", {}).items(), key=lambda x: -x[1]))
    how = (f"this run pastes each whole photo, its longer side scaled to {s['image_size']} px, on a white square "
           f"(--image-resize pad; the paper resizes and center-crops)" if s.get("image_resize") == "pad" else
           f"the protocol resizes them to {round(s['image_size'] * 256 / 224)} and center-crops {s['image_size']} px")
    lines.append(f"- Catalog photos (width x height, count in a sample of {photos.get('sampled', 0)}): "
                 f"{sizes or 'none readable'}; {how}, so small photos are upscaled.")
    image_s3 = modules.get("image S3")
    if not s["image_s3"]:
        lines.append("- Image S3: skipped (--no-image-s3; an epoch takes about 6-8 min on 2 idle CPU cores, and it needs tens of epochs).")
    elif image_s3:
        lines.append(f"- Image S3: {len(s['image_s3_seeds'])} seed(s), at most {s['image_s3_epochs']} epochs "
                     f"(mean {image_s3['epochs_mean']:.1f} run).")
    text_s3 = modules.get("text S3")
    if text_s3:
        lines.append(f"- Text S3 training reduced: {len(s['text_s3_seeds'])} seed(s) (S1/S2 and heads: "
                     f"{len(s['seeds'])}), at most {s['text_s3_epochs']} epochs (mean {text_s3['epochs_mean']:.1f} "
                     "run, early stopping on validation accuracy).")
    image_pair, text_pair = s["pair"]
    lines.append(f"- 1-A/1-B fuse image S{image_pair} + text S{text_pair} modules; head seed s uses the modules of "
                 f"seed s where one was trained, else the first seed's (S3 trains fewer seeds).")
    if s.get("cross_fit"):
        lines.append(f"- Cross-fitting (not in the paper): the pair's modules also trained with {s['cross_fit']} "
                     "folds, each training row's features from the fold module that never saw it; their 1-A, 1-B "
                     "and LFM runs are the \"(cross-fit)\" rows.")
    lines.append("- 3-A/3-B (end to end): " + (f"run with {', '.join(s['end_to_end_fusions'])}, at most "
                                               f"{s['end_to_end_epochs']} epochs" if s["end_to_end"]
                                               else "skipped (--no-end-to-end)") + ".")
    if s["end_to_end"] and s.get("image_resize") == "pad":   # heads/end_to_end.py has no resize mode of its own
        lines.append("- 3-A/3-B center-crop their images as the paper does: --image-resize pad reaches the store "
                     "and the modules only.")
    lines.append(f"- Spread: {len(plan['manifests'])} manifests (draws of the catalog) x seeds {s['seeds']}.")
    return lines

