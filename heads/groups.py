"""Cells of one shape in one training step: heads of several cells (operators, strategies, seeds) whose weights
have the same shapes train as ONE stack, so a step is a handful of batched matmuls for the whole group instead
of one set per cell (issue 13: 66 cells one after another left a GPU idle between small launches).

"Same shape" is `StackedHead.shape_key`: same strategy, every parameter shape, dropout layout and rate. On one
store that groups a strategy's add, average and product cells (their fused width is the branch width) with all
their seeds; concat (a wider fusion layer) and gated (gate weights) stack only their own seeds. Cells must also
read the same feature sets over the same rows (heads/dispatch.py groups tasks by that too).

Every layer runs as one batched matmul over all G heads of the group; each head's own fusion operator runs on
its slice of the stack. A head's randomness comes from its own generator (heads/train.py), so a head trained in
a group is bit-identical to the same head trained alone on the same device.
"""
from __future__ import annotations

import itertools

import torch

from heads.models import HeadConfig, StackedHead


class GroupHead(StackedHead):
    """G heads with one shape key, head g of config configs[g]; consecutive heads of one config form a segment."""

    def __init__(self, configs: list[HeadConfig]):
        if not configs:
            raise ValueError("a head group needs at least one head")
        super().__init__(configs[0])
        self.configs = list(configs)
        self._models = {c: StackedHead(c) for c in dict.fromkeys(self.configs)}   # one per distinct config
        keys = {m.shape_key() for m in self._models.values()}
        if len(keys) > 1:
            raise ValueError(f"heads of cells {', '.join(sorted({c.cell for c in self.configs}))} have different "
                             "shapes and cannot share one stacked step; group them by StackedHead.shape_key")
        self._segments = []   # (model, start, stop) over the stack's G dimension
        start = 0
        for config, run in itertools.groupby(self.configs):
            stop = start + len(list(run))
            self._segments.append((self._models[config], start, stop))
            start = stop

    def select(self, rows: list[int]) -> "GroupHead":
        """The group of the heads at `rows` (in that order): what is left when others stop."""
        return GroupHead([self.configs[i] for i in rows])

    def init_params(self, generators: list[torch.Generator]) -> dict[str, torch.Tensor]:
        """Head g drawn by its own config's model from generators[g] only: the init it gets alone."""
        if len(generators) != len(self.configs):
            raise ValueError(f"{len(generators)} generators for a group of {len(self.configs)} heads")
        per_head = [self._models[c].init_params([g]) for c, g in zip(self.configs, generators)]
        return {name: torch.cat([w[name] for w in per_head]) for name in per_head[0]}

    def fuse(self, params: dict[str, torch.Tensor], feats: list[torch.Tensor]) -> torch.Tensor:
        """Each segment's operator on its slice of the stack (G, B, d) -> (G, B, fused_dim); a group of one
        config runs its operator on the whole stack, as a lone cell does."""
        if len(self._segments) == 1:
            return self._segments[0][0].fuse(params, feats)
        fusion = {k: v for k, v in params.items() if k.startswith("fusion.")}
        return torch.cat([model.fuse({k: v[a:b] for k, v in fusion.items()}, [f[a:b] for f in feats])
                          for model, a, b in self._segments])
