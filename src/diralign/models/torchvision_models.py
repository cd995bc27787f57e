"""torchvision's DenseNet-121 and ResNet-18, unmodified, ``num_classes=10``, random init.

    python -c "import diralign.models as m; print(sum(p.numel() for p in m.build_model('resnet18').parameters()))"

They are outside the paper's theory (biases, batch norm, skip connections), which is why
the paper uses them (Fig. 2b, Fig. 3): each instance declares ``homogeneity_degree = None``
so margins are normalised by the median nonnegative margin instead of ``||W||^k``.

Batch norm is used with its running statistics (eval mode) and those statistics are never
updated, so at every step each BN layer is the fixed per-channel affine map
``gamma * x / sqrt(1 + eps) + beta`` of its trainable ``gamma, beta``.  Why: the risk
``L(W)`` must be a function of the parameters alone, so that the full-data risk, chunked
evaluation, checkpoints and resume are exact; with batch statistics it would depend on how
the data happen to be batched, and the running statistics (buffers, not parameters) would
drift outside the checkpointed state.
"""

from __future__ import annotations

from torch import nn

from .registry import register


def _prepare(model: nn.Module) -> nn.Module:
    model.homogeneity_degree = None  # declared: not homogeneous
    return model.eval()


@register("resnet18")
def resnet18(num_classes: int = 10) -> nn.Module:
    from torchvision.models import resnet18 as make

    return _prepare(make(weights=None, num_classes=int(num_classes)))


@register("densenet121")
def densenet121(num_classes: int = 10) -> nn.Module:
    from torchvision.models import densenet121 as make

    return _prepare(make(weights=None, num_classes=int(num_classes)))
