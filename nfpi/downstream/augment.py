"""Batch augmentations of uint8 images for the classifier: random crop + flip and RandAugment.

Each draws its parameters per image but applies them to the whole batch ``[B, C, H, W]`` at
once (a per-image torchvision pipeline costs milliseconds per image on two cores, more than the
network's step on small images). :class:`BatchRandAugment` draws from the same distribution as
``torchvision.transforms.v2.RandAugment`` applied image by image, with torchvision's op table.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from nfpi.errors import ConfigError
from nfpi.schema import is_int

__all__ = ["BatchCropFlip", "BatchRandAugment"]


class BatchCropFlip:
    """Random crop after zero padding and random horizontal flip, drawn per image, applied to a
    uint8 batch ``[B, C, H, W]`` with one gather (no per-image Python loop)."""

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        if not is_int(padding) or padding < 0:
            raise ConfigError("crop_padding", padding, "an int >= 0")
        self.padding, self.flip = padding, flip

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, c, h, w = x.shape
        p = self.padding
        if p > 0:
            xp = nn.functional.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
            rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            batch = torch.arange(b, device=x.device)[:, None, None, None]
            chan = torch.arange(c, device=x.device)[None, :, None, None]
            x = xp[batch, chan, rows, cols]
        if self.flip:
            flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)[:, None, None, None]
            x = torch.where(flip, x.flip(-1), x)
        return x


# RandAugment's op space, as torchvision.transforms.v2.RandAugment: name -> (magnitudes over the
# bins for an image of height h and width w, signed).
def _ra_space(bins: int, h: int, w: int) -> dict[str, tuple[Tensor | None, bool]]:
    lin = torch.linspace
    return {
        "Identity": (None, False),
        "ShearX": (lin(0.0, 0.3, bins), True),
        "ShearY": (lin(0.0, 0.3, bins), True),
        "TranslateX": (lin(0.0, 150.0 / 331.0 * w, bins), True),
        "TranslateY": (lin(0.0, 150.0 / 331.0 * h, bins), True),
        "Rotate": (lin(0.0, 30.0, bins), True),
        "Brightness": (lin(0.0, 0.9, bins), True),
        "Color": (lin(0.0, 0.9, bins), True),
        "Contrast": (lin(0.0, 0.9, bins), True),
        "Sharpness": (lin(0.0, 0.9, bins), True),
        "Posterize": ((8 - (torch.arange(bins) / ((bins - 1) / 4))).round().int(), False),
        "Solarize": (lin(1.0, 0.0, bins), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
    }


def _ra_apply(x: Tensor, op: str, mag: float) -> Tensor:
    """One RandAugment op on a uint8 batch, as torchvision's v2 RandAugment applies it."""
    nearest = InterpolationMode.NEAREST
    if op == "Identity":
        return x
    if op in ("ShearX", "ShearY"):
        deg = math.degrees(math.atan(mag))
        shear = [deg, 0.0] if op == "ShearX" else [0.0, deg]
        return TF.affine(
            x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest,
            center=[0, 0],
        )  # fmt: skip
    if op in ("TranslateX", "TranslateY"):
        shift = [int(mag), 0] if op == "TranslateX" else [0, int(mag)]
        return TF.affine(
            x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=nearest
        )
    if op == "Rotate":
        return TF.rotate(x, angle=mag, interpolation=nearest)
    if op == "Brightness":
        return TF.adjust_brightness(x, 1.0 + mag)
    if op == "Color":
        return TF.adjust_saturation(x, 1.0 + mag)
    if op == "Contrast":
        return TF.adjust_contrast(x, 1.0 + mag)
    if op == "Sharpness":
        return TF.adjust_sharpness(x, 1.0 + mag)
    if op == "Posterize":
        return TF.posterize(x, bits=int(mag))
    if op == "Solarize":
        return TF.solarize(x, threshold=255.0 * mag)
    if op == "AutoContrast":
        return TF.autocontrast(x)
    if op == "Equalize":
        return TF.equalize(x)
    raise ConfigError("op", op, "a RandAugment op")


class BatchRandAugment:
    """RandAugment (Cubuk et al. 2020) with torchvision's op set and magnitudes, drawn per image
    but applied to a uint8 batch: images that drew the same op (and sign) go through it
    together, so a batch costs at most ``2 x 14`` vectorised calls per round instead of
    ``B x num_ops`` single-image calls (each dominated by fixed overhead on small images).

    Every op of torchvision's set is per-image on a batch (autocontrast and equalize use each
    image's own histogram), so this draws from the same distribution as applying
    ``torchvision.transforms.v2.RandAugment(num_ops, magnitude)`` image by image.
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31) -> None:
        if not is_int(num_ops) or num_ops < 1:
            raise ConfigError("randaugment_ops", num_ops, "an int >= 1")
        if not is_int(magnitude) or not 0 <= magnitude < num_magnitude_bins:
            raise ConfigError(
                "randaugment_magnitude", magnitude, f"an int in [0, {num_magnitude_bins})"
            )
        self.num_ops, self.magnitude, self.bins = num_ops, magnitude, num_magnitude_bins

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 ``[B, C, H, W]`` -> uint8 ``[B, C, H, W]``."""
        b, _, h, w = x.shape
        space = list(_ra_space(self.bins, h, w).items())
        for _ in range(self.num_ops):
            ops = torch.randint(len(space), (b,), generator=generator)
            negative = torch.rand(b, generator=generator) <= 0.5
            out = x.clone()
            for i in torch.unique(ops).tolist():
                name, (mags, signed) = space[i]
                mag = 0.0 if mags is None else float(mags[self.magnitude])
                groups = [(negative, -mag), (~negative, mag)] if signed else [(None, mag)]
                for mask, m in groups:
                    sel = ops == i if mask is None else (ops == i) & mask
                    idx = torch.nonzero(sel, as_tuple=True)[0].to(x.device)
                    if idx.numel():
                        out[idx] = _ra_apply(x[idx], name, m)
            x = out
        return x
