"""Batch augmentations of uint8 images for the classifier: random crop + flip, RandAugment and
AutoAugment.

Each draws its parameters per image but applies them to the whole batch ``[B, C, H, W]`` at
once (a per-image torchvision pipeline costs milliseconds per image on two cores, more than the
network's step on small images). :class:`BatchRandAugment` and :class:`BatchAutoAugment` draw
from the same distributions as ``torchvision.transforms.v2.RandAugment`` / ``AutoAugment``
applied image by image, with torchvision's op tables and policies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from nfpi.errors import ConfigError
from nfpi.schema import is_int

__all__ = ["AUTOAUGMENT_POLICIES", "BatchAutoAugment", "BatchCropFlip", "BatchRandAugment"]


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
    if op == "Invert":  # AutoAugment's only op outside RandAugment's set
        return TF.invert(x)
    raise ConfigError("op", op, "a RandAugment or AutoAugment op")


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


# AutoAugment's learned policies (Cubuk et al. 2019) as torchvision.transforms.v2.AutoAugment
# holds them: 25 sub-policies of two (op, probability, magnitude bin of 10) each.
AUTOAUGMENT_POLICIES: dict[str, tuple[tuple[tuple[str, float, int | None], ...], ...]] = {
    "imagenet": (
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
        (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
        (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
        (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
        (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
        (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
        (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ),
    "cifar10": (
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
        (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
        (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
        (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
        (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
        (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
        (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
        (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
        (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
        (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
        (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
        (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
        (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ),
}
_AA_BINS = 10


class BatchAutoAugment:
    """AutoAugment (Cubuk et al. 2019) with torchvision's policies and op magnitudes, drawn per
    image but applied to a uint8 batch.

    Per image, as ``torchvision.transforms.v2.AutoAugment``: one of the policy's 25 sub-policies
    uniformly, then each of its two ops in turn with its probability, at its magnitude bin
    (of 10), with a random sign for signed ops. The images that drew the same op, magnitude and
    sign in the same position go through it together.

    Args:
        policy: ``"cifar10"`` or ``"imagenet"``.
    """

    def __init__(self, policy: str = "cifar10") -> None:
        if policy not in AUTOAUGMENT_POLICIES:
            raise ConfigError("autoaugment", policy, f"one of {tuple(AUTOAUGMENT_POLICIES)}")
        self.policy = policy
        self.subpolicies = AUTOAUGMENT_POLICIES[policy]

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 ``[B, C, H, W]`` -> uint8 ``[B, C, H, W]``."""
        b, _, h, w = x.shape
        space = _ra_space(_AA_BINS, h, w)
        chosen = torch.randint(len(self.subpolicies), (b,), generator=generator).tolist()
        for position in range(2):
            apply = torch.rand(b, generator=generator)
            negative = (torch.rand(b, generator=generator) <= 0.5).tolist()
            groups: dict[tuple[str, float], list[int]] = {}
            for i, sub in enumerate(chosen):
                op, prob, bin_ = self.subpolicies[sub][position]
                if not float(apply[i]) <= prob:
                    continue
                mags, signed = space.get(op, (None, False))
                mag = 0.0 if mags is None or bin_ is None else float(mags[bin_])
                if signed and negative[i]:
                    mag = -mag
                groups.setdefault((op, mag), []).append(i)
            if not groups:
                continue
            out = x.clone()
            for (op, mag), rows in groups.items():
                idx = torch.tensor(rows, device=x.device)
                out[idx] = _ra_apply(x[idx], op, mag)
            x = out
        return x
