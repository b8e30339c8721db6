"""Training augmentation of the paper (method notes, section 7), on uint8 image tensors."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from nfpi.errors import ConfigError

__all__ = ["BatchAugment", "paper_augmentation"]

# Released CIFAR values: ColorJitter(0.1, 0.1, 0.05), RandomRotation(12).
BRIGHTNESS, CONTRAST, SATURATION = 0.1, 0.1, 0.05
ROTATION_DEGREES = 12.0


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ConfigError("shape", shape, "(C, H, W) with three positive ints")
    return int(shape[0]), int(shape[1]), int(shape[2])


def paper_augmentation(
    shape: Sequence[int],
    *,
    flip: bool = True,
    color: bool | None = None,
    degrees: float = ROTATION_DEGREES,
    pad: int | None = None,
    max_shift: int | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Build the paper's training augmentation for uint8 images of ``shape = (C, H, W)``.

    Order as in the authors' release (CIFAR): horizontal flip (p = 0.5) -> colour jitter
    (brightness 0.1, contrast 0.1, saturation 0.05) -> edge padding by ``pad`` -> rotation by
    U(-degrees, degrees) (nearest neighbour, as the release) -> centre crop to
    ``(H + 2 max_shift, W + 2 max_shift)`` -> random crop back to ``(H, W)``, i.e. a random
    translation of at most ``max_shift`` pixels. Edge padding before the rotation keeps the
    rotated corners filled with image content instead of black.

    Args:
        shape: ``(C, H, W)`` of the images; the output has the same shape and dtype (uint8).
        flip: random horizontal flip. Pass ``False`` for glyphs (digits): a mirrored digit is
            another glyph (or none), not the same class.
        color: colour jitter; default on for 3 channels and off otherwise (saturation needs
            RGB, and brightness/contrast jitter of a grayscale glyph is not part of the recipe;
            the release does not jitter MNIST either).
        degrees: rotation range in degrees (12 in the paper).
        pad: edge padding before rotation; default ``max(1, H // 4)`` (8 for 32 x 32).
        max_shift: random translation in pixels; default ``2`` for images of side >= 16
            (the release's CenterCrop(36) -> RandomCrop(32)) and ``1`` below.

    Randomness comes from torch's global RNG (torchvision transforms take no generator):
    ``torch.manual_seed`` makes a call reproducible; in DataLoader workers, PyTorch seeds each
    worker from the loader's generator (see :func:`nfpi.data.make_loader`).

    Example:
        >>> aug = paper_augmentation((3, 32, 32))
        >>> aug(torch.zeros(3, 32, 32, dtype=torch.uint8)).shape
        torch.Size([3, 32, 32])
    """
    c, h, w = _check_shape(shape)
    if color is None:
        color = c == 3
    if color and c != 3:
        raise ConfigError("color", color, f"colour jitter needs 3 channels, the images have {c}")
    if degrees < 0:
        raise ConfigError("degrees", degrees, "a rotation range >= 0")
    if pad is None:
        pad = max(1, min(h, w) // 4)
    if max_shift is None:
        max_shift = 2 if min(h, w) >= 16 else 1
    if pad < 0:
        raise ConfigError("pad", pad, "an int >= 0")
    if max_shift < 0 or max_shift > pad:
        raise ConfigError("max_shift", max_shift, f"an int in [0, pad = {pad}]")

    from torchvision.transforms import v2  # on use: importing torchvision costs ~1.5 s

    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if color:
        steps.append(
            v2.ColorJitter(brightness=BRIGHTNESS, contrast=CONTRAST, saturation=SATURATION)
        )
    if pad > 0:
        steps.append(v2.Pad(pad, padding_mode="edge"))
    if degrees > 0:
        steps.append(v2.RandomRotation(degrees, interpolation=v2.InterpolationMode.NEAREST))
    steps.append(v2.CenterCrop((h + 2 * max_shift, w + 2 * max_shift)))
    steps.append(v2.RandomCrop((h, w)))
    return v2.Compose(steps)


class BatchAugment:
    """The paper's augmentation drawn per image but applied to a whole uint8 batch at once.

    Same distribution family as :func:`paper_augmentation` (flip, colour jitter, rotation by
    U(-degrees, degrees) with edge-replicated borders and nearest-neighbour sampling, a random
    translation of at most ``max_shift`` pixels), as one vectorised affine warp
    (``grid_sample``) plus a few blends, on any device. Per-image augmentation in a DataLoader
    costs milliseconds per image on CPU and dominates training of small flows; this costs
    microseconds. Differences from the per-image pipeline: the colour jitter's three factors are
    applied in a fixed order (brightness, contrast, saturation) rather than a random one.

    Randomness comes from the ``generator`` passed at call time (CPU), so a seeded generator per
    epoch makes training reproducible and resumable.

    Example:
        >>> aug = BatchAugment((3, 32, 32))
        >>> x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        >>> aug(x, torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3, 32, 32])
    """

    def __init__(
        self,
        shape: Sequence[int],
        *,
        flip: bool = True,
        color: bool | None = None,
        degrees: float = ROTATION_DEGREES,
        max_shift: int | None = None,
    ) -> None:
        c, h, w = _check_shape(shape)
        if color is None:
            color = c == 3
        if color and c != 3:
            raise ConfigError(
                "color", color, f"colour jitter needs 3 channels, the images have {c}"
            )
        if degrees < 0:
            raise ConfigError("degrees", degrees, "a rotation range >= 0")
        if max_shift is None:
            max_shift = 2 if min(h, w) >= 16 else 1
        if max_shift < 0:
            raise ConfigError("max_shift", max_shift, "an int >= 0")
        self.shape, self.flip, self.color = (c, h, w), flip, color
        self.degrees, self.max_shift = float(degrees), int(max_shift)

    #: Uniform numbers each image consumes: flip, brightness, contrast, saturation, angle, dx, dy.
    NUM_UNIFORMS = 7

    def __call__(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        uniforms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """uint8 [B, C, H, W] -> augmented uint8 [B, C, H, W] (same device).

        The per-image random numbers are drawn from ``generator`` ([B, 7] in batch order), or
        given as ``uniforms`` [B, 7] in [0, 1) (e.g. seeded per sample, so that an image's
        augmentation does not depend on the batch it lands in).
        """
        if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != self.shape:
            raise ConfigError(
                "images", tuple(x.shape), f"uint8 [B, {', '.join(map(str, self.shape))}]"
            )
        b, dev = x.shape[0], x.device
        if uniforms is None:
            uniforms = torch.rand(b, self.NUM_UNIFORMS, generator=generator)
        if tuple(uniforms.shape) != (b, self.NUM_UNIFORMS):
            raise ConfigError(
                "uniforms", tuple(uniforms.shape), f"[B, {self.NUM_UNIFORMS}] = [{b}, 7]"
            )
        u = uniforms.to(device=dev, dtype=torch.float32)
        img = x.float()
        if self.flip:
            img = torch.where((u[:, 0] < 0.5)[:, None, None, None], img.flip(-1), img)
        if self.color:

            def factor(col: int, spread: float) -> torch.Tensor:
                return (1 - spread + 2 * spread * u[:, col])[:, None, None, None]

            img = (img * factor(1, BRIGHTNESS)).clamp(0, 255)
            gray = (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2])[:, None]
            c = factor(2, CONTRAST)
            img = (c * img + (1 - c) * gray.mean(dim=(2, 3), keepdim=True)).clamp(0, 255)
            gray = (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2])[:, None]
            s = factor(3, SATURATION)
            img = (s * img + (1 - s) * gray).clamp(0, 255)
        if self.degrees > 0 or self.max_shift > 0:
            img = self._warp(img, u[:, 4:7])
        return img.round_().clamp_(0, 255).to(torch.uint8)

    def _warp(self, img: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[2:]
        dev = img.device
        angle = (2 * u[:, 0] - 1) * math.radians(self.degrees)
        span = 2 * self.max_shift + 1
        shift = (u[:, 1:3] * span).floor().clamp(max=span - 1) - self.max_shift  # ints in [-m, m]
        ys, xs = torch.meshgrid(
            torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij"
        )
        center = torch.tensor([(w - 1) / 2, (h - 1) / 2], device=dev)
        # Output pixel p shows the rotated image at p + shift; the rotated image at q samples the
        # original at c + R(q - c). Border padding = the release's edge padding before rotating.
        q = torch.stack([xs, ys], dim=-1).float()[None] + shift[:, None, None, :] - center
        cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
        src_x = cos * q[..., 0] - sin * q[..., 1] + center[0]
        src_y = sin * q[..., 0] + cos * q[..., 1] + center[1]
        grid = torch.stack([(2 * src_x + 1) / w - 1, (2 * src_y + 1) / h - 1], dim=-1)
        return torch.nn.functional.grid_sample(
            img, grid, mode="nearest", padding_mode="border", align_corners=False
        )
