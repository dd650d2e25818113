"""Every strategy, declared once: what it reads, how it trains, how it is reported.

A strategy is a `Strategy` record in one registry (like the fusion operators' in heads/fusion.py). Everything
else derives from it: the sweep's grid (heads/grid.py), the head architecture (heads/models.py), the
decision-level models (heads/decision.py), the end-to-end models (heads/end_to_end.py), what a saved model
reads when it predicts (pipelines/predict.py), which members are multimodal in an ensemble, and the reports' and
paper targets' groupings and labels. Adding a strategy is one `register_strategy(Strategy(...))` call, from
this file or from a user's own module; `tests/test_strategy_registry.py` registers one from outside and sweeps,
saves, reports, ensembles and predicts it.

How a strategy trains is its `trainer`:
- "head": a stacked MLP head over the store's features (heads/train.py): per modality the `branch` layers
  ("middle": D -> 500, ReLU, dropout; "classifier": -> C), then the fusion operator (if `fused`), then
  fused -> 250 -> ReLU -> dropout -> C.
- "linear": a decision-level model over the store's features (heads/decision.py), fit with scikit-learn and
  combined as `combine` says: "single" (one modality's regression), "concat" (one regression over both
  modalities' columns), "late" (weighted log-probabilities of the per-modality regressions, the weight chosen on
  validation), "stack" (a regression over their out-of-fold log-probabilities), "late-logits" (weighted
  log-softmax of the stored classifier outputs themselves: nothing fitted but the weight).
- "end-to-end": the whole model, backbones included, on the raw catalog (heads/end_to_end.py), with the same
  `branch` meaning as a head's (after each backbone's pooled feature).

The DESIGN.md names: 1-A/1-B fuse the fine-tuned modules' dense / classifier outputs (no new branch layers),
2-A/2-B train new branch layers over the frozen backbones' pooled features, 3-A/3-B train everything.
"""
from __future__ import annotations

from dataclasses import dataclass

TRAINERS = ("head", "linear", "end-to-end")
BRANCH_LAYERS = ("middle", "classifier")
COMBINES = ("single", "concat", "late", "stack", "late-logits")
LAYERS = ("pooled", "dense", "classifier")


@dataclass(frozen=True)
class Strategy:
    name: str                            # the name on the command line, in rows and in folders: "2A", "LF"
    trainer: str                         # "head" | "linear" | "end-to-end" (module docstring)
    modalities: tuple[str, ...]          # ("image", "text"), or one of them; image first (the operators' `a`)
    layer: str | None                    # the store layer it reads; None: the raw catalog (end to end)
    label: str                           # what it is, in a report's words
    fused: bool = False                  # takes a fusion operator: one cell per registered operator
    branch: tuple[str, ...] = ()         # head / end-to-end: per-modality layers before fusion
    combine: str | None = None           # linear: how its regressions combine
    rows_of: str | None = None           # train on the rows of this strategy's cells (so all score the same items)
    in_default_grid: bool = True         # `heads sweep` with no --strategies trains it (when the store allows)
    seed_dependent: bool = True          # False: every seed gives the same model (the rows say so)
    paper_name: str | None = None        # the paper's name for it ("1-A"), where it has one
    # a simple reference model, shown beside the best multimodal model (Table 7): the unimodal heads, the regressions
    reference: bool = False
    fused_by: str | None = None          # how a multimodal strategy without an operator fuses (Table 5's "best fusion")

    def __post_init__(self):
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "branch", tuple(self.branch))
        if self.trainer not in TRAINERS:
            raise ValueError(f"strategy {self.name}: trainer must be one of {', '.join(TRAINERS)}, got {self.trainer!r}")
        if not self.modalities or any(m not in ("image", "text") for m in self.modalities) or \
                self.modalities not in (("image",), ("text",), ("image", "text")):
            raise ValueError(f"strategy {self.name}: modalities must be ('image',), ('text',) or ('image', 'text'), "
                             f"got {self.modalities}")
        if (self.layer is None) != (self.trainer == "end-to-end"):
            raise ValueError(f"strategy {self.name}: a {self.trainer} strategy "
                             f"{'reads the raw catalog (layer=None)' if self.trainer == 'end-to-end' else 'reads a store layer'}")
        if self.layer is not None and self.layer not in LAYERS:
            raise ValueError(f"strategy {self.name}: layer must be one of {', '.join(LAYERS)}, got {self.layer!r}")
        if any(b not in BRANCH_LAYERS for b in self.branch) or len(set(self.branch)) != len(self.branch):
            raise ValueError(f"strategy {self.name}: branch layers must be distinct names of {', '.join(BRANCH_LAYERS)}")
        if self.fused and not self.multimodal:
            raise ValueError(f"strategy {self.name}: a fusion operator needs two modalities")
        if (self.combine is not None) != (self.trainer == "linear") or \
                (self.combine is not None and self.combine not in COMBINES):
            raise ValueError(f"strategy {self.name}: a linear strategy names how it combines ({', '.join(COMBINES)}); "
                             "no other strategy does")
        if self.trainer == "head" and not self.multimodal and not self.branch:
            raise ValueError(f"strategy {self.name}: a unimodal head needs a branch layer")

    @property
    def multimodal(self) -> bool:
        return len(self.modalities) == 2

    @property
    def over_store(self) -> bool:
        """Trains over the store's cached features (not the raw catalog)."""
        return self.trainer != "end-to-end"


_REGISTRY: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy, *, replace: bool = False) -> Strategy:
    """Add a strategy to the registry (its registration order is the sweeps' and reports' order)."""
    if strategy.name in _REGISTRY and not replace:
        raise ValueError(f"strategy {strategy.name!r} is already registered; pass replace=True to redefine it")
    if strategy.rows_of is not None and strategy.rows_of not in _REGISTRY:
        raise ValueError(f"strategy {strategy.name}: rows_of names {strategy.rows_of!r}, which is not registered")
    _REGISTRY[strategy.name] = strategy
    return strategy


