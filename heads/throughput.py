"""How close a sweep runs to the machine's limit: a short matmul peak measured in the same run, on the same
threads and device, beside the rate the sweep's training matmuls achieved."""
from __future__ import annotations

import time

import torch

from embedstore.defaults import autocast


def matmul_peak_gflops(device: torch.device, precision: str, *, threads: int = 1, seconds: float = 0.5) -> float:
    """GFLOP/s of a batched matmul of a 2-A head's largest shapes ((3, 128, 1280) @ (3, 1280, 500)), the best of
    a few timed repeats within about `seconds`, on `threads` CPU threads (or the GPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        G, B, K, N = 3, 128, 1280, 500
        if device.type == "cuda":
            G, B = 64, 4096   # a GPU needs far larger work per launch to reach its peak
        a = torch.randn(G, B, K, device=device)
        b = torch.randn(G, K, N, device=device)
        flops = 2 * G * B * K * N
        best, spent, reps = 0.0, 0.0, 4
        with torch.no_grad(), autocast(device, precision):
            torch.bmm(a, b)   # warm-up: kernel selection, allocation
            while spent < seconds:
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(reps):
                    torch.bmm(a, b)
                _sync(device)
                dt = time.perf_counter() - t0
                spent += dt
                best = max(best, reps * flops / dt / 1e9)
        return best
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput_line(summary: dict) -> str | None:
    """The sweep's closing line on its training matmuls (None when it trained nothing), from run_sweep's summary:
    "gflops" (every rank's recorded FLOPs over rank 0's wall time), "peak_gflops" (measured on rank 0, on its
    `jobs` cores), "precision", "device", "jobs", "ranks".

    The peak is a short measurement: the sweep can run above it (turbo clocks, other load while it was measured,
    ranks on other machines), so a share is given only up to it; above it the line says so, and never a share
    over 100 %. Under torchrun the sweep's rate is that of all ranks together, so it is set against the peak times
    the ranks (each rank assumed to have rank 0's cores)."""
    gflops, peak = summary.get("gflops"), summary.get("peak_gflops")
    if not gflops or not peak:
        return None
    ranks = int(summary.get("ranks") or 1)
    peak_all = peak * ranks
    rate = f"training matmuls: {gflops:.1f} GFLOP/s ({summary['precision']})"
    if ranks > 1:
        rate += f" over {ranks} ranks"
    where = (f"on the same {summary['jobs']} core(s)" if summary["device"] == "cpu" else f"on {summary['device']}")
    measured = f"{peak:.1f} GFLOP/s" + (f" x {ranks} ranks" if ranks > 1 else "")
    if gflops > peak_all:
        return f"{rate}, above the short matmul peak measured now ({measured} {where}), which understates this machine"
    if summary["device"] != "cpu":
        return f"{rate}; a matmul peak measured now: {measured} {where}"
    return f"{rate} = {100 * gflops / peak_all:.0f} % of a {measured} matmul peak measured now {where}"
