"""Training of many heads at once (stacked weights, batched matmuls) with per-head early stopping.

Each head owns a torch.Generator seeded from (seed, config). It draws, in this order and nothing else: its
init (StackedHead.init_params), then per epoch one permutation of the training rows, then per step one
uniform (B, dropout_width) block for its dropout masks. Generators live on the CPU, so a head sees the same
stream whether it trains alone (`batched=False`: torch.optim.AdamW + clip_grad_norm_, the plain reference)
or in a stack of G (`batched=True`: the stacked AdamW below, with per-head gradient clipping), on any device.
A head whose validation accuracy stopped improving for `patience` epochs is removed from the stack (its best
weights are kept), so it stops changing and stops costing compute.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score

from heads.models import HeadConfig, StackedHead, predict_logits


PRECISIONS = ("auto", "bf16", "fp32")


def uses_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


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

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
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


@dataclass
class Split:
    inputs: list[torch.Tensor]   # one (n, D_m) float32 tensor per modality, on the training device
    labels: torch.Tensor         # (n,) int64


@dataclass
class HeadData:
    train: Split
    val: Split
    test: Split

    @classmethod
    def from_arrays(cls, features: list[np.ndarray], labels: np.ndarray, split: np.ndarray,
                    device: str | torch.device = "cpu") -> "HeadData":
        """Move features to float32 tensors on `device` once; minibatches are then index gathers."""
        split = np.asarray(split).astype(str)
        parts = {}
        for name in ("train", "val", "test"):
            rows = np.flatnonzero(split == name)
            if len(rows) == 0:
                raise ValueError(f"no {name!r} rows in the data; a head needs train, val and test splits")
            parts[name] = Split([torch.as_tensor(np.asarray(f)[rows], dtype=torch.float32).to(device)
                                 for f in features],
                                torch.as_tensor(np.asarray(labels)[rows], dtype=torch.int64).to(device))
        return cls(**parts)


@dataclass
class HeadResult:
    seed: int
    test_accuracy: float
    test_macro_f1: float
    best_val_accuracy: float
    best_epoch: int
    epochs_run: int
    train_seconds: float          # this head's share of the wall time (group time / G when batched)
    group_seconds: float          # wall time of the whole stack it trained in
    group_size: int
    params: dict[str, torch.Tensor]  # best-epoch weights, (1, ...) each, on the CPU
    diverged: bool = False        # its training loss turned NaN/inf: stopped then, never to be saved


def head_seed(config: HeadConfig, seed: int) -> int:
    """The generator seed of one head: a stable hash of (seed, config), so cells never share streams."""
    key = json.dumps({"config": config.to_dict(), "seed": int(seed)}, sort_keys=True)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)


def train_heads(config: HeadConfig, seeds: list[int], data: HeadData, settings: TrainSettings = TrainSettings(),
                *, batched: bool = True) -> list[HeadResult]:
    """Train one head per seed; all in one stack (batched) or one after another. Same results either way."""
    if batched:
        return _train_stack(config, list(seeds), data, settings, reference=False)
    return [r for s in seeds for r in _train_stack(config, [s], data, settings, reference=True)]


def _dropout_masks(generators: list[torch.Generator], batch: int, width: int, p: float,
                   device: torch.device) -> torch.Tensor | None:
    if p == 0.0:
        return None
    u = torch.stack([torch.rand(batch, width, generator=g) for g in generators])  # (G, B, W), on the CPU
    masks = (u >= p).to(torch.float32) / (1.0 - p)
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return masks.pin_memory().to(device, non_blocking=True)
    return masks


class _StackedAdamW:
    """torch.optim.AdamW's update applied to stacked (G, ...) weights, after clipping each head's gradient
    to its own norm; `keep` drops stopped heads from the state."""

    def __init__(self, params: dict[str, torch.Tensor], s: TrainSettings):
        self.s = s
        # one step count for the stack: stopped heads leave it, so every head in it has taken as many steps
        self.step_t = torch.zeros((), dtype=torch.float32, device=next(iter(params.values())).device)
        self.exp_avg = {k: torch.zeros_like(v) for k, v in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in params.items()}

    def step(self, params: dict[str, torch.Tensor], grads: list[torch.Tensor]) -> None:
        s = self.s
        G = grads[0].shape[0]
        grads = [g if g.is_contiguous() else g.contiguous() for g in grads]  # the fused kernel reads raw memory
        with torch.no_grad():
            # per-head norm exactly as clip_grad_norm_ computes it: the norm of the per-tensor norms, (G,)
            per_tensor = torch.stack(torch._foreach_norm([g[i] for i in range(G) for g in grads])).view(G, -1)
            coef = (s.clip_norm / (torch.linalg.vector_norm(per_tensor, dim=1) + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.view(G, *([1] * (g.dim() - 1))))
            self.step_t += 1

            def per_head(tensors):  # (G, ...) -> G views: each head's update is then computed exactly as
                return [t[i] for i in range(G) for t in tensors]  # for a lone head (same vector tails)

            # torch's fused AdamW kernel: one pass over weights and state (the update is memory-bound)
            torch._fused_adamw_(per_head(params.values()), per_head(grads), per_head(self.exp_avg.values()),
                                per_head(self.exp_avg_sq.values()), [], [self.step_t] * (G * len(grads)),
                                lr=s.lr, beta1=s.betas[0], beta2=s.betas[1], weight_decay=s.weight_decay,
                                eps=s.eps, amsgrad=False, maximize=False)

    def keep(self, rows: torch.Tensor) -> None:
        self.exp_avg = {k: v[rows] for k, v in self.exp_avg.items()}
        self.exp_avg_sq = {k: v[rows] for k, v in self.exp_avg_sq.items()}


def _accuracy(model, params, split: Split, chunk: int) -> torch.Tensor:
    pred = predict_logits(model, params, split.inputs, chunk=chunk).argmax(-1)  # (G, n)
    return (pred == split.labels.unsqueeze(0)).to(torch.float64).mean(1).cpu()


def _train_stack(config: HeadConfig, seeds: list[int], data: HeadData, s: TrainSettings,
                 *, reference: bool) -> list[HeadResult]:
    t0 = time.perf_counter()
    device = data.train.labels.device
    model = StackedHead(config)
    G, n, p_drop = len(seeds), data.train.labels.shape[0], config.dropout
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=uses_bf16(s.precision, device))
    gens = [torch.Generator().manual_seed(head_seed(config, sd)) for sd in seeds]
    params = {k: v.to(device).requires_grad_() for k, v in model.init_params(gens).items()}
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
    active = torch.arange(G)          # rows of `best` that the current stack holds
    diverged = torch.zeros(G, dtype=torch.bool)

    for epoch in range(1, s.max_epochs + 1):
        A = len(active)
        perms = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)  # (A, n)
        non_finite = torch.zeros(A, dtype=torch.bool, device=device)  # per head, on the device: no sync per step
        for start in range(0, n, s.batch_size):
            idx = perms[:, start:start + s.batch_size]                    # (A, B)
            xs = [x[idx] for x in data.train.inputs]                      # (A, B, D_m) gathers
            y = data.train.labels[idx]                                    # (A, B)
            masks = _dropout_masks(gens, idx.shape[1], model.dropout_width, p_drop, device)
            with autocast:
                logits = model.forward(params, xs, masks)                 # (A, B, C)
            # sum over heads of each head's mean loss: each head gets exactly its own gradient
            head_loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(A, -1).mean(1)
            non_finite |= ~torch.isfinite(head_loss.detach())                # (A,)
            loss = head_loss.sum()
            grads = torch.autograd.grad(loss, list(params.values()))
            if reference:
                for p, g in zip(params.values(), grads):
                    p.grad = g
                torch.nn.utils.clip_grad_norm_(params.values(), s.clip_norm)
                torch_opt.step()
            else:
                stacked_opt.step(params, grads)
        with autocast:
            val_acc = _accuracy(model, params, data.val, s.eval_chunk)    # (A,)
        epochs_run[active] = epoch
        diverged_now = non_finite.cpu()                                   # (A,), one sync per epoch
        diverged[active[diverged_now]] = True
        improved = (val_acc > best_acc[active]) & ~diverged_now          # NaN weights are never a best epoch
        if improved.any():
            rows = active[improved]
            best_acc[rows], best_epoch[rows] = val_acc[improved], epoch
            rows_d, improved_d = rows.to(device), improved.to(device)  # bookkeeping is on the CPU
            for k in best:
                best[k][rows_d] = params[k].detach()[improved_d]
        stopped = ((epoch - best_epoch[active]) >= s.patience) | diverged_now  # a diverged head leaves the stack
        if stopped.all():
            break
        if stopped.any():  # drop stopped heads from the stack: they stop changing and stop costing
            keep = torch.nonzero(~stopped).flatten()
            active = active[keep]
            gens = [gens[i] for i in keep.tolist()]
            keep_d = keep.to(device)
            params = {k: v.detach()[keep_d].requires_grad_() for k, v in params.items()}
            if not reference:
                stacked_opt.keep(keep_d)
    elapsed = time.perf_counter() - t0

    with autocast:
        test_pred = predict_logits(model, best, data.test.inputs, chunk=s.eval_chunk).argmax(-1).cpu().numpy()
    y_test = data.test.labels.cpu().numpy()
    results = []
    for i, sd in enumerate(seeds):
        results.append(HeadResult(
            seed=int(sd),
            test_accuracy=float(accuracy_score(y_test, test_pred[i])),
            test_macro_f1=float(f1_score(y_test, test_pred[i], average="macro", zero_division=0)),
            best_val_accuracy=float(best_acc[i]), best_epoch=int(best_epoch[i]), epochs_run=int(epochs_run[i]),
            train_seconds=elapsed / G, group_seconds=elapsed, group_size=G,
            params={k: v[i:i + 1].detach().cpu().clone() for k, v in best.items()}, diverged=bool(diverged[i])))
    return results
