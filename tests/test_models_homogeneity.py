"""diralign.models.homogeneity: the degree is measured, not taken on trust."""

import torch
from torch import nn

from diralign.models import DeepLinear, LinearModel, homogeneity_degree


def test_homogeneity_degrees():
    x = torch.randn(20, 5, dtype=torch.float64)
    assert homogeneity_degree(LinearModel(5).double(), x).degree == 1
    for widths in [(4,), (6, 3), (3, 3, 3)]:
        report = homogeneity_degree(DeepLinear(5, widths).double(), x)
        assert report.degree == len(widths) + 1 and report.homogeneous
        assert report.violation < 1e-12
    relu = nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 1, bias=False)).double()
    assert homogeneity_degree(relu, x).degree == 2


def test_bias_model_is_not_homogeneous():
    torch.manual_seed(0)
    x = torch.randn(20, 5, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 1)).double()
    report = homogeneity_degree(model, x)
    assert not report.homogeneous and report.degree is None
    assert report.violation > 1e-3
    assert "not homogeneous" in report.verdict()
