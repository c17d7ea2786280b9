"""TensorRT plans behind the engine interface (TensorRT 10+ name-based tensor API).

Needs an NVIDIA GPU: elsewhere every entry point raises a clear error. The optimisation profile
a plan is built with must cover every shape the server can send it: images of 8 px to the
serving resize's longer side (1024), batches up to the server's batch limit (16). A shape
outside the plan's profile is refused with :class:`OutOfProfile` (a 4xx at the server), never
passed to TensorRT.

Plans are built from the logits-only graph (``exporters.tensorrt``): the ``labels`` output is
an argmax taken here, on the GPU, from the logits the plan wrote there. So only what a request
asks for crosses to the host (a labels-only request copies N x H x W bytes, never the
K x N x H x W floats), and the plan needs neither ONNX's int64 ArgMax nor a Cast to uint8,
whose TensorRT support has varied by version (and TopK-based ArgMax is slow on large masks:
onnx-tensorrt #669, #792).
"""

from __future__ import annotations

import queue
import re
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ciss.errors import CheckFailed, CissError
from ciss.store.store import WEIGHTS


class OutOfProfile(CissError):
    """An input shape the plan's optimisation profile does not cover."""


@dataclass(frozen=True)
class Profile:
    """Optimisation profile: (N, H, W) at min, opt and max.

    The defaults match what ``ciss serve`` can send: sides from 8 px (smaller images are
    refused) to 1024 (the serving resize) and batches of up to 16 (the /infer limit).
    """

    min: tuple[int, int, int] = (1, 8, 8)
    opt: tuple[int, int, int] = (1, 512, 512)
    max: tuple[int, int, int] = (16, 1024, 1024)

    def key(self) -> str:
        return "-".join("x".join(map(str, s)) for s in (self.min, self.opt, self.max))

    def covers(self, shape: tuple[int, ...]) -> bool:
        """Whether an [N, 3, H, W] input fits between min and max."""
        n, _, h, w = shape
        return all(lo <= v <= hi for v, lo, hi in zip((n, h, w), self.min, self.max))

    @classmethod
    def from_key(cls, key: str) -> Profile:
        mins, opts, maxs = (tuple(int(v) for v in part.split("x")) for part in key.split("-"))
        return cls(mins, opts, maxs)


def require_trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise CissError("TensorRT is not installed: pip install -e '.[tensorrt]' on a machine "
                        "with an NVIDIA GPU") from exc
    import torch

    if not torch.cuda.is_available():
        raise CissError("TensorRT needs an NVIDIA GPU and none is visible; export onnx instead")
    return trt


def plan_prefix(trt_version: str) -> str:
    """``engines/<gpu>-cc<major><minor>-trt<version>-``: plans for this GPU and TensorRT."""
    import torch

    name = gpu_slug(torch.cuda.get_device_name())
    cc = "".join(map(str, torch.cuda.get_device_capability()))
    return f"engines/{name}-cc{cc}-trt{trt_version}-"


PLAN_NAME = re.compile(r"^engines/(?P<gpu>.+)-cc(?P<cc>\d+)-trt(?P<trt>[\w.]+?)-"
                       r"(?P<precision>fp16|fp32|int8)-(?P<profile>[\dx-]+)\.plan$")


def parse_plan_name(name: str) -> dict[str, str] | None:
    """``engines/<gpu>-cc<cc>-trt<ver>-<precision>-<profile>.plan`` -> its parts (None when
    ``name`` is not a plan's artifact name)."""
    m = PLAN_NAME.match(name)
    return m.groupdict() if m else None


def gpu_slug(name: str) -> str:
    """A GPU's name as plan names spell it (``NVIDIA H100 80GB HBM3`` -> underscores)."""
    return name.replace(" ", "_").replace("/", "_")


def engine_key(precision: str, profile: Profile) -> str:
    """``<gpu>-cc<major><minor>-trt<version>-<precision>-<profile>``: one plan per key."""
    trt = require_trt()
    return plan_prefix(trt.__version__)[len("engines/"):] + f"{precision}-{profile.key()}"


