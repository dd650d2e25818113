"""Fusion heads for strategies 1-A, 1-B, 2-A, 2-B and the unimodal baselines (DESIGN.md, "The six multimodal
fine-tuning strategies").

A head is described completely by a `HeadConfig`. `StackedHead` holds no weights: it knows the parameter
shapes of one head and runs G heads at once on a dict of stacked weights (name -> (G, ...)), so the trainer
can batch a grid of heads and also slice, compact and save them. `FusionHead` (heads/estimator.py) is the
scikit-learn-style estimator around ONE trained head.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch

from heads.fusion import create_fusion, list_fusions
from heads.strategies import get_strategy, list_strategies


@dataclass(frozen=True)
class HeadConfig:
    strategy: str                 # a registered strategy trained as a head (heads/strategies.py): "2A", "image", ...
    fusion: str | None            # a registered fusion operator; None for the unimodal baselines
    input_dims: tuple[int, ...]   # one per modality of the strategy, image first
    num_classes: int
    middle_dim: int = 500         # the new per-modality layer of 2-A / 2-B / baselines
    fusion_dim: int = 250         # the fusion layer: fused_dim -> 250
    dropout: float = 0.3

    def __post_init__(self):
        object.__setattr__(self, "input_dims", tuple(int(d) for d in self.input_dims))
        heads = list_strategies(trainer="head")
        if self.strategy not in heads:
            raise ValueError(f"unknown strategy {self.strategy!r} for a head; known: {', '.join(heads)}")
        strategy = get_strategy(self.strategy)
        if not strategy.fused:
            if self.fusion is not None:
                raise ValueError(f"the unimodal baseline {self.strategy!r} takes no fusion operator")
        elif self.fusion not in list_fusions():
            raise ValueError(f"unknown fusion operator {self.fusion!r}; registered: {', '.join(list_fusions())}")
        if len(self.input_dims) != len(strategy.modalities):
            raise ValueError(f"strategy {self.strategy} needs {len(strategy.modalities)} "
                             f"input dims, got {self.input_dims}")
        if strategy.fused and not strategy.branch and self.input_dims[0] != self.input_dims[1]:
            raise ValueError(f"strategy {self.strategy} fuses the inputs directly, so their sizes must match: "
                             f"image {self.input_dims[0]} vs text {self.input_dims[1]}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def cell(self) -> str:
        """The grid cell this head belongs to: "2A-gated", or "image" / "text" for a baseline."""
        return self.strategy if self.fusion is None else f"{self.strategy}-{self.fusion}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_dims"] = list(self.input_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        return cls(**{**d, "input_dims": tuple(d["input_dims"])})


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """G independent linear layers in one batched matmul: x (G, B, in) @ weight (G, in, out) -> (G, B, out).
    Weights are stored (in, out), the transpose of nn.Linear's, so their gradients come out contiguous (the
    fused AdamW kernel needs that) without a copy."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight)


