"""Where one stacked head-training step spends its time on this machine, and whether torch.compile pays.

    python benchmarks/profile_step.py                      # eager: per-step ms by phase + torch.profiler by op kind
    python benchmarks/profile_step.py --compile            # also torch.compile of forward+loss (and its backward)

The step is heads/train.py's stacked step, run from the same pieces (GroupHead, the dropout draw, the stacked
AdamW): per-head gathers of a batch, dropout masks from per-head generators, the batched forward, the
cross-entropy, autograd.grad, per-head clipping and torch's fused AdamW. Default: one 2-A group (add, average,
product x seeds 0,1,2 = 9 heads) at the protocol's sizes (image 1280, text 384, 37 classes, batch 128, 6,475
training rows, so 50 full batches and a last one of 75 rows per epoch), synthetic features, 1 torch thread
(what `heads sweep` uses), fp32. CPU only: the script has no device option. --strategy 1B (or 1A, 2B) profiles
that strategy's group at its protocol input widths. Results and what they mean: benchmarks/results/step_profile.md.

--compile measures: the first call (compile), the steady step, the first call on the epoch's last partial batch,
and the first call after heads leave the stack (G 9 -> 6 -> 3, a new GroupHead, as `_train_stack` makes one),
and how far compiled weights drift from eager ones over the same steps. TORCHINDUCTOR_CACHE_DIR=<fresh folder>
times a cold compile; a second run with the same folder, a warm one.
"""
from __future__ import annotations

import argparse
import platform
import resource
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heads.groups import GroupHead  # noqa: E402
from heads.models import HeadConfig  # noqa: E402
from heads.train import HeadData, TrainSettings, _dropout_masks, _generators, _StackedAdamW  # noqa: E402

MATMUL_OPS = {"aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm", "aten::matmul"}
# the store layers' widths each strategy reads in the protocol: pooled (2-A/2-B), module dense (1-A), classifier (1-B)
DIMS = {"2A": (1280, 384), "2B": (1280, 384), "1A": (500, 500), "1B": (37, 37)}
OPTIMIZER_OPS = {"aten::_fused_adamw_", "aten::_foreach_norm", "aten::linalg_vector_norm"}


def synthetic_data(*, classes=37, per_class=(175, 25, 50), d_img=1280, d_txt=384, seed=0) -> HeadData:
    """bench_sweep.synthetic_store's features, held in memory: 6,475 / 925 / 1,850 rows."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), sum(per_class))
    split = np.tile(np.repeat(["train", "val", "test"], per_class), classes)

    def feats(dim, noise):
        return (rng.normal(size=(classes, dim))[y] + noise * rng.normal(size=(len(y), dim))).astype(np.float32)

    return HeadData.from_arrays([feats(d_img, 6.0), feats(d_txt, 4.0)], y, split)


class Stack:
    """The state `_train_stack` keeps for the heads still training: model, weights, optimizer, generators."""

    def __init__(self, heads, data, s: TrainSettings):
        self.heads, self.s = heads, s
        self.model = GroupHead([c for c, _ in heads])
        init_gens, self.gens = _generators(heads, data.train.device)
        self.params = {k: v.requires_grad_() for k, v in self.model.init_params(init_gens).items()}
        self.opt = _StackedAdamW(self.params, s)
        self.p_drop = heads[0][0].dropout

    def keep(self, rows: list[int]) -> None:
        """Heads at `rows` stay (as when others stop): a new GroupHead and G-row weights, like `_train_stack`."""
        idx = torch.tensor(rows)
        self.model = self.model.select(rows)
        self.gens = [self.gens[i] for i in rows]
        self.params = {k: v.detach()[idx].requires_grad_() for k, v in self.params.items()}
        self.opt.keep(idx)


def loss_per_head(model, params, xs, masks, y):
    """The step's forward and loss, as `_train_stack` computes them (class_weight None): (A,)."""
    logits = model.forward(params, xs, masks)                                       # (A, B, C)
    A = logits.shape[0]
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view(A, -1).mean(1)


