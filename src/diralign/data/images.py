"""Image data for the margin experiments (paper Fig. 2/3): CIFAR-10, digits, synthetic, .npz.

    diralign run margins --set data=cifar10 --set data_root=~/data --download --set subset=5000

Sources (``--set data=...``):

* ``cifar10``: the 50,000 training images, read from torchvision's on-disk layout
  ``DATA_ROOT/cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``)
  by ``torchvision.datasets.CIFAR10``; ``--download`` fetches it (the archive's checksum
  is verified).  The unpacked files are checked for presence, not md5, so that a folder
  written by other tools (or the tests) in the same format is read as is.
* ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, upsampled bilinearly to
  32x32 and repeated over 3 channels, so the CIFAR networks run with no download.
* ``synthetic-images``: ``n`` seeded standard-normal 3x32x32 images with seeded uniform
  random labels (a pure memorisation task).
* ``PATH.npz``: the user's arrays ``X`` ``[n, C, H, W]`` (or ``[n, d]``) and labels ``y``.

Normalisation: CIFAR pixels are divided by 255 and digits by 16 (to ``[0, 1]``), then each
channel is standardised to mean 0 and standard deviation 1 with the statistics of the
whole split that was read (computed before subsetting, so choosing a subset does not
change the transform; for CIFAR-10 these are the usual per-channel constants).  Synthetic
images are already standard normal.  ``.npz`` data are used exactly as given: the user
owns their preprocessing.

``subset=N`` keeps a class-balanced, seeded subset of ``N`` examples (classes take turns;
a class that runs out drops out of the rotation), in the original order.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

IMAGE_SOURCES = ("cifar10", "digits", "synthetic-images")
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


@dataclass
class ImageData:
    X: torch.Tensor  # [n, C, H, W] (or [n, d] for .npz feature vectors), on the CPU
    y: np.ndarray  # labels as read: class indices, or ±1 from an .npz file
    num_classes: int  # logits the model should produce
    info: dict = field(default_factory=dict)


def standardize_channels(images: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std of ``images / scale`` over the whole array ``[n, C, H, W]``.

    Accumulated in float64 without a float copy of the array (CIFAR-10 is 150M pixels).
    """
    mean = images.mean(axis=(0, 2, 3), dtype=np.float64) / scale
    mean_sq = np.stack([np.mean(np.square(images[:, c], dtype=np.float64)) for c in range(images.shape[1])]) / scale**2
    std = np.sqrt(np.maximum(mean_sq - mean**2, 0.0))
    return mean, np.where(std > 0, std, 1.0)


# Images converted per block: the float64 temporaries of one block (~100 MB), never of the whole
# set (CIFAR-10 in float64 is 1.2 GB, and each arithmetic step would make another).
CONVERT_BLOCK = 4096


def _normalized(images: np.ndarray, scale: float, mean: np.ndarray, std: np.ndarray, dtype) -> torch.Tensor:
    """``(images / scale - mean) / std`` in float64, stored as ``dtype``, block by block."""
    images = np.asarray(images)
    out = torch.empty(images.shape, dtype=dtype)
    mean_t = torch.as_tensor(mean)[None, :, None, None]
    std_t = torch.as_tensor(std)[None, :, None, None]
    for a in range(0, len(images), CONVERT_BLOCK):
        x = torch.as_tensor(images[a : a + CONVERT_BLOCK], dtype=torch.float64) / scale
        out[a : a + CONVERT_BLOCK] = ((x - mean_t) / std_t).to(dtype)
    return out


# -- CIFAR-10 ---------------------------------------------------------------------------
def _cifar_class():
    from torchvision.datasets import CIFAR10

    class CIFAR10Files(CIFAR10):
        """torchvision's reader with presence checks instead of md5s of the unpacked files."""

        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = dict(CIFAR10.meta, md5=None)

    return CIFAR10Files