class TensorRTEngine:
    """A deserialized plan run on torch CUDA buffers.

    An execution context holds per-inference state (input shapes, tensor addresses), so
    concurrent runs each take their own context and CUDA stream from a pool of ``contexts``.
    """

    def __init__(self, plan: Path, profile: Profile, *, contexts: int = 1,
                 device: str = "cuda") -> None:
        trt = require_trt()
        import torch

        self.path = Path(plan)
        self.profile = profile
        self.torch = torch
        self.device = device
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise CissError(f"{plan}: TensorRT cannot deserialize this plan (other GPU or "
                            "TensorRT version?); rebuild it with 'ciss export --format tensorrt'")
        self._pool: queue.Queue = queue.Queue()
        self._made = 0
        self._limit = max(1, contexts)
        self._lock = threading.Lock()
        self.dtypes = {"logits": torch.float32, "labels": torch.uint8}
        # plans built before ciss took the argmax itself also have a "labels" output
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in ("logits", "labels") if n in names]
        if "logits" not in self.outputs:
            raise CissError(f"{plan}: the plan has no 'logits' output (outputs: "
                            f"{', '.join(names)}); rebuild it with 'ciss export --format "
                            "tensorrt'")

    def _context(self):
        """A free (context, stream) pair; a new one while fewer than ``contexts`` exist."""
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            with self._lock:
                make = self._made < self._limit
                self._made += make
            if not make:
                return self._pool.get()
            stream = self.torch.cuda.Stream() if self.device.startswith("cuda") else None
            return self.engine.create_execution_context(), stream

    def run(self, images: np.ndarray, outputs: tuple[str, ...] = ("logits", "labels")
            ) -> dict[str, np.ndarray]:
        """uint8 [N,3,H,W] -> the named outputs of {"logits", "labels"}, on the host.

        Only the outputs asked for are copied from the GPU; labels are the argmax of the
        logits, taken on the GPU (uint8).

        Raises:
            OutOfProfile: the shape is outside the plan's optimisation profile.
            CheckFailed: TensorRT refused the shape or failed to execute.
        """
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[1] != 3 or not self.profile.covers(shape):
            raise OutOfProfile(
                f"input of shape {list(shape)} is outside the TensorRT plan's profile "
                f"(batch {self.profile.min[0]}-{self.profile.max[0]}, sides "
                f"{self.profile.min[1]}-{self.profile.max[1]} px)")
        torch = self.torch
        context, stream = self._context()
        try:
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).to(self.device)
            # set_input_shape reports a shape it cannot take by returning False
            if not context.set_input_shape("image", shape):
                raise CheckFailed(f"{self.path.name}: TensorRT refused input shape "
                                  f"{list(shape)}")
            context.set_tensor_address("image", x.data_ptr())
            outs = {}
            for name in self.outputs:
                dims = tuple(context.get_tensor_shape(name))
                outs[name] = torch.empty(dims, dtype=self.dtypes[name], device=self.device)
                context.set_tensor_address(name, outs[name].data_ptr())
            handle = stream.cuda_stream if stream is not None else 0
            if not context.execute_async_v3(handle):
                raise CheckFailed(f"{self.path.name}: TensorRT execution failed")
            with (torch.cuda.stream(stream) if stream is not None else nullcontext()):
                if "labels" in outputs and "labels" not in outs:
                    outs["labels"] = outs["logits"].argmax(dim=1).to(torch.uint8)
                host = {k: outs[k].to("cpu", non_blocking=False) for k in outputs}
            if stream is not None:
                stream.synchronize()
            return {k: v.numpy() for k, v in host.items()}
        finally:
            self._pool.put((context, stream))

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        return self.run(images, outputs=("labels",))["labels"]

    def describe(self) -> str:
        return f"TensorRT {self.path.name}"


def choose_plan(names: list[str], prefix: str, mtimes: dict[str, float],
                profile: Profile = Profile()) -> str | None:
    """The plan to serve among a step's artifacts: the one built for ``profile`` when there is
    one (fp16 before fp32 before int8: INT8 serves only when it is the only plan), else the
    most recently built (by file time, not by name: names sort by GPU, version and profile,
    which says nothing about age)."""
    plans = [n for n in names if n.startswith(prefix) and n.endswith(".plan")]
    exact = [n for n in plans if n.endswith(f"-{profile.key()}.plan")]
    if exact:
        rank = {"fp16": 0, "fp32": 1, "int8": 2}
        return min(exact, key=lambda n: rank.get((parse_plan_name(n) or {}).get(
            "precision", ""), 3))
    return max(plans, key=lambda n: mtimes.get(n, 0.0)) if plans else None


def choose_stored_plan(store, step: int, names: list[str], prefix: str) -> str | None:
    """:func:`choose_plan` among ``names`` of a stored step, by the files' times."""
    mtimes = {n: (store.step_dir(step) / n).stat().st_mtime for n in names
              if (store.step_dir(step) / n).exists()}
    return choose_plan(names, prefix, mtimes)


def load_tensorrt_engine(store, step: int, contexts: int = 1) -> TensorRTEngine:
    """The verified plan of the step for this GPU and TensorRT (see :func:`choose_plan`),
    with a pool of ``contexts`` execution contexts (the server's concurrency)."""
    trt = require_trt()
    card = store.card(step)
    prefix = plan_prefix(trt.__version__)
    names = [n for n in card.artifacts if n.startswith(prefix)]
    plan = choose_stored_plan(store, step, names, prefix)
    if plan is None:
        pruned = card.pruned_message(WEIGHTS, store.step_dir(step) / WEIGHTS)
        raise CissError(pruned or f"step {step} has no TensorRT plan for this GPU and TensorRT "
                        f"{trt.__version__}; run 'ciss export --step {step} --format tensorrt'")
    store.verify(step, [plan])
    profile = Profile.from_key(plan[len(prefix):-len(".plan")].split("-", 1)[1])
    return TensorRTEngine(store.step_dir(step) / plan, profile, contexts=contexts)
