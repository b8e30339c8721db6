"""Batched paper augmentation: exact identity, per-image draws, flips, shifts, determinism."""

import pytest
import torch

from nfpi.data import BatchAugment
from nfpi.errors import ConfigError


def _images(b=16, c=3, h=16, w=16, seed=0):
    return torch.randint(
        0, 256, (b, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def test_identity_settings_return_the_input_exactly():
    x = _images()
    aug = BatchAugment((3, 16, 16), flip=False, color=False, degrees=0, max_shift=0)
    assert torch.equal(aug(x, torch.Generator().manual_seed(0)), x)


def test_flip_only_flips_some_images_exactly():
    x = _images(b=64)
    out = BatchAugment((3, 16, 16), color=False, degrees=0, max_shift=0)(
        x, torch.Generator().manual_seed(1)
    )
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x, strict=True)])
    assert bool((flipped | kept).all()) and 10 < int(flipped.sum()) < 54


def test_shift_only_translates_with_edge_replication():
    ramp = torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8).repeat(32, 1, 1, 1)
    out = BatchAugment((1, 8, 8), flip=False, degrees=0, max_shift=1)(
        ramp, torch.Generator().manual_seed(2)
    )
    img = ramp[0, 0].long()
    for o in out[:, 0].long():
        matches = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if torch.equal(
                o, img[(torch.arange(8) + dy).clamp(0, 7)][:, (torch.arange(8) + dx).clamp(0, 7)]
            )
        ]
        assert matches, "every output is the input shifted by at most one pixel, borders replicated"


def test_rotation_keeps_values_from_the_image_and_varies_per_image():
    x = _images(b=8, c=1)
    out = BatchAugment((1, 16, 16), flip=False, degrees=12, max_shift=0)(
        x, torch.Generator().manual_seed(3)
    )
    for o, i in zip(out, x, strict=True):
        assert set(o.unique().tolist()) <= set(
            i.unique().tolist()
        )  # nearest neighbour: no new values
    assert not torch.equal(out, x)


def test_colour_jitter_is_mild_and_seeded():
    x = _images(b=32)
    aug = BatchAugment((3, 16, 16), flip=False, degrees=0, max_shift=0)
    a, b = aug(x, torch.Generator().manual_seed(4)), aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and a.dtype == torch.uint8
    assert not torch.equal(a, x)
    assert (a.float() - x.float()).abs().mean() < 20  # brightness/contrast 0.1, saturation 0.05


def test_bad_inputs_are_named():
    with pytest.raises(ConfigError, match="color"):
        BatchAugment((1, 8, 8), color=True)
    with pytest.raises(ConfigError, match="images"):
        BatchAugment((3, 8, 8))(torch.zeros(2, 3, 8, 8))
