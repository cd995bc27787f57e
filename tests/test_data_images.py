"""diralign.data.images: CIFAR-10 in torchvision's layout, digits, class-balanced subsets."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from diralign.cli import main
from diralign.data import images
from diralign.data.images import CIFAR_FOLDER, cifar10, cifar10_raw, class_balanced_subset, digits
from diralign.errors import UserError


def write_tiny_cifar(root, per_batch=6, seed=0):
    """``root/cifar-10-batches-py`` as the real archive unpacks: five training batches, a
    test batch and ``batches.meta``, each a pickled dict with ``data`` uint8 [N, 3072]
    (all red, then green, then blue 32x32 planes) and ``labels``.  Returns the training
    images [5 * per_batch, 3, 32, 32] and labels that were written."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR_FOLDER
    folder.mkdir(parents=True)
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        batch_labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        entry = {"batch_label": f"{name} of 6", "labels": batch_labels, "data": data, "filenames": [f"img{i}.png" for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        if name != "test_batch":
            images.append(data.reshape(per_batch, 3, 32, 32))
            labels += batch_labels
    meta = {"num_cases_per_batch": per_batch, "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"], "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return np.concatenate(images), np.asarray(labels)


def test_cifar10_reader_reads_torchvision_layout(tmp_path):
    images, labels = write_tiny_cifar(tmp_path)
    raw, raw_labels = cifar10_raw(tmp_path)
    assert raw.dtype == np.uint8 and raw.shape == (30, 3, 32, 32)
    np.testing.assert_array_equal(raw, images)  # pixel planes in the right channel order
    np.testing.assert_array_equal(raw_labels, labels)
    data = cifar10(tmp_path, dtype=torch.float64)
    X = data.X.numpy()
    expected = images / 255.0
    mean = expected.mean(axis=(0, 2, 3))
    std = expected.std(axis=(0, 2, 3))
    np.testing.assert_allclose(X, (expected - mean[None, :, None, None]) / std[None, :, None, None], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(X.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)
    np.testing.assert_allclose(X.std(axis=(0, 2, 3)), 1.0, rtol=1e-12)


def test_cifar10_missing_or_partial_is_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "margins", "--set", "data=cifar10", "--set", f"data_root={tmp_path}", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(tmp_path / CIFAR_FOLDER) in err and "--download" in err and "not found" in err
    assert not out.exists() or not any(out.iterdir())
    write_tiny_cifar(tmp_path)
    (tmp_path / CIFAR_FOLDER / "data_batch_3").unlink()
    with pytest.raises(UserError, match="missing data_batch_3"):
        cifar10_raw(tmp_path)
    (tmp_path / CIFAR_FOLDER / "data_batch_3").write_bytes(b"\x80\x02}q\x00")  # cut short
    with pytest.raises(UserError, match="corrupt or truncated"):
        cifar10_raw(tmp_path)


def test_class_balanced_subset():
    labels = np.repeat(np.arange(4), [50, 30, 12, 15])
    index = class_balanced_subset(labels, 40, seed=3)
    assert len(index) == 40 and len(set(index.tolist())) == 40 and np.all(np.diff(index) > 0)
    np.testing.assert_array_equal(np.bincount(labels[index]), [10, 10, 10, 10])
    # Classes 2 and 3 run out (12 and 15 examples) and drop out of the rotation.
    np.testing.assert_array_equal(np.bincount(labels[class_balanced_subset(labels, 61, seed=3)]), [17, 17, 12, 15])
    np.testing.assert_array_equal(class_balanced_subset(labels, 40, seed=3), index)
    assert not np.array_equal(class_balanced_subset(labels, 40, seed=4), index)
    with pytest.raises(UserError):
        class_balanced_subset(labels, 108)
    d = digits(subset=105, seed=0)
    assert d.X.shape == (105, 3, 32, 32) and set(np.bincount(d.y).tolist()) <= {10, 11}
    assert np.isfinite(d.X.numpy()).all()


# -- issue 13: CIFAR scale without float64 copies of the whole set -------------------------------
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
