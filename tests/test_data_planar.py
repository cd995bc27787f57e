"""diralign.data.planar: the planar teacher data of Figure 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diralign.data.planar import embed, make_teacher, planar_data, planar_teacher
from diralign.errors import UserError

F64 = torch.float64

EPS = torch.finfo(F64).eps


def test_teacher_data_is_seeded_labelled_and_thresholded():
    X, y = planar_teacher(80, margin_threshold=0.2, seed=3)
    X2, y2 = planar_teacher(80, margin_threshold=0.2, seed=3)
    assert torch.equal(X, X2) and torch.equal(y, y2)
    assert not torch.equal(X, planar_teacher(80, margin_threshold=0.2, seed=4)[0])
    assert X.shape == (80, 2) and X.abs().max() <= 1.0
    assert set(y.tolist()) == {-1.0, 1.0}
    # The teacher is the generator's first draw: rebuild it and check labels and deletion.
    teacher = make_teacher(8, torch.Generator().manual_seed(3))
    t = teacher(X)
    assert torch.equal(torch.sign(t), y)
    assert float(t.abs().min()) >= 0.2
    # Deletion really removes something: uniform points of the square fall below it.
    uniform = torch.rand(4000, 2, generator=torch.Generator().manual_seed(9), dtype=F64) * 2 - 1
    assert float((teacher(uniform).abs() < 0.2).double().mean()) > 0.02


def test_embedding_appends_a_constant_one():
    X, _ = planar_teacher(10, seed=0)
    Z = embed(X)
    assert Z.shape == (10, 3) and torch.equal(Z[:, :2], X) and torch.all(Z[:, 2] == 1.0)


def test_user_planar_npz(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, X=np.array([[0.1, 0.2], [-0.3, 0.4], [0.5, -0.6]]), y=np.array([1, -1, 1]))
    X, y, info = planar_data(str(good), n=0, margin_threshold=0.1, seed=0)
    assert X.shape == (3, 2) and y.tolist() == [1.0, -1.0, 1.0] and info["n"] == 3
    bad_dim = tmp_path / "bad_dim.npz"
    np.savez(bad_dim, X=np.zeros((3, 3)), y=np.array([1, -1, 1]))
    with pytest.raises(UserError, match=r"\[n, 2\]"):
        planar_data(str(bad_dim), 0, 0.1, 0)
    bad_labels = tmp_path / "bad_labels.npz"
    np.savez(bad_labels, X=np.zeros((3, 2)), y=np.array([0, 1, 1]))
    with pytest.raises(UserError, match="-1 or \\+1"):
        planar_data(str(bad_labels), 0, 0.1, 0)
