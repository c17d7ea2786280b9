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


def run_torchrun(procs: int, args: list[str]):
    """``python -m torch.distributed.run --nproc_per_node=procs -m ciss ARGS`` on a free port,
    the cores split between the ranks; returns (completed process, wall seconds)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // procs)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
           f"--master_port={port}", "-m", "ciss", *map(str, args)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return res, time.perf_counter() - t0
