"""The sweep's grid: which cells (strategy x backbone pair x fusion operator, + unimodal baselines) a store allows.

Defaults come from the registries, never from lists written here: every registered fusion operator, every
strategy whose features the store holds, every (image source, text source) pair it holds. A store may hold
several backbones per modality (`embed extract --add`) and several fine-tuned modules; each pair of sources is
one more grid dimension. Cells of a sweep with one pair keep their plain names ("2A-concat"); with several, the
pair is part of the name ("2A-concat@efficientnet_lite0+all-MiniLM-L6-v2") and of the head's folder.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from heads.fusion import list_fusions
from heads.inputs import MODULE_HINT, POOLED_HINT, inputs_for, inputs_with_shared_rows
from heads.strategies import get_strategy, list_strategies


@dataclass(frozen=True)
class Cell:
    strategy: str
    fusion: str | None
    feature_sets: tuple[str, ...]   # what the head reads, image first: 2 sets, or 1 for a baseline
    row_sets: tuple[str, ...]       # the sets whose ok rows it trains on (a baseline shares 2-A's rows)
    pair: tuple[str | None, str | None]   # (image source, text source); a baseline has one of them
    named_pair: bool = False        # the sweep holds several pairs: put the pair in the cell's name

    @property
    def base_name(self) -> str:
        return self.strategy if self.fusion is None else f"{self.strategy}-{self.fusion}"

    @property
    def pair_name(self) -> str:
        return "+".join(s for s in self.pair if s)

    @property
    def name(self) -> str:
        return f"{self.base_name}@{self.pair_name}" if self.named_pair else self.base_name


def sources(store, modality: str, layer: str, chosen: tuple[str, ...] = ()) -> list[str]:
    """The store's sources of `modality` with a `layer` feature set, filtered by `chosen` (a source name, or
    the backbone named in a set's provenance, so `--image-source efficientnet_lite0` also picks that backbone's
    fine-tuned modules), in sorted order."""
    found = []
    for info in store.feature_sets.values():
        if info.modality != modality or info.layer != layer:
            continue
        if chosen and info.source not in chosen and info.provenance.get("backbone") not in chosen:
            continue
        found.append(info.source)
    return sorted(set(found))


def _check_chosen(store, modality: str, chosen: tuple[str, ...]) -> None:
    held = sorted({i.source for i in store.feature_sets.values() if i.modality == modality})
    backbones = {i.provenance.get("backbone") for i in store.feature_sets.values() if i.modality == modality}
    unknown = [c for c in chosen if c not in held and c not in backbones]
    if unknown:
        raise ValueError(f"--{modality}-source {', '.join(unknown)}: {store.path} holds no such {modality} source "
                         f"(it holds {', '.join(held) or 'none'})")


def strategy_pairs(store, strategy: str, image_sources=(), text_sources=()) -> list[tuple[str | None, str | None]]:
    """Every (image source, text source) pair the store holds for a strategy's layer; [] if none."""
    declared = get_strategy(strategy)
    image = sources(store, "image", declared.layer, tuple(image_sources))
    text = sources(store, "text", declared.layer, tuple(text_sources))
    if declared.modalities == ("image",):
        return [(s, None) for s in image]
    if declared.modalities == ("text",):
        return [(None, s) for s in text]
    return list(itertools.product(image, text))


def missing_message(store, strategy: str) -> str:
    declared = get_strategy(strategy)
    layer, modalities = declared.layer, declared.modalities
    hint = MODULE_HINT if layer in ("dense", "classifier") else POOLED_HINT
    lacking = [m for m in modalities if not sources(store, m, layer)] or list(modalities)
    needs = " and ".join(f"{m} '{layer}'" for m in lacking)
    return (f"strategy {strategy} needs {needs} features, which {store.path} lacks (it holds "
            f"{', '.join(sorted(store.feature_sets)) or 'nothing'}); {hint}")


def build_grid(store, *, strategies: tuple[str, ...] | None, fusions: tuple[str, ...] | None, baselines: bool,
               image_sources: tuple[str, ...] = (), text_sources: tuple[str, ...] = ()
               ) -> tuple[list[Cell], list[str]]:
    """(cells in grid order, notes on strategies skipped). `strategies=None`: every cached strategy the store's
    features allow, each skipped one named in a note with the command that enables it; named strategies the
    store cannot serve are refused (ValueError). `fusions=None`: every registered operator."""
    _check_chosen(store, "image", tuple(image_sources))
    _check_chosen(store, "text", tuple(text_sources))
    fusions = tuple(list_fusions()) if fusions is None else tuple(fusions)
    explicit = strategies is not None
    heads = list_strategies(trainer="head")
    default = [s for s in list_strategies(trainer="head", multimodal=True) if get_strategy(s).in_default_grid]
    wanted = [s for s in (strategies if explicit else default) if s in heads]
    if baselines:
        wanted += [b for b in list_strategies(trainer="head", multimodal=False) if b not in wanted]
    notes, plan = [], []
    for strategy in wanted:
        pairs = strategy_pairs(store, strategy, image_sources, text_sources)
        if not pairs:
            if explicit and strategy in strategies:
                raise ValueError(missing_message(store, strategy))
            notes.append(f"skipped {strategy}: {missing_message(store, strategy)}")
            continue
        plan.append((strategy, pairs))
    named = any(len(pairs) > 1 for _, pairs in plan)   # several backbones (or modules) of one kind
    cells = []
    for strategy, pairs in plan:
        for image, text in pairs:
            if not get_strategy(strategy).multimodal:
                cells.append(_baseline_cell(store, strategy, image or text, named))
                continue
            names = inputs_for(store, strategy, image, text)   # checks that the pair can be fused
            for fusion in fusions:
                cells.append(Cell(strategy, fusion, tuple(names), tuple(names), (image, text), named))
    return cells, notes


