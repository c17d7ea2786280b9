"""ciss: class-incremental semantic segmentation that learns new classes without forgetting."""

from ciss.errors import CheckFailed, CissError

__version__ = "0.1.0"
__all__ = ["CissError", "CheckFailed", "__version__"]