def cifar10_raw(root, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR-10 training split as uint8 ``[50000, 3, 32, 32]`` and int64 labels."""
    root = Path(root).expanduser()
    how = f"download it with: diralign run margins --download --set data=cifar10 --set data_root={root}"
    folder = root / CIFAR_FOLDER
    if not download:
        missing = [name for name in CIFAR_FILES if not (folder / name).is_file()]
        if missing:
            what = "not found" if len(missing) == len(CIFAR_FILES) else f"incomplete (missing {', '.join(missing)})"
            raise UserError(f"CIFAR-10 {what} in {folder}; {how}, or unpack cifar-10-python.tar.gz into {root}")
    try:
        dataset = _cifar_class()(root=str(root), train=True, download=download)
    except (RuntimeError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if download:
            how = f"check the internet connection, or fetch {_cifar_class().url} yourself and unpack it into {root}"
        raise UserError(f"cannot read CIFAR-10 from {folder} ({reason}); {how}") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as exc:
        raise UserError(
            f"CIFAR-10 files in {folder} are corrupt or truncated ({type(exc).__name__}); delete the folder and {how}"
        ) from None
    images = np.ascontiguousarray(np.asarray(dataset.data).transpose(0, 3, 1, 2))
    labels = np.asarray(dataset.targets, dtype=np.int64)
    if images.shape[1:] != (3, 32, 32) or labels.shape[0] != images.shape[0]:
        raise UserError(f"CIFAR-10 in {folder} has unexpected shapes {images.shape} / {labels.shape}; {how}")
    return images, labels


def cifar10(root, download: bool = False, subset: int = 0, seed: int = 0, dtype=torch.float64) -> ImageData:
    images, labels = cifar10_raw(root, download)
    mean, std = standardize_channels(images, 255.0)
    index = class_balanced_subset(labels, subset, seed)
    X = _normalized(images[index], 255.0, mean, std, dtype)
    info = {"data": "cifar10", "data_root": str(Path(root).expanduser()), "n_available": int(len(labels))}
    return ImageData(X, labels[index], 10, info)


# -- digits and synthetic ---------------------------------------------------------------
def digits(subset: int = 0, seed: int = 0, dtype=torch.float64, size: int = 32) -> ImageData:
    """scikit-learn's 8x8 digits, bilinearly upsampled to ``size`` x ``size`` x 3."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    small = torch.as_tensor(raw.images, dtype=torch.float64)[:, None]  # [n, 1, 8, 8], values 0..16
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    images = big.repeat(1, 3, 1, 1).numpy()
    labels = np.asarray(raw.target, dtype=np.int64)
    mean, std = standardize_channels(images, 16.0)
    index = class_balanced_subset(labels, subset, seed)
    X = _normalized(images[index], 16.0, mean, std, dtype)
    return ImageData(X, labels[index], 10, {"data": "digits", "n_available": int(len(labels))})


def synthetic_images(n: int, seed: int = 0, dtype=torch.float64, classes: int = 10, shape=(3, 32, 32)) -> ImageData:
    """Seeded standard-normal images with seeded uniform random labels."""
    if n < 2:
        raise UserError(f"synthetic-images needs n >= 2, got n={n}")
    gen = torch.Generator().manual_seed(int(seed) + 4242)
    # Drawn in float64 block by block (the same stream as one call: checked in the tests),
    # so 50,000 images never exist in float64 at once.
    # (torch's CPU normal sampler works in groups of 16 values, so blocks of whole images
    # continue one stream exactly when an image holds a multiple of 16 values.)
    block = CONVERT_BLOCK if int(np.prod(shape)) % 16 == 0 else n
    X = torch.empty(n, *shape, dtype=dtype)
    for a in range(0, n, block):
        X[a : a + block] = torch.randn(min(block, n - a), *shape, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=gen).numpy().astype(np.int64)
    return ImageData(X, labels, classes, {"data": "synthetic-images", "n_available": int(n)})


# -- the user's .npz ---------------------------------------------------------------------
def npz_images(path, subset: int = 0, seed: int = 0, dtype=torch.float64) -> ImageData:
    """``X [n, C, H, W]`` (or ``[n, d]``) and labels ``y``: class indices 0..K-1, or ±1."""
    from .npz import load_npz

    X, y = load_npz(path, dtype=dtype, feature_ndim=(2, 4))
    y = np.asarray(y)
    if y.dtype.kind not in "iuf" or not np.all(np.isfinite(y.astype(np.float64))):
        raise UserError(f"{path}: y must hold finite numbers (class indices 0..K-1, or -1/+1), got dtype {y.dtype}")
    values = np.unique(y.astype(np.float64))
    if len(values) < 2:
        raise UserError(f"{path}: y holds a single class ({values[0]:g}); margins need at least two classes")
    if set(values.tolist()) <= {-1.0, 1.0}:
        num_classes = 2  # the model may answer with one output (binary) or two logits
    elif np.all(values == np.round(values)) and values.min() >= 0:
        num_classes = int(values.max()) + 1
    else:
        raise UserError(
            f"{path}: y must be class indices 0..K-1 or -1/+1, found values from {values.min():g} to {values.max():g}"
        )
    index = class_balanced_subset(y, subset, seed)
    return ImageData(X[torch.as_tensor(index)], y[index], num_classes, {"data": str(path), "n_available": int(len(y))})


def load_images(
    name: str, *, data_root="data", download=False, subset=0, n=1000, seed=0, dtype=torch.float64
) -> ImageData:
    """Dispatch on ``--set data=...``: a built-in source name, or a path to an ``.npz`` file."""
    if name == "cifar10":
        return cifar10(data_root, download=download, subset=subset, seed=seed, dtype=dtype)
    if name == "digits":
        return digits(subset=subset, seed=seed, dtype=dtype)
    if name == "synthetic-images":
        data = synthetic_images(n, seed=seed, dtype=dtype)
        if not subset:
            return data  # (indexing with all n would copy the whole set)
        index = class_balanced_subset(data.y, subset, seed)
        return ImageData(data.X[torch.as_tensor(index)], data.y[index], data.num_classes, data.info)
    if name.endswith(".npz") or Path(name).expanduser().is_file():
        return npz_images(Path(name).expanduser(), subset=subset, seed=seed, dtype=dtype)
    raise UserError(f"unknown data {name!r}; choose one of {', '.join(IMAGE_SOURCES)} or give a path to an .npz file")


# -- subsets -----------------------------------------------------------------------------
def class_balanced_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Indices of a seeded subset of ``size`` examples with class counts as equal as possible.

    Each class's examples are shuffled with the seed; classes then take turns (in a seeded
    order) contributing their next example.  ``size = 0`` keeps everything.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if size == 0:
        return np.arange(n)
    if size < 0 or size > n:
        raise UserError(f"subset={size} must be between 1 and the {n} examples available (0 keeps all)")
    rng = np.random.default_rng(int(seed) + 1013)
    classes = np.unique(labels)
    if size < len(classes):
        raise UserError(
            f"subset={size} is smaller than the {len(classes)} classes; a balanced subset needs at least one of each"
        )
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in rng.permutation(classes)]
    taken = []
    depth = 0
    while len(taken) < size:
        for pool in pools:
            if depth < len(pool) and len(taken) < size:
                taken.append(pool[depth])
        depth += 1
    return np.sort(np.asarray(taken, dtype=np.int64))
