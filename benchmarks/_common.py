"""Shared helpers for the benchmark scripts: machine facts and a matmul peak probe."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from ciss.timing import median_ms  # noqa: F401  (re-exported for the scripts)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cpus, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Median fp32 matmul throughput (the 'peak' that achieved GFLOPS are compared with)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9
