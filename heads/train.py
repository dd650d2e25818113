"""Training of many heads at once (stacked weights, batched matmuls) with per-head early stopping.

Each head owns a generator seeded from (seed, config). It draws, in this order and nothing else: its init
(StackedHead.init_params, always on the CPU), then per epoch one permutation of the training rows, then per step
one uniform (B, dropout_width) block for its dropout masks. On the CPU one generator draws all three; on CUDA the
per-epoch and per-step draws come from a generator on the device, so nothing is drawn on the host and copied
each step. A head sees the same stream whether it trains alone (`batched=False`: torch.optim.AdamW +
clip_grad_norm_, the plain reference) or in a stack of G (`batched=True`: the stacked AdamW below, with
per-head gradient clipping), so both paths agree to the bit on one device (not across devices).

Nothing inside an epoch waits for the device: early stopping, divergence (a head whose loss turned non-finite)
and the best-weight snapshots are decided once per epoch. A head that stopped improving for `patience` epochs,
or diverged, leaves the stack (its best weights are kept), so it stops changing and stops costing compute.

Data access goes through a split's two iterators, `train_batches` (per-head permutations, (A, B, D) gathers)
and `eval_batches` (sequential chunks), so a split held in memory and one streamed from disk train the same way.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import time
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from embedstore.defaults import PRECISIONS, SPLITS, autocast, resolve_precision
from embedstore.metrics import classification_metrics
from heads.groups import GroupHead
from heads.models import HeadConfig

CLASS_WEIGHTS = (None, "balanced")


@dataclass(frozen=True)
class TrainSettings:
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01     # torch.optim.AdamW's default
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_norm: float = 1.0         # per head, like clip_grad_norm_ on each model alone
    max_epochs: int = 40
    patience: int = 5              # epochs without a better validation accuracy before a head stops
    eval_chunk: int = 4096
    # "auto": bf16 autocast on CUDA, float32 on the CPU; "bf16" also on a CPU with native bf16 instructions
    # (measured 2x faster for 2-A heads on an AVX512-BF16 CPU, test accuracy within 0.2 points); "fp32": never
    precision: str = "auto"
    # None: every example counts the same; "balanced": each class weighs n / (C * n_class) in the loss
    # (scikit-learn's "balanced"), for imbalanced catalogs
    class_weight: str | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise ValueError(f"unknown class weight {self.class_weight!r}; use 'balanced' or none")
        for option, value in (("--batch-size", self.batch_size), ("--max-epochs", self.max_epochs),
                              ("--patience", self.patience), ("eval_chunk", self.eval_chunk)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{option} must be an integer of at least 1, got {value!r}")
        for option, value, low, low_open in (("--lr", self.lr, 0.0, True), ("eps", self.eps, 0.0, True),
                                             ("clip_norm", self.clip_norm, 0.0, True),
                                             ("weight_decay", self.weight_decay, 0.0, False)):
            if not (isinstance(value, numbers.Real) and math.isfinite(value)
                    and (value > low if low_open else value >= low)):
                raise ValueError(f"{option} must be a finite number {'above' if low_open else 'of at least'} {low}, "
                                 f"got {value!r}")
        if not all(isinstance(b, numbers.Real) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")


class DataSplit(Protocol):
    """What the trainer needs of a split; `Split` (in memory) and a streamed split both provide it."""

    device: torch.device

    def __len__(self) -> int: ...

    def label_counts(self, num_classes: int) -> torch.Tensor: ...   # (C,) int64

    def train_batches(self, generators: list[torch.Generator], batch_size: int
                      ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]: ...  # xs: (A, B, D_m), y: (A, B)

    def eval_batches(self, chunk: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]: ...  # (b, D_m), (b,)


@dataclass
class Split:
    """A split held in memory on the training device: minibatches are index gathers."""
    inputs: list[torch.Tensor]   # one (n, D_m) tensor per modality (float32, or float16 upcast per batch)
    labels: torch.Tensor         # (n,) int64

    @property
    def device(self) -> torch.device:
        return self.labels.device

    def __len__(self) -> int:
        return self.labels.shape[0]

    def label_counts(self, num_classes: int) -> torch.Tensor:
        return torch.bincount(self.labels.cpu(), minlength=num_classes)

    def train_batches(self, generators, batch_size):
        """Each head walks its own permutation of the rows, drawn from its own generator."""
        n = len(self)
        perms = torch.stack([torch.randperm(n, generator=g, device=g.device) for g in generators])
        perms = perms.to(self.device)                                     # (A, n)
        for start in range(0, n, batch_size):
            idx = perms[:, start:start + batch_size]                      # (A, B)
            yield [x[idx].float() for x in self.inputs], self.labels[idx]  # (A, B, D_m) gathers, (A, B)

    def eval_batches(self, chunk):
        for start in range(0, len(self), chunk):
            yield [x[start:start + chunk].float() for x in self.inputs], self.labels[start:start + chunk]


@dataclass
class HeadData:
    train: DataSplit
    val: DataSplit
    test: DataSplit | None = None    # optional: without it, results carry no test metrics

    @classmethod
    def from_arrays(cls, features: list[np.ndarray], labels: np.ndarray, split: np.ndarray,
                    device: str | torch.device = "cpu", *, require_test: bool = True) -> "HeadData":
        """Move features to tensors on `device` once (float16 stays float16 and is upcast per batch)."""
        def make(rows):
            return Split([_as_tensor(np.asarray(f)[rows]).to(device) for f in features],
                         torch.as_tensor(np.asarray(labels)[rows], dtype=torch.int64).to(device))

        return cls.from_split_rows(np.arange(len(split)), np.asarray(split).astype(str), make,
                                   require_test=require_test, where="the data")

    @classmethod
    def from_split_rows(cls, rows: np.ndarray, split: np.ndarray, make, *, require_test: bool = True,
                        where: str = "the data") -> "HeadData":
        """One split per name in SPLITS from `make(rows of that split)`; rows (n,) with their split names (n,).
        Train and val must have rows; test too unless `require_test` is False (then an empty test is None)."""
        parts = {}
        for name in SPLITS:
            mine = rows[split == name]
            if len(mine) == 0:
                if name == "test" and not require_test:
                    parts[name] = None
                    continue
                raise ValueError(f"no {name!r} rows in {where}; a head needs train and val splits"
                                 + (" and a test split" if require_test else ""))
            parts[name] = make(mine)
        return cls(**parts)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    dtype = torch.float16 if array.dtype == np.float16 else torch.float32
    return torch.as_tensor(array, dtype=dtype)


@dataclass
class HeadResult:
    seed: int
    test_accuracy: float | None   # None without a test split
    test_macro_f1: float | None
    best_val_accuracy: float
    best_epoch: int
    epochs_run: int
    train_seconds: float          # this head's share of the wall time (group time / G when batched)
    group_seconds: float          # wall time of the whole stack it trained in
    group_size: int
    params: dict[str, torch.Tensor]  # best-epoch weights, (1, ...) each, on the CPU
    diverged: bool = False        # its loss turned non-finite: it stopped then, and is never saved
    precision: str = "fp32"       # the precision it trained in: "fp32" | "bf16"
    train_flops: float = 0.0      # matmul FLOPs of its training steps (forward + backward), for GFLOP/s


def head_seed(config: HeadConfig, seed: int) -> int:
    """The generator seed of one head: a stable hash of (seed, config), so cells never share streams."""
    key = json.dumps({"config": config.to_dict(), "seed": int(seed)}, sort_keys=True)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)


def train_heads(config: HeadConfig, seeds: list[int], data: HeadData, settings: TrainSettings = TrainSettings(),
                *, batched: bool = True, precision: str | None = None) -> list[HeadResult]:
    """Train one head per seed; all in one stack (batched) or one after another. Same results either way.
    `precision`: "bf16" | "fp32" as the caller resolved it (a sweep: once, in its RunContext); None resolves
    `settings.precision` on the data's device."""
    return train_group([(config, s) for s in seeds], data, settings, batched=batched, precision=precision)


