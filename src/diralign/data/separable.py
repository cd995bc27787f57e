"""Seeded linearly separable data: Gaussian points labelled by a random teacher
hyperplane through the origin, with points closer than ``margin`` to it removed
(rejection sampling, so exactly ``n`` points come back)."""

from __future__ import annotations

import torch


def separable_gaussian(n: int, d: int, margin: float = 0.1, seed: int = 0, dtype=torch.float64):
    if n < 2 or d < 1:
        raise ValueError("need n >= 2 and d >= 1")
    gen = torch.Generator().manual_seed(int(seed))
    teacher = torch.randn(d, generator=gen, dtype=torch.float64)
    teacher /= teacher.norm()
    kept = []
    count = 0
    while count < n:
        X = torch.randn(4 * n, d, generator=gen, dtype=torch.float64)
        X = X[(X @ teacher).abs() >= margin]
        kept.append(X)
        count += X.shape[0]
    X = torch.cat(kept)[:n]
    y = torch.sign(X @ teacher)
    # Both classes must be present for a max-margin problem to be meaningful.
    if (y > 0).all() or (y < 0).all():
        y[0] = -y[0]
        X[0] = -X[0]
    return X.to(dtype), y.to(dtype)
