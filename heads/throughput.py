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
