"""Image data at CIFAR scale (issue 13): block-wise conversion gives the same numbers as the
whole-array computation it replaced, without its float64 copies of the whole set."""

import numpy as np
import torch

from diralign.data import images


def test_blockwise_normalisation_equals_whole_array(monkeypatch):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(23, 3, 4, 4), dtype=np.uint8)
    mean, std = images.standardize_channels(raw, 255.0)
    whole = ((torch.as_tensor(raw, dtype=torch.float64) / 255.0 - torch.as_tensor(mean)[None, :, None, None])
             / torch.as_tensor(std)[None, :, None, None])
    monkeypatch.setattr(images, "CONVERT_BLOCK", 5)  # 23 = 4 full blocks and a partial one
    for dtype in (torch.float64, torch.float32):
        assert torch.equal(images._normalized(raw, 255.0, mean, std, dtype), whole.to(dtype))


def test_synthetic_images_are_one_seeded_stream_whatever_the_block(monkeypatch):
    gen = torch.Generator().manual_seed(7 + 4242)  # what synthetic_images(seed=7) used to draw in one call
    X = torch.randn(11, 3, 32, 32, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (11,), generator=gen).numpy()
    monkeypatch.setattr(images, "CONVERT_BLOCK", 4)
    data = images.synthetic_images(11, seed=7, dtype=torch.float32)
    assert torch.equal(data.X, X.float()) and np.array_equal(data.y, labels)
    full = images.load_images("synthetic-images", n=11, seed=7, dtype=torch.float32)
    assert torch.equal(full.X, data.X)  # subset=0 keeps the tensor as drawn (no indexed copy)