def train_group(heads: list[tuple[HeadConfig, int]], data: HeadData, settings: TrainSettings = TrainSettings(),
                *, batched: bool = True, precision: str | None = None) -> list[HeadResult]:
    """Train heads of several cells, one per (config, seed), in one stack when their configs share
    StackedHead.shape_key (heads/groups.py), else (`batched=False`) one after another. Results in `heads` order;
    each is bit-identical to the same head trained alone on the same device."""
    if batched:
        return _train_stack(list(heads), data, settings, reference=False, precision=precision)
    return [r for head in heads
            for r in _train_stack([head], data, settings, reference=True, precision=precision)]


def _generators(heads: list[tuple[HeadConfig, int]], device: torch.device):
    """(init generators on the CPU, stream generators on the device): the same objects on a CPU device."""
    init = [torch.Generator().manual_seed(head_seed(config, sd)) for config, sd in heads]
    if device.type == "cpu":
        return init, init
    return init, [torch.Generator(device=device).manual_seed(head_seed(config, sd)) for config, sd in heads]


def _dropout_masks(generators: list[torch.Generator], batch: int, width: int, p: float,
                   device: torch.device) -> torch.Tensor | None:
    if p == 0.0:
        return None
    u = torch.stack([torch.rand(batch, width, generator=g, device=g.device) for g in generators])  # (G, B, W)
    return ((u >= p).to(torch.float32) / (1.0 - p)).to(device)


