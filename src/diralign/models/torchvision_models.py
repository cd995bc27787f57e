"""torchvision's DenseNet-121 and ResNet-18, unmodified, ``num_classes=10``, random init.

    python -c "import diralign.models as m; print(sum(p.numel() for p in m.build_model('resnet18').parameters()))"

They are outside the paper's theory (biases, batch norm, skip connections), which is why
the paper uses them (Fig. 2b, Fig. 3): each instance declares ``homogeneity_degree = None``
so margins are normalised by the median nonnegative margin instead of ``||W||^k``.

The factories return the nets in eval mode (batch norm by its running statistics, fixed
at their initial 0/1, so each BN layer is the affine map ``gamma * x / sqrt(1 + eps) +
beta``).  ``diralign run margins`` then picks the batch-norm mode (``--set batch_norm``):
by default ``batch``, the usual training-mode normalisation by each forward batch's
statistics, with no running statistics kept, so that the risk stays a deterministic
function of the parameters and checkpoints stay exact (running statistics are buffers
that would drift outside the checkpointed state).
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
