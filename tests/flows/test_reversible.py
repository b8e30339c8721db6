"""The invertible backward (nfpi.flows.reversible): same values and gradients as autograd, and
memory that does not grow with the number of flow steps."""

from __future__ import annotations

import pytest
import torch

from nfpi.config import ExperimentConfig
from nfpi.flows import build_flow
from nfpi.flows.reversible import invertible_forward, reconstruction_error

F64 = torch.float64


def _flow(preset: str, shape: tuple[int, int, int], **overrides):
    flow = build_flow(preset, in_shape=shape, **overrides).to(F64)
    gen = torch.Generator().manual_seed(1)
    flow.data_init(torch.randn(32, *shape, generator=gen, dtype=F64))
    # Move every parameter off its initial value (zero-initialised output convolutions make
    # the couplings the identity at first, which would hide errors in their gradients).
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=F64))
    return flow


def _loss(flow, x):
    z, logdet = flow(x)
    # Not just a function of z and logdet's sums: the cube weights each latent differently.
    return (0.5 * z.square().sum(1) - logdet).sum() + (z[:, :7] ** 3).sum()


def _grads(flow, x, invertible: bool):
    flow.invertible_backward = invertible
    x = x.clone().requires_grad_()
    z, logdet = flow(x)
    params = list(flow.parameters())
    loss = (0.5 * z.square().sum(1) - logdet).sum() + (z[:, :7] ** 3).sum()
    return z.detach(), logdet.detach(), torch.autograd.grad(loss, [x, *params])


CASES = [
    # (preset, input shape, overrides): the MEF layers (matrix-exp coupling and 1x1 conv,
    # per-element ActNorm) and the Glow layers (affine coupling, LU conv, per-channel ActNorm).
    ("tiny", (1, 8, 8), {}),
    ("glow-small", (3, 16, 16), {"hidden": 8, "steps": 2}),
]


@pytest.mark.parametrize(("preset", "shape", "overrides"), CASES, ids=["mef", "glow"])
def test_gradients_equal_autograd_float64(preset, shape, overrides):
    flow = _flow(preset, shape, **overrides)
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    z0, ld0, g0 = _grads(flow, x, invertible=False)
    z1, ld1, g1 = _grads(flow, x, invertible=True)
    # The forward pass runs the same operations: the same values bit for bit.
    assert torch.equal(z0, z1) and torch.equal(ld0, ld1)
    names = ["x", *(n for n, _ in flow.named_parameters())]
    for name, a, b in zip(names, g0, g1, strict=True):
        assert a.abs().max() > 0, name  # every parameter gets a gradient (the test can see it)
        err = ((a - b).abs().max() / a.abs().max()).item()
        assert err < 1e-8, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("chunk", [2, None])
def test_rebuild_in_pieces_equals_autograd_float64(chunk):
    """Couplings rebuilt 2 samples at a time (pieces of 2, 2, 1) or the whole batch at once."""
    flow = _flow("tiny", (1, 8, 8), steps=3)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(8), dtype=F64)
    z0, ld0, g0 = _grads(flow, x, invertible=False)
    flow.rebuild_chunk = chunk
    z1, ld1, g1 = _grads(flow, x, invertible=True)
    assert torch.equal(z0, z1) and torch.equal(ld0, ld1)
    for (name, _), a, b in zip([("x", 0), *flow.named_parameters()], g0, g1, strict=True):
        assert a.abs().max() > 0, name
        err = ((a - b).abs().max() / a.abs().max()).item()
        assert err < 1e-8, f"{name}: relative gradient error {err:.2e}"


def test_bad_chunk_is_refused_in_one_line():
    flow = _flow("tiny", (1, 8, 8))
    x = torch.randn(2, 1, 8, 8, dtype=F64)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="chunk must be None or an int >= 1"):
            invertible_forward(flow.flow, x, bad)


