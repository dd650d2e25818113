"""Which feature sets of a store a strategy reads: the one place this is decided (the sweep and notebooks).

    names = heads.inputs_for(store, "2A")                      # ["image/<source>/pooled", "text/<source>/pooled"]
    names = heads.inputs_for(store, "1A", image_source="module-ab12cd34ef56")

1-A reads the modules' `dense` layer, 1-B their `classifier` layer, 2-A/2-B and the baselines the backbones'
`pooled` features. Where a store holds several sources (backbones or modules) of a modality at that layer,
the caller names one; otherwise the only one is used.
"""
from __future__ import annotations

from heads.strategies import get_strategy, list_strategies

MODULE_HINT = ("`embed extract MANIFEST --store STORE --image-module DIR --text-module DIR` writes the "
               "fine-tuned modules' (from `embed finetune`) 'dense' and 'classifier' features")
POOLED_HINT = "`embed extract MANIFEST --store STORE` writes the backbones' 'pooled' features"


def inputs_for(store, strategy: str, image_source: str | None = None, text_source: str | None = None) -> list[str]:
    """The feature set names (image first) that `strategy` reads from `store`, or a one-line ValueError naming
    what is missing or ambiguous and how to fix it."""
    over_store = [s for s in list_strategies() if get_strategy(s).over_store]
    if strategy not in over_store:
        raise ValueError(f"unknown strategy {strategy!r} for store features; use one of {', '.join(over_store)}"
                         f" ({', '.join(list_strategies(trainer='end-to-end'))} train end to end on the raw catalog)")
    declared = get_strategy(strategy)
    layer = declared.layer
    hint = MODULE_HINT if layer in ("dense", "classifier") else POOLED_HINT
    chosen = {"image": image_source, "text": text_source}
    names, missing = [], []
    for modality in declared.modalities:
        name = _one_set(store, modality, layer, chosen[modality])
        if name is None:
            missing.append(f"{modality} '{layer}'")
        else:
            names.append(name)
    if missing:
        raise ValueError(f"strategy {strategy} needs {' and '.join(missing)} features, which {store.path} lacks "
                         f"(it holds {', '.join(sorted(store.feature_sets)) or 'nothing'}); {hint}")
    sets = store.feature_sets
    dims = [sets[n].dim for n in names]
    if layer == "classifier" and any(d != len(store.classes) for d in dims):
        raise ValueError(f"strategy {strategy} fuses classifier outputs, but {', '.join(names)} have {dims} outputs and "
                         f"the store has {len(store.classes)} classes; {hint} with modules trained on these classes")
    if declared.fused and not declared.branch and dims[0] != dims[1]:
        raise ValueError(f"strategy {strategy} fuses {names[0]} ({dims[0]}-d) with {names[1]} ({dims[1]}-d) "
                         f"directly; their sizes must match; {hint}")
    return names


def _one_set(store, modality: str, layer: str, source: str | None) -> str | None:
    """The set of this modality and layer (from `source` if named); None when there is none at all."""
    candidates = sorted(info.source for info in store.feature_sets.values()
                        if info.modality == modality and info.layer == layer)
    if source is not None:
        if source not in candidates:
            raise ValueError(f"{store.path} has no {modality} '{layer}' features from source {source!r}; its "
                             f"{modality} '{layer}' sources: {', '.join(candidates) or 'none'}")
        return f"{modality}/{source}/{layer}"
    if len(candidates) > 1:
        raise ValueError(f"{store.path} holds {modality} '{layer}' features of several sources "
                         f"({', '.join(candidates)}); choose one with {modality}_source=... "
                         f"(`heads sweep --{modality}-source`)")
    return f"{modality}/{candidates[0]}/{layer}" if candidates else None


def inputs_with_shared_rows(store, strategy: str, image_source: str | None = None,
                            text_source: str | None = None) -> list[str]:
    """What the sweep loads: inputs_for, plus for a baseline the other modality's pooled set where the store
    has one, so the baselines train and test on the same rows as 2-A (a store of one modality still gets its
    baseline). The baseline's own set is the image one (index 0) or the text one (the last)."""
    names = inputs_for(store, strategy, image_source, text_source)
    declared = get_strategy(strategy)
    if declared.multimodal or declared.rows_of is None:
        return names
    other = "text" if declared.modalities == ("image",) else "image"
    try:
        extra = _one_set(store, other, get_strategy(declared.rows_of).layer,
                         text_source if other == "text" else image_source)
    except ValueError:  # ambiguous or a named source that is absent: the baseline keeps its own rows
        extra = None
    if extra is None:
        return names
    return names + [extra] if other == "text" else [extra] + names