class StackedHead:
    """The architecture of one head, run on stacked weights of G heads."""

    def __init__(self, config: HeadConfig):
        self.config = config
        c = config
        strategy = get_strategy(c.strategy)
        self.modalities, self.branch = strategy.modalities, strategy.branch
        # (name, shape, fan_in) in a fixed order: the order each head's generator draws its init
        self._linears: list[tuple[str, int, int]] = []   # (prefix, out, in)
        self._dropout_widths: list[int] = []
        branch_dim = c.input_dims[0]
        if self.branch:   # per modality: [middle D -> 500, ReLU, dropout] [classifier -> C]
            widths = {"middle": c.middle_dim, "classifier": c.num_classes}
            for m, d in zip(self.modalities, c.input_dims):
                width = d
                for layer in self.branch:
                    self._linears.append((f"{m}_{layer}", widths[layer], width))
                    if layer == "middle":
                        self._dropout_widths.append(c.middle_dim)
                    width = widths[layer]
            branch_dim = widths[self.branch[-1]]
        self.fusion = None if c.fusion is None else create_fusion(c.fusion, branch_dim)
        fused_dim = branch_dim if self.fusion is None else self.fusion.output_dim
        self._linears.append(("fusion_layer", c.fusion_dim, fused_dim))
        self._dropout_widths.append(c.fusion_dim)
        self._linears.append(("classifier", c.num_classes, c.fusion_dim))

    @property
    def dropout_width(self) -> int:
        """Dropout units per example, all layers together: one uniform draw per unit per step."""
        return sum(self._dropout_widths)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for prefix, out, inp in self._linears[:-2]:
            shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (inp, out), (out,)
        if self.fusion is not None:
            shapes.update({f"fusion.{k}": v for k, v in self.fusion.param_shapes().items()})
        for prefix, out, inp in self._linears[-2:]:
            shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (inp, out), (out,)
        return shapes

    def forward_flops_per_row(self) -> int:
        """Matmul FLOPs of one head's forward pass over one example (2 per multiply-add); a training step costs
        about 3x this (forward, input gradient, weight gradient). Elementwise work is not counted."""
        linears = sum(2 * inp * out for _, out, inp in self._linears)
        return linears + (0 if self.fusion is None else self.fusion.flops_per_row())

    def num_parameters(self) -> int:
        """Trainable parameters of ONE head."""
        return sum(math.prod(s) for s in self.param_shapes().values())

    def init_params(self, generators: list[torch.Generator]) -> dict[str, torch.Tensor]:
        """Stacked weights (G, ...), head g drawn from generators[g] only: the same head gets the same init
        whether it trains alone or in a stack."""
        fan_in = {f"{p}.{k}": inp for p, _, inp in self._linears for k in ("weight", "bias")}
        per_head = []
        for g in generators:
            w = {}
            for name, shape in self.param_shapes().items():
                if name.startswith("fusion."):
                    w[name] = self.fusion.init_param(name[7:], shape, g)
                else:  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                    w[name] = (torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(fan_in[name])
            per_head.append(w)
        return {name: torch.stack([w[name] for w in per_head]) for name in self.param_shapes()}

    def forward(self, params: dict[str, torch.Tensor], inputs: list[torch.Tensor],
                dropout_masks: torch.Tensor | None = None) -> torch.Tensor:
        """inputs: one (G, B, D_m) tensor per modality; dropout_masks (G, B, dropout_width) already scaled by
        1/(1-p), or None for evaluation. Returns logits (G, B, C)."""
        # Python ints, not a numpy array: torch.compile turns numpy into tensor reads, and slicing by one breaks the
        # graph (the whole forward then ran eagerly); tests/test_heads_compile.py keeps the step one graph
        offsets = [0, *itertools.accumulate(self._dropout_widths)]

        def dropout(x, i):
            return x if dropout_masks is None else x * dropout_masks[:, :, offsets[i]:offsets[i + 1]]

        p = params
        feats = list(inputs)
        drop = 0   # the dropout layer's index: one per middle layer, then the fusion layer's
        for i, m in enumerate(self.modalities if self.branch else ()):
            h = feats[i]
            for layer in self.branch:
                if layer == "middle":   # (G, B, D) -> (G, B, 500)
                    h = dropout(torch.relu(_linear(h, p[f"{m}_middle.weight"], p[f"{m}_middle.bias"])), drop)
                    drop += 1
                else:                   # classifier: (G, B, 500) -> (G, B, C)
                    h = _linear(h, p[f"{m}_classifier.weight"], p[f"{m}_classifier.bias"])
            feats[i] = h
        fused = self.fuse(p, feats)
        h = torch.relu(_linear(fused, p["fusion_layer.weight"], p["fusion_layer.bias"]))  # (G, B, 250)
        h = dropout(h, len(self._dropout_widths) - 1)
        return _linear(h, p["classifier.weight"], p["classifier.bias"])  # (G, B, C)

    def fuse(self, params: dict[str, torch.Tensor], feats: list[torch.Tensor]) -> torch.Tensor:
        """The fusion operator on the per-modality features (G, B, d) each -> (G, B, fused_dim)."""
        if self.fusion is None:
            return feats[0]
        return self.fusion.forward({k[7:]: v for k, v in params.items() if k.startswith("fusion.")}, *feats)

    def shape_key(self) -> tuple:
        """What heads must share to train in one stacked step (heads/groups.py): the strategy (the forward's
        structure), every parameter shape, the dropout layout and rate. Add, average and product of one
        strategy share it (their fused width is the branch width); concat doubles the fusion layer's input and
        gated has gate weights, so each of those only stacks with itself."""
        c = self.config
        return (c.strategy, tuple(self.param_shapes().items()), tuple(self._dropout_widths), c.dropout)


def predict_logits(model: StackedHead, params: dict[str, torch.Tensor], inputs: list[torch.Tensor],
                   *, chunk: int = 4096) -> torch.Tensor:
    """Logits (G, n, C) of G heads over n shared examples (inputs: (n, D_m) each), in chunks."""
    G = next(iter(params.values())).shape[0]
    out = []
    with torch.no_grad():
        for s in range(0, inputs[0].shape[0], chunk):
            xs = [x[s:s + chunk].unsqueeze(0).expand(G, -1, -1) for x in inputs]  # (G, b, D), no copy
            out.append(model.forward(params, xs))
    return torch.cat(out, dim=1)
