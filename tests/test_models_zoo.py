"""diralign.models: H-AlexNet and the torchvision nets of Figures 2 and 3."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diralign.models import build_model, homogeneity_degree


def test_h_alexnet_is_the_bias_free_tutorial_net_of_degree_5():
    torch.manual_seed(0)
    net = build_model("h-alexnet", num_classes=10).double()
    # The tutorial net has 62,006 parameters; its 6+16+120+84+10 biases are gone.
    assert sum(p.numel() for p in net.parameters()) == 62_006 - 236
    assert not any(name.endswith("bias") for name, _ in net.named_parameters())
    x = torch.randn(16, 3, 32, 32, dtype=torch.float64)
    report = homogeneity_degree(net, x)
    assert report.homogeneous and report.degree == 5 and report.declared == 5
    assert report.violation < 1e-12
    # Independently: scale every weight by c and compare with c^5 f.
    with torch.no_grad():
        base = net(x)
        for p in net.parameters():
            p.mul_(1.7)
        np.testing.assert_allclose(net(x).numpy(), 1.7**5 * base.numpy(), rtol=1e-12, atol=1e-12 * float(base.abs().max()) * 1.7**5)


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_torchvision_nets_are_unmodified_and_not_homogeneous(name):
    import torchvision

    torch.manual_seed(0)
    net = build_model(name, num_classes=10)
    reference = getattr(torchvision.models, name)(weights=None, num_classes=10)
    assert [(n, p.shape) for n, p in net.named_parameters()] == [(n, p.shape) for n, p in reference.named_parameters()]
    assert net.homogeneity_degree is None and not net.training
    report = homogeneity_degree(net, torch.randn(2, 3, 32, 32))  # float32: DenseNet overflows c^k
    assert not report.homogeneous and report.degree is None