class _StackedAdamW:
    """torch.optim.AdamW's update applied to stacked (G, ...) weights, after clipping each head's gradient
    to its own norm; `keep` drops stopped heads from the state."""

    def __init__(self, params: dict[str, torch.Tensor], s: TrainSettings):
        self.s = s
        # one step count for the stack: stopped heads leave it, so every head in it has taken as many steps
        self.step_t = torch.zeros((), dtype=torch.float32, device=next(iter(params.values())).device)
        self.exp_avg = {k: torch.zeros_like(v) for k, v in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in params.items()}
        self._views = None   # (weights, their per-head views, exp_avg's, exp_avg_sq's) until the stack changes

    def step(self, params: dict[str, torch.Tensor], grads: list[torch.Tensor]) -> None:
        s = self.s
        G = grads[0].shape[0]
        grads = [g if g.is_contiguous() else g.contiguous() for g in grads]  # the fused kernel reads raw memory
        with torch.no_grad():
            grad_views = _per_head(grads)
            # per-head norm exactly as clip_grad_norm_ computes it: the norm of the per-tensor norms, (G,)
            per_tensor = torch.stack(torch._foreach_norm(grad_views)).view(G, -1)
            coef = (s.clip_norm / (torch.linalg.vector_norm(per_tensor, dim=1) + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.view(G, *([1] * (g.dim() - 1))))
            self.step_t += 1
            weights, exp_avg, exp_avg_sq = self._state_views(params)
            # torch's fused AdamW kernel: one pass over weights and state (the update is memory-bound)
            torch._fused_adamw_(weights, grad_views, exp_avg, exp_avg_sq, [], [self.step_t] * len(grad_views),
                                lr=s.lr, beta1=s.betas[0], beta2=s.betas[1], weight_decay=s.weight_decay,
                                eps=s.eps, amsgrad=False, maximize=False)

    def _state_views(self, params: dict[str, torch.Tensor]) -> tuple[list, list, list]:
        """Per-head views of the weights and the AdamW state, made once per stack composition: the weights and
        state are updated in place, so the views stay valid until heads leave (`keep`) or the weights are new
        tensors. Building them every step was 3 x G x (tensors per head) views of host work per step."""
        tensors = list(params.values())
        if self._views is None or any(a is not b for a, b in zip(self._views[0], tensors)):
            self._views = (tensors, _per_head(tensors), _per_head(list(self.exp_avg.values())),
                           _per_head(list(self.exp_avg_sq.values())))
        return self._views[1:]

    def keep(self, rows: torch.Tensor) -> None:
        self.exp_avg = {k: v[rows] for k, v in self.exp_avg.items()}
        self.exp_avg_sq = {k: v[rows] for k, v in self.exp_avg_sq.items()}
        self._views = None


def _per_head(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """(G, ...) tensors -> their G x len(tensors) per-head views, head by head: each head's update is then
    computed exactly as for a lone head (the fused kernel's vector tails fall on the same elements)."""
    return [t[i] for i in range(tensors[0].shape[0]) for t in tensors]


def _predictions(model, params, split: DataSplit, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes (G, n) of G heads and the labels (n,) over a split, chunk by chunk, on the device."""
    preds, labels = [], []
    with torch.no_grad():
        for xs, y in split.eval_batches(chunk):
            G = next(iter(params.values())).shape[0]
            logits = model.forward(params, [x.unsqueeze(0).expand(G, -1, -1) for x in xs])  # (G, b, C)
            preds.append(logits.argmax(-1))
            labels.append(y)
    return torch.cat(preds, dim=1), torch.cat(labels)


def _accuracy(model, params, split: DataSplit, chunk: int) -> torch.Tensor:
    pred, labels = _predictions(model, params, split, chunk)
    return (pred == labels.unsqueeze(0)).to(torch.float64).mean(1).cpu()   # (G,): the epoch's one host sync


def _class_weights(split: DataSplit, num_classes: int, how: str | None) -> torch.Tensor | None:
    if how is None:
        return None
    counts = split.label_counts(num_classes).to(torch.float64)
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])   # scikit-learn's "balanced"
    return weights.to(torch.float32).to(split.device)


def _train_stack(heads: list[tuple[HeadConfig, int]], data: HeadData, s: TrainSettings,
                 *, reference: bool, precision: str | None = None) -> list[HeadResult]:
    t0 = time.perf_counter()
    device = data.train.device
    model = all_heads = GroupHead([config for config, _ in heads])   # refuses configs of different shapes
    config, seeds = heads[0][0], [sd for _, sd in heads]   # configs share every shape, dropout and class count
    G, n, p_drop = len(seeds), len(data.train), config.dropout
    precision = precision or resolve_precision(s.precision, device)
    init_gens, gens = _generators(heads, device)
    params = {k: v.to(device).requires_grad_() for k, v in model.init_params(init_gens).items()}
    class_weight = _class_weights(data.train, config.num_classes, s.class_weight)
    if reference:  # the plain one-model path every PyTorch user writes
        assert G == 1
        # fused=True: the same kernel the stack uses, so both paths agree to the bit, not just to 1e-7
        # (the single-tensor AdamW rounds differently, and over hundreds of steps that can flip a prediction)
        torch_opt = torch.optim.AdamW(params.values(), lr=s.lr, betas=s.betas, eps=s.eps,
                                      weight_decay=s.weight_decay, fused=True)
    else:
        stacked_opt = _StackedAdamW(params, s)
    best = {k: v.detach().clone() for k, v in params.items()}   # best-epoch weights of all G heads
    best_acc = torch.full((G,), -1.0, dtype=torch.float64)
    best_epoch = torch.zeros(G, dtype=torch.long)
    epochs_run = torch.zeros(G, dtype=torch.long)
    diverged = torch.zeros(G, dtype=torch.bool)
    active = torch.arange(G)          # rows of `best` that the current stack holds
    flops_per_row = 3 * model.forward_flops_per_row()   # forward + backward (input and weight gradients)
    train_flops = torch.zeros(G, dtype=torch.float64)

    for epoch in range(1, s.max_epochs + 1):
        A = len(active)
        bad = torch.zeros(A, dtype=torch.bool, device=device)   # loss turned non-finite this epoch, per head
        for xs, y in data.train.train_batches(gens, s.batch_size):      # (A, B, D_m) each, (A, B)
            masks = _dropout_masks(gens, y.shape[1], model.dropout_width, p_drop, device)
            with autocast(device, precision):
                logits = model.forward(params, xs, masks)                 # (A, B, C)
            per_example = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), weight=class_weight,
                                          reduction="none").view(A, -1)   # (A, B)
            if class_weight is None:
                per_head = per_example.mean(1)                            # (A,)
            else:  # each head's weighted mean, as cross_entropy(weight=...) computes it
                per_head = per_example.sum(1) / class_weight[y].sum(1)
            bad |= ~torch.isfinite(per_head)
            # sum over heads of each head's loss: each head gets exactly its own gradient
            grads = torch.autograd.grad(per_head.sum(), list(params.values()))
            if reference:
                for p, g in zip(params.values(), grads):
                    p.grad = g
                torch.nn.utils.clip_grad_norm_(params.values(), s.clip_norm)
                torch_opt.step()
            else:
                stacked_opt.step(params, grads)
        train_flops[active] += flops_per_row * n
        with autocast(device, precision):
            val_acc = _accuracy(model, params, data.val, s.eval_chunk)    # (A,)
        bad = bad.cpu()
        epochs_run[active] = epoch
        improved = (val_acc > best_acc[active]) & ~bad
        if improved.any():
            rows = active[improved]
            best_acc[rows], best_epoch[rows] = val_acc[improved], epoch
            rows_d, improved_d = rows.to(device), improved.to(device)  # bookkeeping is on the CPU
            for k in best:
                best[k][rows_d] = params[k].detach()[improved_d]
        diverged[active[bad]] = True
        stopped = ((epoch - best_epoch[active]) >= s.patience) | bad
        if stopped.all():
            break
        if stopped.any():  # drop stopped heads from the stack: they stop changing and stop costing
            keep = torch.nonzero(~stopped).flatten()
            active = active[keep]
            gens = [gens[i] for i in keep.tolist()]
            model = model.select(keep.tolist())   # the operators of the heads left, in stack order
            keep_d = keep.to(device)
            params = {k: v.detach()[keep_d].requires_grad_() for k, v in params.items()}
            if not reference:
                stacked_opt.keep(keep_d)
    elapsed = time.perf_counter() - t0

    metrics = [None] * G
    if data.test is not None and len(data.test) > 0:
        with autocast(device, precision):
            test_pred, y_test = _predictions(all_heads, best, data.test, s.eval_chunk)
        test_pred, y_test = test_pred.cpu().numpy(), y_test.cpu().numpy()
        # over every class of the store (as the decision-level rows): a class missing from test counts the same
        metrics = [classification_metrics(y_test, test_pred[i], n_classes=config.num_classes) for i in range(G)]
    return [HeadResult(
        seed=int(sd),
        test_accuracy=None if metrics[i] is None else metrics[i]["accuracy"],
        test_macro_f1=None if metrics[i] is None else metrics[i]["macro_f1"],
        best_val_accuracy=float(best_acc[i]), best_epoch=int(best_epoch[i]), epochs_run=int(epochs_run[i]),
        train_seconds=elapsed / G, group_seconds=elapsed, group_size=G,
        params={k: v[i:i + 1].detach().cpu().clone() for k, v in best.items()},
        diverged=bool(diverged[i]), precision=precision, train_flops=float(train_flops[i]))
        for i, sd in enumerate(seeds)]
