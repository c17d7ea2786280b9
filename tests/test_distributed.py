"""``torchrun --nproc_per_node=2 -m ciss ...``: two CPU processes with gloo, rank 0 writes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ciss.store import Store
from tests.conftest import free_port


def torchrun(*args, nproc: int = 2, timeout: float = 300, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CISS_DIST_TIMEOUT_S": "120"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def test_train_and_add_classes_under_torchrun(split_dir, tmp_path):
    root = tmp_path / "store"
    proc = torchrun("-m", "ciss", "train", "--data", split_dir / "step-0", "--store", root,
                    "--epochs", "2", "--batch-size", "4", "--quiet")
    out = finish(proc)
    assert proc.returncode == 0, out
    store = Store(root)
    assert store.steps() == [0]
    assert out.count("step 0: tiny") == 1  # only rank 0 reports
    card = store.card(0)
    assert card.extra["run"]["world_size"] == 2 and card.extra["run"]["global_batch_size"] == 8
    history = card.extra["history"]
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
    # each rank sees half the training images, in batches of 4, for 2 epochs
    n = card.data["train_images"]
    assert card.timings["iterations"] == 2 * ((n // 2) // 4)
    assert all(v is None or 0.0 <= v <= 1.0 for v in card.retention["0"]["torch"].values())
    store.verify(0)

    proc = torchrun("-m", "ciss", "add-classes", "--data", split_dir / "step-1", "--store", root,
                    "--epochs", "1", "--batch-size", "4", "--quiet")
    out = finish(proc)
    assert proc.returncode == 0, out
    assert store.steps() == [0, 1] and store.card(1).extra["run"]["world_size"] == 2
    # mib's default pre-tuning ran under DDP too (its importance sums all-reduced)
    assert store.card(1).extra["pretune"]["iterations"] >= 1
    assert not list((root / ".staging").glob("*")) if (root / ".staging").exists() else True


AGREE = """
import sys
from pathlib import Path
import torch
from ciss.errors import CissError
from ciss.updater.distributed import agree, check_shared_store, distributed

with distributed(torch.device("cpu")) as (info, _):
    agree(info, "the settings", "same")  # agreeing ranks pass
    try:
        agree(info, "the parent step", info.rank)
    except CissError as exc:
        print(f"rank{info.rank}: {exc}", flush=True)
    root = Path(sys.argv[1]) / f"rank{info.rank}"  # each rank its own folder: not shared
    try:
        check_shared_store(info, root, root / ".work")
    except CissError as exc:
        print(f"rank{info.rank}: {exc}", flush=True)
"""


def test_ranks_that_disagree_or_do_not_share_the_store_fail_clearly(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    proc = torchrun(script, tmp_path)
    out = finish(proc)
    assert proc.returncode == 0, out
    for rank in (0, 1):
        assert (f"rank{rank}: ranks disagree about the parent step: rank 0 has 0, rank 1 has 1"
                in out), out
        assert f"rank{rank}: " in out and "cannot see the store rank 0 writes to" in out


TEARDOWN = """
import os
import torch
from torch.nn.parallel import DistributedDataParallel
from ciss.updater.distributed import distributed

with distributed(torch.device("cpu")) as (info, _):
    ddp = DistributedDataParallel(torch.nn.Conv2d(3, 4, 3))
    ddp(torch.randn(2, 3, 8, 8)).mean().backward()
    del ddp
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(f"rank{info.rank} gloo threads left: {sum('gloo' in n for n in names)}", flush=True)
"""


def test_the_process_group_dies_with_the_context(tmp_path):
    """A group DistributedDataParallel used must be freed on exit from ``distributed()``:
    gloo threads that outlive Python abort the process at exit, after the step was written."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs Linux /proc to count threads")
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN)
    proc = torchrun(script)
    out = finish(proc)
    assert proc.returncode == 0, out
    for rank in (0, 1):
        assert f"rank{rank} gloo threads left: 0" in out, out


def _worker_pids(parent: int) -> list[int]:
    kids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                kids.append(int(p.name))
    return kids


def _rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return item[5:].decode()
    return None


def test_a_rank_crash_mid_training_writes_no_step(split_dir, tmp_path):
    root = tmp_path / "store"
    proc = torchrun("-m", "ciss", "train", "--data", split_dir / "step-0", "--store", root,
                    "--epochs", "200", "--batch-size", "4", "--checkpoint-every", "0",
                    "--quiet")
    deadline = time.monotonic() + 120
    while not list((root / ".work").glob("train-*/*.json")):  # an epoch checkpoint exists
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.1)
    rank1 = [p for p in _worker_pids(proc.pid) if _rank_of(p) == "1"]
    assert rank1, "no rank-1 worker found"
    os.kill(rank1[0], signal.SIGKILL)
    out = finish(proc, timeout=180)
    assert proc.returncode != 0
    assert "FAILED" in out or "failed" in out.lower(), out
    assert Store(root).steps() == []  # nothing half-written: no step at all
    staged = list((root / ".staging").glob("*")) if (root / ".staging").exists() else []
    assert staged == []
    ckpt = list((root / ".work").glob("train-*"))
    assert ckpt and json.loads(next(ckpt[0].glob("*.json")).read_text())  # resumable
