"""The five fusion operators (DESIGN.md, "The five fusion operators"), one registry filled by a decorator.

Every operator works on a *stack* of G independent heads: inputs are (G, B, d) tensors and any learned
weights carry a leading G dimension, so a grid of heads trains with batched matmuls. A single head is G = 1.
A new operator is one small class:

    @register_fusion("max")
    class MaxFusion(Fusion):
        def forward(self, params, a, b):
            return torch.maximum(a, b)
"""
from __future__ import annotations

import math
from typing import Callable

import torch

_FUSIONS: dict[str, type["Fusion"]] = {}


def register_fusion(name: str) -> Callable[[type["Fusion"]], type["Fusion"]]:
    """Class decorator: make an operator available as `create_fusion(name, dim)`."""

    def add(cls: type[Fusion]) -> type[Fusion]:
        if name in _FUSIONS:
            raise ValueError(f"fusion operator {name!r} is already registered")
        cls.name = name
        _FUSIONS[name] = cls
        return cls

    return add


def list_fusions() -> list[str]:
    """Registered operator names, in registration order."""
    return list(_FUSIONS)


def create_fusion(name: str, dim: int) -> "Fusion":
    """The operator `name` for two d-dimensional inputs; ValueError listing what exists otherwise."""
    if name not in _FUSIONS:
        raise ValueError(f"unknown fusion operator {name!r}; registered: {', '.join(_FUSIONS)}")
    return _FUSIONS[name](dim)


class Fusion:
    """Combines an image feature a and a text feature b, both (G, B, d), into (G, B, output_dim)."""

    name = "?"

    def __init__(self, dim: int):
        self.dim = dim

    @property
    def output_dim(self) -> int:
        return self.dim

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Learned weights of ONE head, by name (without the G dimension); empty for fixed operators."""
        return {}

    def init_param(self, name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias alike."""
        bound = 1.0 / math.sqrt(2 * self.dim)
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound

    def flops_per_row(self) -> int:
        """Matmul FLOPs per example of the operator's learned weights (2 per multiply-add)."""
        return sum(2 * math.prod(shape) for name, shape in self.param_shapes().items() if name == "weight")

    def forward(self, params: dict[str, torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_fusion("add")
class AddFusion(Fusion):
    def forward(self, params, a, b):
        return a + b


@register_fusion("average")
class AverageFusion(Fusion):
    def forward(self, params, a, b):
        return (a + b) / 2


@register_fusion("product")
class ProductFusion(Fusion):
    def forward(self, params, a, b):
        return a * b


@register_fusion("concat")
class ConcatFusion(Fusion):
    @property
    def output_dim(self) -> int:
        return 2 * self.dim

    def forward(self, params, a, b):
        return torch.cat([a, b], dim=-1)  # (G, B, 2d)


@register_fusion("gated")
class GatedFusion(Fusion):
    """z = sigmoid(W [a; b] + c), output z * a + (1 - z) * b: z near 1 keeps the image, near 0 the text."""

    def param_shapes(self):
        return {"weight": (2 * self.dim, self.dim), "bias": (self.dim,)}  # (in, out), see models._linear

    def forward(self, params, a, b):
        ab = torch.cat([a, b], dim=-1)  # (G, B, 2d)
        # baddbmm: one batched matmul for all G heads; weight is (G, 2d, d)
        z = torch.sigmoid(torch.baddbmm(params["bias"].unsqueeze(1), ab, params["weight"]))
        return z * a + (1 - z) * b  # (G, B, d)