def step(stack: Stack, xs, y, loss_fn, phases=None) -> torch.Tensor:
    """One training step; `phases` (name -> list of seconds) gets each phase's wall time when given. Returns
    the step's per-head losses (A,)."""
    t = time.perf_counter()

    def mark(name):
        nonlocal t
        if phases is not None:
            now = time.perf_counter()
            phases[name].append(now - t)
            t = now

    with torch.profiler.record_function("phase: dropout draw"):
        masks = _dropout_masks(stack.gens, y.shape[1], stack.model.dropout_width, stack.p_drop, y.device)
    mark("dropout draw")
    with torch.profiler.record_function("phase: forward + loss"):
        per_head = loss_fn(stack.model, stack.params, xs, masks, y)
    mark("forward + loss")
    with torch.profiler.record_function("phase: backward"):
        grads = torch.autograd.grad(per_head.sum(), list(stack.params.values()))
    mark("backward")
    with torch.profiler.record_function("phase: clip + AdamW"):
        stack.opt.step(stack.params, grads)
    mark("clip + AdamW")
    return per_head.detach()


def batches(stack: Stack, data: HeadData, s: TrainSettings, phases=None):
    """The epoch's batches as the trainer gathers them ((A, B, D_m), (A, B)), the gather timed as a phase."""
    it = data.train.train_batches(stack.gens, s.batch_size)
    while True:
        t = time.perf_counter()
        with torch.profiler.record_function("phase: batch gather"):
            batch = next(it, None)
        if batch is None:
            return
        if phases is not None:
            phases["batch gather"].append(time.perf_counter() - t)
        yield batch


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def step_matmul_gflop(model, batch: int) -> float:
    """Matmul GFLOP of one step of G heads: forward, weight gradients, and input gradients of every layer but
    the first (the features need none; autograd skips them). The trainer's FLOP count (3x forward) is an upper
    bound."""
    direct = model.config.strategy in ("1A", "1B")   # the fusion operator reads the features themselves
    gated = model.fusion is not None and bool(model.fusion.param_shapes())
    if direct:   # the first layer is the fusion layer, unless gate weights come first
        first = set() if gated else {"fusion_layer"}
    else:
        first = {f"{m}_middle" for m in model.modalities}
    macs = sum((2 if prefix in first else 3) * inp * out for prefix, out, inp in model._linears)
    if model.fusion is not None:
        macs += (2 if direct else 3) * model.fusion.flops_per_row() // 2
    return 2 * macs * batch * len(model.configs) / 1e9


