"""Timing helpers shared by the benchmark scripts (run them as ``python benchmarks/X.py``).

Example
-------
>>> from bench_timing import best_time, gemm_rate
>>> gemm_rate(256, 64, 64) > 0
True
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Shortest wall time [s] of ``repeats`` calls of ``fn``."""
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_rate(n: int, k: int, m: int, *, device: str = "cpu", repeats: int = 5) -> float:
    """Sustained float32 matrix-multiply rate [FLOP/s] of an (n, k) @ (k, m) product."""
    import torch

    a = torch.randn(n, k, device=device)
    b = torch.randn(k, m, device=device)

    def product() -> None:
        a @ b
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    product()  # warm-up
    return 2.0 * n * k * m / best_time(product, repeats)
