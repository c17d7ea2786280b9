"""Importing ONNX Runtime with a clear word when the installation is wrong.

``onnxruntime`` and ``onnxruntime-gpu`` are two distributions of one module: installed together
they overwrite each other's files, so which providers exist depends on install order (the CUDA
provider silently missing is the usual result). ciss installs exactly one (extras ``cpu`` or
``gpu``) and refuses to run on a mix.
"""

from __future__ import annotations

from importlib import metadata

from ciss.errors import CissError

FIX = ("pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'ciss[gpu]' (or "
       "'ciss[cpu]'); 'make gpu' does it for the project's venv")


def installed_distributions() -> list[str]:
    """Which ONNX Runtime distributions pip installed."""
    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(name)
            found.append(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def import_onnxruntime():
    """The ``onnxruntime`` module.

    Raises:
        CissError: it is missing, or both distributions are installed.
    """
    dists = installed_distributions()
    if len(dists) > 1:
        raise CissError(f"both onnxruntime and onnxruntime-gpu are installed; they shadow each "
                        f"other and the CUDA provider may be missing. Fix: {FIX}")
    try:
        import onnxruntime
    except ImportError as exc:
        raise CissError("ONNX Runtime is not installed: pip install 'ciss[cpu]' (or "
                        "'ciss[gpu]' on an NVIDIA machine)") from exc
    return onnxruntime
