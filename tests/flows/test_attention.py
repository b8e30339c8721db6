"""The release's attention layers (nfpi.flows.attention); the invertible-layer contract itself
is checked by tests/test_flows.py's battery (FACTORIES holds the attention couplings)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nfpi.errors import ConfigError
from nfpi.flows import (
    AttentionAffineCoupling,
    AttentionMatrixExpCoupling,
    MatrixExpCoupling,
    PixelAttention,
    build_flow,
)

DTYPE = torch.float64


def _perturbed(module: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    module = module.to(DTYPE)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=DTYPE))
    return module


def _reference_block(block: PixelAttention, x: torch.Tensor) -> torch.Tensor:
    """The block as the release writes it, step by step on [B, C, T]: GroupNorm(C, C), a 1x1
    Conv1d to 3C, heads split before q/k/v ("legacy" order), q and k each scaled by
    ch ** -1/4, softmax over the keys, a 1x1 Conv1d out, the residual."""
    b, c, h, w = x.shape
    heads = block.heads
    ch = c // heads
    norm = nn.GroupNorm(c, c).to(DTYPE)
    qkv_conv, proj = nn.Conv1d(c, 3 * c, 1).to(DTYPE), nn.Conv1d(c, c, 1).to(DTYPE)
    with torch.no_grad():
        norm.weight.copy_(block.norm_weight)
        norm.bias.copy_(block.norm_bias)
        qkv_conv.weight.copy_(block.qkv_weight[:, :, None])
        qkv_conv.bias.copy_(block.qkv_bias)
        proj.weight.copy_(block.proj_weight[:, :, None])
        proj.bias.copy_(block.proj_bias)
    flat = x.reshape(b, c, h * w)
    qkv = qkv_conv(norm(flat))
    q, k, v = qkv.reshape(b * heads, 3 * ch, h * w).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, h * w)
    return (flat + proj(a)).reshape(b, c, h, w)


@pytest.mark.parametrize("heads", [1, 3, 6])
def test_pixel_attention_is_the_releases_block(heads: int) -> None:
    block = _perturbed(PixelAttention(12, heads=heads, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(3, 12, 4, 5, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    want = _reference_block(block, x)
    torch.testing.assert_close(block(x), want, rtol=1e-12, atol=1e-12)
    cl = block(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, want, rtol=1e-12, atol=1e-12)


def test_pixel_attention_starts_as_the_identity_and_mixes_pixels_once_trained() -> None:
    block = PixelAttention(6, heads=2).to(DTYPE)
    x = torch.randn(2, 6, 4, 4, dtype=DTYPE)
    assert torch.equal(block(x), x)  # zero output projection
    trained = _perturbed(block)
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0  # one pixel changes: every pixel's output changes (attention)
    moved = (trained(x2) - trained(x)).abs().sum(dim=1)
    assert bool((moved > 0).all())


def test_attention_coupling_starts_as_the_identity_and_keeps_the_logdet_form() -> None:
    layer = AttentionMatrixExpCoupling((4, 4, 4), hidden=8, blocks=1, heads=2).to(DTYPE)
    x = torch.randn(2, 4, 4, 4, dtype=DTYPE)
    y, logdet = layer(x)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
    assert torch.equal(logdet, torch.zeros(2, dtype=DTYPE))
    # Same net weights without the attention block = same coupling while the block is the
    # identity (zero output projection): the attention is a residual addition to the net.
    plain = MatrixExpCoupling((4, 4, 4), hidden=8, blocks=1).to(DTYPE)
    _perturbed(layer)
    with torch.no_grad():
        layer.attention.proj_weight.zero_()
        layer.attention.proj_bias.zero_()
    plain.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if not k.startswith("attention.")}
    )
    for a, b in zip(layer(x), plain(x)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _attention_parameters(channels: int) -> int:
    return 2 * channels + 3 * channels * channels + 3 * channels + channels * channels + channels


def test_mef_cifar_attn_is_mef_cifar_plus_one_block_per_coupling() -> None:
    plain = sum(p.numel() for p in build_flow("mef-cifar").parameters())
    attn = build_flow("mef-cifar-attn")
    # The nets' output channels c (c + 1) at the three levels of 3x32x32 (c = 6, 12, 24).
    blocks = [m for m in attn.modules() if isinstance(m, PixelAttention)]
    assert sorted({m.channels for m in blocks}) == [42, 156, 600]
    assert len(blocks) == 24 and {m.heads for m in blocks} == {6}
    extra = 8 * sum(_attention_parameters(c) for c in (42, 156, 600))
    assert sum(p.numel() for p in attn.parameters()) == plain + extra


def test_heads_that_do_not_divide_the_channels_are_a_named_error() -> None:
    with pytest.raises(ConfigError) as info:
        build_flow("tiny-attn", in_shape=(1, 8, 8), attention_heads=6)
    assert info.value.field == "attention_heads"
    assert "20 channels" in str(info.value) and "[1, 2, 4, 5, 10]" in str(info.value)
    with pytest.raises(ConfigError, match="attention_heads"):
        build_flow("tiny-attn", attention_heads=0)


@pytest.mark.parametrize("cls", [AttentionAffineCoupling, AttentionMatrixExpCoupling])
def test_attention_coupling_parameter_gradients_are_exact(cls: type) -> None:
    shape = (6, 4, 2)
    layer = _perturbed(cls(shape, hidden=8, blocks=1, heads=3), scale=0.1)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, *shape, generator=g, dtype=DTYPE).requires_grad_()

    def f(x: torch.Tensor, *ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)
