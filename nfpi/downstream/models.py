"""The classifier of CNN-Acc: a timm network (with the CIFAR stem for small images) behind a
uint8-to-float normalisation.

The paper (section 5.2) trains ResNet-18 with the CIFAR stem: a 3x3 stride-1 first convolution
and no max-pool, so that a 32x32 image keeps its resolution into the first block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch
from timm.models.resnet import ResNet
from torch import Tensor, nn

from nfpi.errors import ConfigError
from nfpi.schema import is_int

__all__ = ["UInt8Classifier", "build_classifier"]


def build_classifier(
    name: str,
    num_classes: int,
    in_chans: int,
    image_size: int,
    *,
    cifar_stem: bool | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm classifier, randomly initialised.

    ImageNet ResNets open with a 7x7 stride-2 convolution and a stride-2 max-pool, which throw
    away three quarters of a 32x32 image's resolution before the first block. The CIFAR stem
    (used by the paper) replaces ``conv1`` by a 3x3 stride-1 padding-1 convolution (to the
    stem's width, kaiming-normal initialised like timm's) and ``maxpool`` by ``Identity``, so
    ``layer1`` sees the full image. Deep-stem variants (``resnet10t``, ``resnet18d``) lose their
    three-conv stem the same way.

    Args:
        name: timm model name (``timm.list_models()``).
        num_classes: K outputs.
        in_chans: image channels (1 for digits, 3 for CIFAR).
        image_size: side of the (square) images.
        cifar_stem: force the CIFAR stem on/off; default on for timm ResNets with
            ``image_size <= 64``. Non-ResNet models keep timm's architecture.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``img_size`` for a ViT).

    Returns:
        ``nn.Module`` mapping float ``[B, in_chans, H, W]`` to logits ``[B, K]``.
    """
    for field_name, value, low in (
        ("num_classes", num_classes, 1),
        ("in_chans", in_chans, 1),
        ("image_size", image_size, 1),
    ):
        if not is_int(value) or value < low:
            raise ConfigError(field_name, value, f"an int >= {low}")
    try:
        model = timm.create_model(
            name, num_classes=num_classes, in_chans=in_chans, pretrained=False, **timm_kwargs
        )
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError("model", name, "a timm model name (see timm.list_models())") from e
        raise
    is_resnet = isinstance(model, ResNet)
    if cifar_stem is None:
        cifar_stem = is_resnet and image_size <= 64
    if cifar_stem:
        if not is_resnet:
            raise ConfigError("cifar_stem", True, f"False for {name!r}: only timm ResNets have it")
        width = model.bn1.num_features
        conv = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        model.conv1 = conv
        model.maxpool = nn.Identity()
    return model


class UInt8Classifier(nn.Module):
    """A classifier of uint8 images: ``forward(x uint8 [B, C, H, W]) -> logits [B, K]``.

    ``normalize`` maps pixels to ``(x - mean) / std`` per channel (float32); ``net`` takes
    normalised floats (training inserts random erasing and mixup in between).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 ``[B, C, H, W]`` -> float32 ``[B, C, H, W]``."""
        return (x.to(self.mean.device, torch.float32) - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))