def unregister_strategy(name: str) -> None:
    """Remove a strategy (tests that register their own)."""
    _REGISTRY.pop(name, None)


def registered() -> tuple[Strategy, ...]:
    """Every registered strategy, in order: what a spawned worker process needs to know the same ones
    (`install` there), since a strategy registered at run time is not registered again by importing this module."""
    return tuple(_REGISTRY.values())


def install(strategies: tuple[Strategy, ...]) -> None:
    """Register each of `strategies` that is not registered yet (in a worker: the parent's run-time ones)."""
    for strategy in strategies:
        if strategy.name not in _REGISTRY:
            register_strategy(strategy)


def get_strategy(name: str) -> Strategy:
    """The registered strategy of that name, or a one-line ValueError listing the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(_REGISTRY)}") from None


def list_strategies(*, trainer: str | None = None, multimodal: bool | None = None,
                    fused: bool | None = None) -> tuple[str, ...]:
    """Registered names in registration order, filtered by trainer / modality count / whether fused."""
    return tuple(s.name for s in _REGISTRY.values()
                 if (trainer is None or s.trainer == trainer)
                 and (multimodal is None or s.multimodal == multimodal)
                 and (fused is None or s.fused == fused))


def strategies_reading(*layers: str | None, trainer: str | None = None, fused: bool | None = None) -> tuple[str, ...]:
    """Registered names that read one of `layers` (None: the raw catalog), in registration order."""
    return tuple(s for s in list_strategies(trainer=trainer, fused=fused) if _REGISTRY[s].layer in layers)


def report_order() -> tuple[str, ...]:
    """The order reports list strategies in: multimodal heads, decision-level models, unimodal heads, end to end."""
    return (list_strategies(trainer="head", multimodal=True) + list_strategies(trainer="linear")
            + list_strategies(trainer="head", multimodal=False) + list_strategies(trainer="end-to-end"))


def is_multimodal(name: str) -> bool:
    """Both modalities; False for names not registered (e.g. "ensemble" is a report group, not a strategy)."""
    return name in _REGISTRY and _REGISTRY[name].multimodal


# ------------------------------------------------------------------------------------------ built-in strategies
# Order: the sweeps' and the reports' order. Heads over the store first, then the decision-level models (cheapest
# fit first: LR-image / LR-text's fits are shared by LF and ST, and ST's out-of-fold fits come last), then the
# end-to-end baseline.

register_strategy(Strategy(
    "1A", "head", ("image", "text"), "dense", fused=True, paper_name="1-A",
    label="fine-tuned modules frozen, fused at their 500-d middle layers"))
register_strategy(Strategy(
    "1B", "head", ("image", "text"), "classifier", fused=True, paper_name="1-B",
    label="fine-tuned modules frozen, fused at their classifier outputs"))
register_strategy(Strategy(
    "2A", "head", ("image", "text"), "pooled", fused=True, branch=("middle",), paper_name="2-A",
    label="frozen pretrained backbones, new 500-d middle layers fused"))
register_strategy(Strategy(
    "2B", "head", ("image", "text"), "pooled", fused=True, branch=("middle", "classifier"), paper_name="2-B",
    label="frozen pretrained backbones, new classifier layers fused"))
register_strategy(Strategy(
    "image", "head", ("image",), "pooled", branch=("middle",), rows_of="2A", reference=True,
    label="a head over the image backbone's pooled features"))
register_strategy(Strategy(
    "text", "head", ("text",), "pooled", branch=("middle",), rows_of="2A", reference=True,
    label="a head over the text backbone's pooled features"))

register_strategy(Strategy(
    "LFM", "linear", ("image", "text"), "classifier", combine="late-logits", rows_of="1B", seed_dependent=False,
    fused_by="late, modules' outputs (w on validation)",
    label="late fusion of the fine-tuned modules (weight on validation)"))
register_strategy(Strategy(
    "LR-image", "linear", ("image",), "pooled", combine="single", rows_of="2A", seed_dependent=False, reference=True,
    label="logistic regression on standardized pooled features"))
register_strategy(Strategy(
    "LR-text", "linear", ("text",), "pooled", combine="single", rows_of="2A", seed_dependent=False, reference=True,
    label="logistic regression on standardized pooled features"))
register_strategy(Strategy(
    "LF", "linear", ("image", "text"), "pooled", combine="late", rows_of="2A", seed_dependent=False,
    fused_by="late (w on validation)",
    label="late fusion of the logistic regressions (weight on validation)"))
register_strategy(Strategy(
    "LR-concat", "linear", ("image", "text"), "pooled", combine="concat", rows_of="2A", seed_dependent=False,
    reference=True, fused_by="one regression over both modalities' features",
    label="logistic regression on both modalities' standardized pooled features"))
register_strategy(Strategy(
    "ST", "linear", ("image", "text"), "pooled", combine="stack", rows_of="2A", fused_by="stacking (out-of-fold)",
    label="stacking over out-of-fold probabilities"))

register_strategy(Strategy(
    "3A", "end-to-end", ("image", "text"), None, fused=True, branch=("middle",), in_default_grid=False,
    paper_name="3-A", label="whole model trained end to end, fused at the 500-d middle layers"))
register_strategy(Strategy(
    "3B", "end-to-end", ("image", "text"), None, fused=True, branch=("middle", "classifier"),
    in_default_grid=False, paper_name="3-B", label="whole model trained end to end, fused at the classifier outputs"))