def _baseline_cell(store, strategy: str, source: str, named: bool) -> Cell:
    """A unimodal model reads one set, on the rows of the strategy it declares `rows_of` (the baselines: 2-A's):
    those ok in the other modality's first source of that layer too, when the store has one (so baselines and
    2-A are scored on the same test items)."""
    declared = get_strategy(strategy)
    modality = declared.modalities[0]
    other = "text" if modality == "image" else "image"
    partners = sources(store, other, get_strategy(declared.rows_of).layer) if declared.rows_of else []
    pair = (source, None) if modality == "image" else (None, source)
    named_sources = {modality: source, other: partners[0] if partners else None}
    rows = inputs_with_shared_rows(store, strategy, named_sources["image"], named_sources["text"])
    return Cell(strategy, None, (f"{modality}/{source}/{declared.layer}",), tuple(rows), pair, named)


def decision_cells(store, *, strategies: tuple[str, ...] | None, baselines: bool, image_sources: tuple[str, ...] = (),
                   text_sources: tuple[str, ...] = ()) -> tuple[list[Cell], list[str]]:
    """Cells of the scikit-learn models (heads/decision.py) over pooled features, on 2-A's rows: LF, ST and
    LR-concat per (image, text) pair, LR-image / LR-text per source. `strategies=None`: each one the store allows
    (LR-image / LR-text only with `baselines`), the rest named in a note; a named one it cannot serve: ValueError."""
    explicit = strategies is not None
    linear = list_strategies(trainer="linear")   # in registration order: cheapest first
    wanted = [s for s in linear if (s in strategies if explicit else get_strategy(s).in_default_grid and
                                    (baselines or get_strategy(s).multimodal))]
    layers = sorted({get_strategy(s).layer for s in linear})
    held = {layer: {"image": sources(store, "image", layer, tuple(image_sources)),
                    "text": sources(store, "text", layer, tuple(text_sources))} for layer in layers}
    named = any(len(v) > 1 for by_layer in held.values() for v in by_layer.values())
    cells, notes = [], []
    for strategy in wanted:
        declared = get_strategy(strategy)
        modalities, layer = declared.modalities, declared.layer
        image, text = held[layer]["image"], held[layer]["text"]
        lacking = [m for m in modalities if not {"image": image, "text": text}[m]]
        if lacking:
            hint = POOLED_HINT if layer == "pooled" else MODULE_HINT
            message = (f"strategy {strategy} needs {' and '.join(lacking)} '{layer}' features, which {store.path} "
                       f"lacks (it holds {', '.join(sorted(store.feature_sets)) or 'nothing'}); {hint}")
            if explicit:
                raise ValueError(message)
            notes.append(f"skipped {strategy}: {message}")
            continue
        if len(modalities) == 2:
            for pair in itertools.product(image, text):
                names = tuple(inputs_with_shared_rows(store, declared.rows_of or strategy, *pair))
                cells.append(Cell(strategy, None, names, names, pair, named))
        else:   # one modality, on the rows of its pair with the other modality's first source (as the baselines)
            for source in (image if modalities == ("image",) else text):
                cells.append(_baseline_cell(store, strategy, source, named))
    return cells, notes


def without_sets_being_written(store, cells: list[Cell], decisions: list[Cell], image_sources=(), text_sources=()
                               ) -> tuple[list[Cell], list[Cell], list[str]]:
    """Cells reading a feature set that is not complete yet (`embed extract --add` writing it beside this sweep, or
    stopped before the end) are skipped, with a note per set naming it and how to sweep the others; the rest are
    swept, and a rerun once the set is complete adds its cells. Refused (ValueError) when a source named with
    --image-source/--text-source is the one being written, or when nothing else is left to sweep."""
    sets = store.feature_sets
    writing = sorted(n for n, info in sets.items() if not info.complete)
    if not writing:
        return cells, decisions, []

    def reads(cell: Cell) -> set:
        return set(cell.feature_sets) | set(cell.row_sets)

    def why(names: list[str]) -> str:
        return (f"feature set {', '.join(names)} of {store.path} {'is' if len(names) == 1 else 'are'} still being "
                "written (`embed extract --add` is writing it, or was stopped before the end: rerun it, it resumes)")

    chosen = {"image": tuple(image_sources), "text": tuple(text_sources)}
    for name in writing:   # a source asked for by name (not by backbone) that is being written: nothing to skip to
        info = sets[name]
        if info.source in chosen.get(info.modality, ()):
            raise ValueError(f"{why([name])}; sweep --{info.modality}-source {info.source} once it is complete")
    keep = [c for c in cells if not reads(c) & set(writing)]
    keep_decisions = [c for c in decisions if not reads(c) & set(writing)]
    if (cells or decisions) and not (keep or keep_decisions):
        raise ValueError(f"{why(writing)}, and every cell of this sweep reads it; sweep once it is complete")
    notes = []
    for name in writing:
        skipped = [c for c in cells + decisions if name in reads(c)]
        if skipped:
            modality, strategies = sets[name].modality, sorted({c.strategy for c in skipped})
            notes.append(f"skipped {len(skipped)} cell(s) of {', '.join(strategies)} reading {name}: {why([name])}; "
                         f"this sweep trains the other feature sets (pick them with --{modality}-source NAME), a "
                         "rerun once it is complete adds these cells")
    return keep, keep_decisions, notes
