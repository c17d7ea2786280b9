"""Linear centred kernel alignment (Kornblith et al., 2019) between two representations.

``X`` [n, p] and ``Y`` [n, q] describe the same n examples. With column-centred matrices,
CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F): 1 for identical representations, invariant to
orthogonal transforms and isotropic scaling of either side, and defined when p != q (so a
parent's and a child's classifier outputs can be compared). The feature-space form costs
O(n (p^2 + q^2)), cheap for the few thousand sampled pixels the diagnosis uses.
"""

from __future__ import annotations

import numpy as np


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two [n, features] matrices (rows = the same examples).

    Raises:
        ValueError: different numbers of rows, fewer than 2 rows.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs [n, p] and [n, q] with the same n, got {x.shape} and "
                         f"{y.shape}")
    if x.shape[0] < 2:
        raise ValueError("CKA needs at least 2 examples")
    x = x.astype(np.float64) - x.mean(axis=0, keepdims=True)
    y = y.astype(np.float64) - y.mean(axis=0, keepdims=True)
    cross = np.linalg.norm(y.T @ x) ** 2
    norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    if norm == 0.0:  # a constant representation carries no similarity structure
        return float("nan")
    return float(cross / norm)
