"""Downstream data at the classifier's own resolution (Tables 5, 6): real images read at
``downstream.image_size``, images the flow makes upsampled to it."""

import pytest
import torch

from nfpi.downstream.run import DownstreamConfig, ResolutionBridge
from nfpi.errors import ConfigError


class _EveryOtherImage:
    """A stand-in NF augmentation at 8 x 8: inverts every other image of the batch."""

    def __init__(self):
        self.config, self.stats, self.seen = "cfg", {"images": 0}, []

    def __call__(self, x, y, generator=None):
        self.seen.append(tuple(x.shape))
        out = x.clone()
        out[::2] = 255 - out[::2]
        return out


def test_bridge_augments_at_the_flow_side_and_upsamples_only_what_changed():
    nf = _EveryOtherImage()
    bridge = ResolutionBridge(nf, side=8)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = bridge(x, torch.zeros(4, dtype=torch.int64))
    assert nf.seen == [(4, 3, 8, 8)]  # the flow sees its own resolution
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out[1::2], x[1::2])  # untouched images keep every pixel
    small = ResolutionBridge._resize(x, 8)
    assert torch.equal(out[::2], ResolutionBridge._resize(255 - small[::2], 32))
    assert (bridge.config, bridge.stats) == (nf.config, nf.stats)


def test_image_size_options_are_checked():
    ok = {"downstream.kind": "augment", "downstream.image_size": 448}
    assert DownstreamConfig.from_overrides(ok).image_size == 448
    with pytest.raises(ConfigError, match="nf_pool"):
        DownstreamConfig.from_overrides(
            {"downstream.kind": "augment", "downstream.image_size": 64, "downstream.nf_pool": {}}
        )
    with pytest.raises(ConfigError, match="cnn.input_size"):
        DownstreamConfig.from_overrides({"downstream.kind": "cnn", "downstream.image_size": 64})


def test_table6_reads_the_real_images_at_448():
    from search_spaces import load_space

    space, rest = load_space("table6_eva02").with_options(
        {"data.root": "/x", "cnn.pretrained_path": "/w.safetensors"}
    )
    trials = space.trials(rest, n_random=1)
    assert {t.downstream.image_size for t in trials} == {448}
    assert {t.config.data.image_size for t in trials} == {32}  # the flow stays at 32
    assert "upsampled to 448" in space.reproduces
