"""Data sources: seeded synthetic sets, user ``.npz`` files, image sets."""

from .binary import binary_data
from .npz import load_npz, validate_binary, validate_features
from .separable import separable_gaussian

__all__ = ["binary_data", "load_npz", "separable_gaussian", "validate_binary", "validate_features"]
