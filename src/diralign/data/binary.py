"""Binary data for the linear experiments: the built-in separable set or the user's ``.npz``.

python -c "import torch; from diralign.data import binary_data; print(binary_data('separable', 8, 2, 0.1, 0, torch.float64)[2])"
"""

from __future__ import annotations

from ..errors import UserError
from .npz import load_npz, validate_binary
from .separable import separable_gaussian


def binary_data(data: str, n: int, d: int, data_margin: float, seed: int, dtype):
    """The built-in separable set, or the user's ``.npz`` (validated)."""
    if data == "separable":
        if n < 2 or d < 1:
            raise UserError(f"need n >= 2 and d >= 1 (got n={n}, d={d})")
        X, y = separable_gaussian(n, d, data_margin, seed, dtype=dtype)
        return X, y, {"data": "separable", "n": n, "d": d}
    X, y = load_npz(data, dtype=dtype)
    y = validate_binary(y, data).to(dtype)
    return X, y, {"data": str(data), "n": int(X.shape[0]), "d": int(X.shape[1])}