@pytest.mark.slow
def test_optimizer_steps_match_autograd():
    """Two training steps with either backward give the same weights (float64, to 1e-10)."""
    shape = (1, 8, 8)
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    weights = []
    for invertible in (False, True):
        flow = _flow("tiny", shape)
        flow.invertible_backward = invertible
        opt = torch.optim.Adamax(flow.parameters(), lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            _loss(flow, x).backward()
            opt.step()
        weights.append(torch.cat([p.detach().flatten() for p in flow.parameters()]))
    assert (weights[0] - weights[1]).abs().max() < 1e-10


def _saved_bytes(flow, x) -> int:
    """Bytes of the tensors autograd keeps for backward during ``flow(x)``'s forward pass."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        flow(x)
    return total


def test_saved_activations_do_not_grow_with_depth():
    shape = (1, 8, 8)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    plain, invertible, pieces = {}, {}, {}
    for steps in (1, 2, 4):
        flow = _flow("tiny", shape, steps=steps)
        plain[steps] = _saved_bytes(flow, x)
        flow.invertible_backward = True
        flow.rebuild_chunk = None  # whole-batch rebuild: each level's last step is kept
        invertible[steps] = _saved_bytes(flow, x)
        flow.rebuild_chunk = 2
        pieces[steps] = _saved_bytes(flow, x)
    assert plain[4] > 2 * plain[1]  # autograd keeps every step's activations
    # Rebuilt in pieces, every step is rebuilt: one image per level is all that is kept.
    assert pieces[1] == pieces[4] == 4 * (64 + 32) * 8
    # One step per level runs under plain autograd (its activations are the first the backward
    # needs), the others keep only their output: the same bytes at 2 steps as at 4 ...
    assert invertible[4] == invertible[2]
    # ... which are one step's activations plus one image per level (2 levels: 64 + 32 values
    # of 8 bytes per sample; with more than one step the kept step's input requires grad, so
    # its per-element ActNorm also keeps its 64-value scale), less than two steps' worth.
    assert invertible[1] == plain[1]  # a single step is the kept one
    assert invertible[4] == plain[1] + 4 * (64 + 32) * 8 + 64 * 8
    assert invertible[4] < plain[2]


def test_frozen_parameters_and_input_gradient_only():
    flow = _flow("tiny", (1, 8, 8))
    for name, p in flow.named_parameters():
        if "actnorm" in name or "log_weight" in name or name.endswith("rescale"):
            p.requires_grad_(False)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    trainable = [p for p in flow.parameters() if p.requires_grad]
    grads = []
    for invertible in (False, True):
        flow.invertible_backward = invertible
        xr = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(_loss(flow, xr), [xr, *trainable]))
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() <= 1e-8 * a.abs().max()


def test_no_grad_and_data_init_take_the_plain_path():
    shape = (1, 8, 8)
    flow = build_flow("tiny", in_shape=shape).to(F64)
    flow.invertible_backward = True
    batch = torch.randn(16, *shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    flow.data_init(batch)  # runs under no_grad: the plain layers initialise themselves
    with torch.no_grad():
        z, logdet = flow(batch)
    flow.invertible_backward = False
    with torch.no_grad():
        z0, logdet0 = flow(batch)
    assert torch.equal(z, z0) and torch.equal(logdet, logdet0)


def test_invertible_forward_on_a_bare_layer_and_reconstruction_error():
    flow = _flow("tiny", (1, 8, 8))
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7), dtype=F64)
    z, logdet = invertible_forward(flow.flow, x)
    z0, logdet0 = flow.flow(x)
    assert torch.equal(z, z0) and torch.equal(logdet, logdet0)
    err = reconstruction_error(flow.flow, x)
    # 2 levels x 2 steps x 3 layers, every rebuilt activation compared; float64 round-off.
    assert err["layers"] == 12
    assert 0 <= err["max_abs"] < 1e-12 and err["input_max_abs"] <= err["max_abs"]


def test_config_key_sets_the_flow_option(tmp_path):
    from nfpi.training.loop import Trainer

    config = ExperimentConfig.from_dict(
        {"data": {"name": "synthetic", "num_classes": 2, "shape": [1, 8, 8],
                  "items_per_class": 8, "test_items_per_class": 4},
         "optim": {"epochs": 1, "batch_size": 8, "invertible_backward": True},
         "ema": {"enabled": False}, "eval": {"plots": False}, "device": "cpu"}
    )  # fmt: skip
    trainer = Trainer(config, tmp_path / "run")
    assert trainer.flow.invertible_backward is True
    assert ExperimentConfig().optim.invertible_backward is False