def eager_epochs(heads, data, s, epochs: int) -> None:
    from heads.throughput import matmul_peak_gflops

    stack = Stack(heads, data, s)
    steps_per_epoch = -(-len(data.train) // s.batch_size)
    gflop = step_matmul_gflop(stack.model, s.batch_size)
    peak = matmul_peak_gflops(torch.device("cpu"), "fp32", threads=torch.get_num_threads(), seconds=1.0)
    print(f"matmul work of a full step: {gflop:.2f} GFLOP; matmul peak measured now (heads/throughput.py): "
          f"{peak:.0f} GFLOP/s -> at least {1e3 * gflop / peak:.1f} ms per step")
    for epoch in range(epochs):
        phases = defaultdict(list)
        wall, cpu = time.perf_counter(), cpu_seconds()
        for xs, y in batches(stack, data, s, phases):
            step(stack, xs, y, loss_per_head, phases)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        total = sum(sum(v) for v in phases.values())
        print(f"eager epoch {epoch + 1}: {steps_per_epoch} steps, wall {wall:.2f} s "
              f"({1e3 * wall / steps_per_epoch:.1f} ms per step), process CPU {cpu:.2f} s")
        for name, times in phases.items():
            print(f"    {name:>15}: median {1e3 * statistics.median(times):6.2f} ms per step, "
                  f"{100 * sum(times) / total:5.1f} % of the epoch's step time")


def profile_ops(heads, data, s, steps: int) -> None:
    """torch.profiler over `steps` steady eager steps (after 3 of warm-up: allocator, optimizer state)."""
    stack = Stack(heads, data, s)
    it = batches(stack, data, s)
    for _ in range(3):
        step(stack, *next(it), loss_per_head)
    print_op_profile(stack, [next(it) for _ in range(steps)], loss_per_head, f"eager, {steps} steady steps")


def op_kind(name: str) -> str:
    if name in MATMUL_OPS:
        return "matmul (bmm/baddbmm/mm)"
    if name in OPTIMIZER_OPS:
        return "optimizer (fused AdamW, norms)"
    if name in ("aten::uniform_", "aten::rand", "aten::randperm"):
        return "random draws"
    if "Compiled" in name or "cpp_fused" in name or "Dynamo" in name:   # a compiled graph's own time: inductor's
        return "compiled graphs (fused C++ kernels, wrappers)"           # fused kernels run inside its call
    return "elementwise, reductions, copies, views"


def print_op_profile(stack: Stack, collected, loss_fn, label: str) -> None:
    """Self CPU time by kind of op over the given steps, and the wall time no op accounts for."""
    steps = len(collected)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        wall = time.perf_counter()
        for xs, y in collected:
            step(stack, xs, y, loss_fn)
        wall = time.perf_counter() - wall
    kinds, counts, ops, n_ops = defaultdict(float), defaultdict(int), defaultdict(float), 0
    per_op = defaultdict(int)
    for e in prof.key_averages():
        if e.key.startswith(("phase: ", "ProfilerStep", "autograd::engine::evaluate_function")):
            continue   # ranges and wrappers whose time is their children's
        n_ops += e.count
        kinds[op_kind(e.key)] += e.self_cpu_time_total
        counts[op_kind(e.key)] += e.count
        ops[e.key] += e.self_cpu_time_total
        per_op[e.key] += e.count
    print(f"\ntorch.profiler, {label} (profiled wall {1e3 * wall / steps:.1f} ms per step, {n_ops / steps:.0f} ops "
          f"per step):")
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"    {kind:>48}: {us / 1e3 / steps:6.2f} ms per step ({100 * us / 1e6 / wall:5.1f} % of wall, "
              f"{counts[kind] / steps:.0f} ops)")
    rest = wall - sum(kinds.values()) / 1e6
    print(f"    {'not inside any op (Python, dispatch)':>48}: {1e3 * rest / steps:6.2f} ms per step "
          f"({100 * rest / wall:5.1f} % of wall)")
    gflop = step_matmul_gflop(stack.model, collected[0][1].shape[1])
    mm_s = kinds["matmul (bmm/baddbmm/mm)"] / 1e6 / steps
    print(f"    matmuls ran at {gflop / mm_s:.0f} GFLOP/s; the whole step at {gflop / wall * steps:.0f} GFLOP/s "
          "of matmul work")
    print("    top ops by self CPU time: " + ", ".join(
        f"{k} {v / 1e3 / steps:.2f} ms" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:8]))
    print("    most frequent ops per step: " + ", ".join(
        f"{k} {v / steps:.0f}" for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])[:8]))


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare_compile(heads, data, s, steps: int, mode: str | None, dynamic) -> None:
    """Compile forward+loss (AOTAutograd compiles its backward too); time compiles and steady steps against eager
    on the same batches, from the same initial weights."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled_loss = torch.compile(loss_per_head, mode=mode, dynamic=dynamic)
    eager, comp = Stack(heads, data, s), Stack(heads, data, s)
    # the same batches for both, drawn by a third stack's generators, so eager and compiled draw the same dropout
    epoch = list(batches(Stack(heads, data, s), data, s))
    full, last = epoch[:-1], epoch[-1]
    print(f"\ntorch.compile(mode={mode!r}, dynamic={dynamic}), forward+loss; batches of {full[0][1].shape[1]} and a "
          f"last of {last[1].shape[1]}")
    t0 = time.perf_counter()
    loss_c = step(comp, *full[0], compiled_loss)
    first = time.perf_counter() - t0
    print(f"    first call, G={len(comp.gens)}, B={full[0][1].shape[1]} (compile): {first:.1f} s")
    loss_e = step(eager, *full[0], loss_per_head)
    print(f"    first step, same weights and masks: max |loss_eager - loss_compiled| = "
          f"{(loss_e - loss_c).abs().max().item():.2e} (losses about {loss_e.mean().item():.2f})")
    e_times, c_times = [], []
    for xs, y in full[1:1 + steps]:  # alternate, so load on the shared machine hits both alike
        e_times.append(timed(lambda: step(eager, xs, y, loss_per_head)))
        c_times.append(timed(lambda: step(comp, xs, y, compiled_loss)))
    e_ms, c_ms = 1e3 * statistics.median(e_times), 1e3 * statistics.median(c_times)
    print(f"    steady step, median of {len(e_times)}: eager {e_ms:.1f} ms, compiled {c_ms:.1f} ms "
          f"(compiled / eager {c_ms / e_ms:.2f})")
    drift = max((eager.params[k] - comp.params[k]).abs().max().item() for k in eager.params)
    scale = max(eager.params[k].abs().max().item() for k in eager.params)
    print(f"    after {1 + len(e_times)} steps from the same init: max |w_eager - w_compiled| = {drift:.2e} "
          f"(max |w| {scale:.2f}); equal to the bit: {drift == 0.0}")
    print_op_profile(comp, full[-6:-1], compiled_loss, "compiled, 5 steady steps")
    t_last = timed(lambda: step(comp, *last, compiled_loss))
    t_last2 = timed(lambda: step(comp, *last, compiled_loss))
    print(f"    last partial batch B={last[1].shape[1]}: first call {t_last:.1f} s (recompile), second "
          f"{1e3 * t_last2:.1f} ms")
    for keep in ([0, 1, 3, 4, 6, 7], [0, 2, 4]):  # heads stop: a seed of each cell, then another (G 9, 6, 3)
        keep = [i for i in keep if i < len(comp.gens)]
        comp.keep(keep)
        eager.keep(keep)
        batch = full[0]
        xs = [x[:len(keep)] for x in batch[0]]
        y = batch[1][:len(keep)]
        t_first = timed(lambda: step(comp, xs, y, compiled_loss))
        c2 = statistics.median(timed(lambda: step(comp, xs, y, compiled_loss)) for _ in range(5))
        e2 = statistics.median(timed(lambda: step(eager, xs, y, loss_per_head)) for _ in range(5))
        print(f"    heads leave, G={len(keep)}: first call {t_first:.1f} s, then compiled {1e3 * c2:.1f} ms vs eager "
              f"{1e3 * e2:.1f} ms per step")
    try:
        from torch._dynamo.utils import counters
        print(f"    dynamo frames compiled: {dict(counters['stats'])}")
    except Exception as err:  # a private counter: report its absence, never fail the benchmark on it
        print(f"    (dynamo counters unavailable: {err})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", default="2A", help="1A, 1B, 2A or 2B (at the protocol's input widths)")
    p.add_argument("--fusions", default="add,average,product", help="cells of one shape: one group")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1, help="eager epochs timed by phase")
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile of forward+loss")
    p.add_argument("--compile-steps", type=int, default=20)
    p.add_argument("--mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--dynamic", choices=["auto", "true", "false"], default="auto",
                   help="torch.compile dynamic=: auto (None: static first, dynamic after a shape change)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    s = TrainSettings()
    if args.strategy not in DIMS:
        p.error(f"--strategy must be one of {', '.join(DIMS)}")
    dims = DIMS[args.strategy]
    data = synthetic_data(d_img=dims[0], d_txt=dims[1])
    heads = [(HeadConfig(args.strategy, f, dims, 37), int(sd))
             for f in args.fusions.split(",") for sd in args.seeds.split(",")]
    cxx = torch._inductor.config.cpp.cxx if hasattr(torch, "_inductor") else None
    print(f"machine: {platform.processor() or platform.machine()}, {_cpu_model()}, {torch.get_num_threads()} torch "
          f"thread(s), torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), C++ compiler for "
          f"inductor: {shutil.which('g++') or shutil.which('c++') or 'none found'} (config {cxx})")
    print(f"group: {args.strategy} x {args.fusions} x seeds {args.seeds} = G {len(heads)} heads, train rows "
          f"{len(data.train)}, batch {s.batch_size}, {heads[0][0].num_classes} classes, fp32")
    eager_epochs(heads, data, s, args.epochs)
    profile_ops(heads, data, s, args.profile_steps)
    if args.compile:
        compare_compile(heads, data, s, args.compile_steps, args.mode,
                        {"auto": None, "true": True, "false": False}[args.dynamic])
    print("command: python " + " ".join(sys.argv))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
