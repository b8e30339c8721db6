"""The classifiers of CNN-Acc and Tables 5-6: any timm network (with the CIFAR stem for small
ResNets) behind a uint8-to-float normalisation, optionally from local pretrained weights.

The paper (section 5.2) trains ResNet-18 with the CIFAR stem: a 3x3 stride-1 first convolution
and no max-pool, so that a 32x32 image keeps its resolution into the first block. Table 5 trains
a small Swin from scratch (``timm_kwargs`` give timm's Swin a CIFAR size: ``img_size=32``, patch
and window sizes), Table 6 fine-tunes a pretrained EVA02: its weights come from a local file
(:func:`load_pretrained`; nothing is downloaded at run time).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.resnet import ResNet
from torch import Tensor, nn

from nfpi.errors import CheckpointError, ConfigError
from nfpi.schema import is_int

__all__ = ["UInt8Classifier", "build_classifier", "load_pretrained"]

log = logging.getLogger(__name__)


def build_classifier(
    name: str,
    num_classes: int,
    in_chans: int,
    image_size: int,
    *,
    cifar_stem: bool | None = None,
    pretrained_path: str | Path | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm classifier, randomly initialised or from a local weights file.

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
            ``image_size <= 64`` and no pretrained weights. Non-ResNet models keep timm's
            architecture.
        pretrained_path: a local weights file for this architecture (see
            :func:`load_pretrained`); the model is built with ``pretrained=False`` first.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``img_size``, ``patch_size``,
            ``window_size`` for a Swin or an EVA02).

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
    except TypeError as e:  # a keyword the architecture does not take
        raise ConfigError(
            "model_kwargs", timm_kwargs, f"keyword arguments {name!r} accepts ({e})"
        ) from None
    is_resnet = isinstance(model, ResNet)
    if cifar_stem is None:
        cifar_stem = is_resnet and image_size <= 64 and pretrained_path is None
    if cifar_stem:
        if not is_resnet:
            raise ConfigError("cifar_stem", True, f"False for {name!r}: only timm ResNets have it")
        width = model.bn1.num_features
        conv = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        model.conv1 = conv
        model.maxpool = nn.Identity()
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path)
    return model


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The classifier head's parameter prefixes (timm's ``pretrained_cfg["classifier"]``)."""
    head = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (head,) if isinstance(head, str) else tuple(head)
    return tuple(f"{n}." for n in names)


def load_pretrained(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load local pretrained weights into a timm ``model`` (built with ``pretrained=False``).

    The file is a state dict saved with ``torch.save`` (read with ``weights_only=True``; a
    ``{"state_dict": ...}``, ``{"model": ...}`` or DDP ``module.``-prefixed one works too) or a
    ``.safetensors`` file. The model family's own timm converter (``checkpoint_filter_fn``:
    original key names, position embeddings resampled to this ``img_size``) is applied first.
    A classifier head whose shape does not fit (another number of classes) is skipped and stays
    randomly initialised, as when fine-tuning; every other key must match exactly.

    Returns:
        ``{"skipped_head": [...]}``, the head keys left at their initialisation.

    Raises:
        CheckpointError: the file is missing or unreadable, or its keys or shapes do not fit
            the model (the message lists them).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"pretrained weights {path} not found: set cnn.pretrained_path to a local file "
            "(torch.save'd state dict or .safetensors) of this architecture; nothing is "
            "downloaded at run time"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing error
        raise CheckpointError(
            f"cannot read pretrained weights {path} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); expected a state dict saved with "
            "torch.save (tensors only) or a .safetensors file"
        ) from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is not None:
        state = convert(state, model)
    own = model.state_dict()
    heads = _head_prefixes(model)
    skipped = [
        k
        for k, v in state.items()
        if k.startswith(heads) and k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    state = {k: v for k, v in state.items() if k not in skipped}
    mismatched = [
        f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = [k for k in own if k not in state and not (k in skipped or k.startswith(heads))]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

        problems = [
            f"{len(keys)} {what} ({show(keys)})"
            for what, keys in (
                ("shape mismatches", mismatched),
                ("missing keys", missing),
                ("unexpected keys", unexpected),
            )
            if keys
        ]
        raise CheckpointError(
            f"pretrained weights {path} do not fit {type(model).__name__}: "
            f"{'; '.join(problems)}; use weights of the same timm architecture and the same "
            "cnn.model_kwargs (a different img_size is resampled, other sizes are not)"
        )
    model.load_state_dict(state, strict=False)
    if skipped:
        log.info("pretrained weights %s: head %s re-initialised for this task", path, skipped)
    return {"skipped_head": skipped}


class UInt8Classifier(nn.Module):
    """A classifier of uint8 images: ``forward(x uint8 [B, C, H, W]) -> logits [B, K]``.

    ``normalize`` maps pixels to ``(x - mean) / std`` per channel (float32), resized to
    ``input_size`` x ``input_size`` (bicubic, antialiased) when given, e.g. to feed 64 x 64 images
    to a network pretrained at 448; ``net`` takes normalised floats (training inserts random
    erasing and mixup in between).
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        self.net, self.input_size = net, input_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 ``[B, C, H, W]`` -> float32 ``[B, C, H', W']`` (``H' = W' = input_size``)."""
        out = (x.to(self.mean.device, torch.float32) - self.mean) / self.std
        if self.input_size is not None and tuple(out.shape[-2:]) != (self.input_size,) * 2:
            out = nn.functional.interpolate(
                out, size=(self.input_size,) * 2, mode="bicubic", antialias=True
            )
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))
