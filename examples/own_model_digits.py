"""Your own network through diralign: a small bias-free CNN on sklearn's 8x8 digits.

    python examples/own_model_digits.py --out runs/own-digits

Defines a CNN in a few lines, probes it as initialised, trains it with ``diralign.train``
to ``ln(n/L) = 30`` (risk ``L = n e^-30``), prints the verdict and draws the figures.
The CNN is conv -> ReLU -> max-pool -> linear with no biases, so it is positively
homogeneous of degree 2 in its weights and the paper's directional convergence applies;
ReLU and max-pool have kinks on 480 units per example (57,600 over the data, more than the
5,000 up to which ``dynamics="auto"`` takes the sliding flow), so it picks normalised GD.  No download:
the digits ship with scikit-learn.  Runs in a few seconds on one core.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import diralign


class SmallCNN(nn.Module):
    """conv(1->6, 3x3) -> ReLU -> max-pool 2 -> linear(96 -> classes); no biases."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, num_classes, bias=False)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def digits_subset(classes=(0, 1, 2), per_class: int = 40, seed: int = 0):
    """A seeded class-balanced subset: images [n, 1, 8, 8] in [0, 1], labels 0..K-1."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.permutation(np.flatnonzero(digits.target == c))[:per_class] for c in classes])
    X = torch.tensor(digits.images[keep][:, None] / 16.0, dtype=torch.float64)
    y = torch.tensor([classes.index(int(t)) for t in digits.target[keep]])
    return X, y


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="run directory (default: a new temporary directory)")
    parser.add_argument("--target", type=float, default=30.0, help="train to this ln(n/L)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    X, y = digits_subset()
    model = SmallCNN(num_classes=3)

    before = diralign.probe(model, X, y)
    print("as initialised:", before["verdict"])

    run = diralign.train(model, X, y, target_ln_n_over_L=args.target, out=args.out, force=True, quiet=args.quiet)
    after = diralign.probe(run.model, X, y)
    print("trained:       ", after["verdict"])
    print("verdict:       ", run.verdict())
    figures = run.plot()
    print(f"run directory {run.path} ({len(figures)} figure files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
