"""Invertible backward: training memory that does not grow with the flow's depth.

A flow is a bijection, so its backward pass need not keep the activations of the forward pass:
it can rebuild each layer's input from the layer's output (RevNet, Gomez et al. 2017; memcnn).
:func:`invertible_forward` runs a flow with that backward:

* every run of consecutive parametrised layers (a level's flow steps: ActNorm -> 1x1 conv ->
  coupling, x steps) becomes one :class:`_InvertibleChain`, whose forward runs under
  ``torch.no_grad`` and keeps only the chain's output (an image-sized tensor per level);
* its backward walks the layers from the last to the first: ``x = layer.inverse(y)`` without
  autograd, then ``layer(x)`` again with autograd on, local to that layer, and back-propagates
  the incoming gradient through it (to ``x`` and to the layer's parameters), then goes on with
  ``x`` as the previous layer's output;
* a coupling (``y1 = x1``, ``y2 = f(net(x1), x2)``) runs its net once in backward: the net's
  output on ``y1 = x1`` gives both the inverse ``x2`` and the recomputed forward.

Without ``chunk`` (below), the last group of every run (a level's last flow step) runs under
plain autograd instead: its activations are the first that the backward needs, at a moment
when the parameter gradients of the levels before it do not exist yet, so keeping them from
the forward pass raises the peak no more than rebuilding the whole batch would (one step's
activations), and saves that step's recomputation (1/8 of mef-cifar's extra forward pass).

A coupling is rebuilt and back-propagated in pieces of ``chunk`` samples
(``FlowModel.rebuild_chunk``, default 16): its net's activations are the largest transient of
the backward (136 MiB for a first-level coupling of ``mef-cifar`` at batch 64), and nothing in
a flow mixes samples after data init, so a piece at a time gives the same values and the
parameter gradients as sums over the pieces.

Peak memory is then the parameters, their gradients and optimiser state, plus one layer's
activations at a time (a piece's, or, rebuilding whole batches, one kept step per level
before its backward starts), whatever the number of steps. The price is one extra forward pass
of every layer (and its inverse for the cheap ones) per training step. Gradients equal autograd's up
to the round-off of the reconstruction (``tests/flows/test_reversible.py`` compares them in
float64; ``benchmarks/train_throughput.py --invertible-backward`` measures the reconstruction
error of ``mef-cifar`` in float32 over its full depth).

Parameter gradients leave the chain as outputs of the autograd function (the parameters are its
inputs), so ``torch.autograd.grad``, DDP's gradient hooks and gradient accumulation all see them
as they would under plain autograd.

Limits: every layer of a chain must be exactly invertible (all of :mod:`nfpi.flows` are) and
deterministic, and (for ``chunk``) treat the samples of a batch independently; a layer still
waiting for its data-dependent initialisation, or a pass without autograd, runs the plain path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from nfpi.flows.base import Compose, DataInitModule, InvertibleLayer
from nfpi.flows.coupling import AffineCoupling, MatrixExpCoupling
from nfpi.flows.reshape import Split

__all__ = ["invertible_forward", "reconstruction_error"]

_COUPLINGS = (AffineCoupling, MatrixExpCoupling)


def _leaves(layer: InvertibleLayer) -> list[InvertibleLayer] | None:
    """The layers a chain would run for ``layer`` (a :class:`Compose` flattened), or ``None``
    if it cannot join a chain (it holds a :class:`Split`, whose inner flow is handled level by
    level, or it has no parameters and so nothing to rebuild for)."""
    if isinstance(layer, Split):
        return None
    if isinstance(layer, Compose):
        out: list[InvertibleLayer] = []
        for sub in layer.layers:
            leaves = _leaves(sub)
            if leaves is None and any(True for _ in sub.parameters()):
                return None
            out += leaves if leaves is not None else [sub]
        return out
    return [layer] if any(True for _ in layer.parameters()) else None


def _trainable(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in layer.parameters() if p.requires_grad]


def _grad(
    outputs: tuple[Tensor, ...], inputs: list[Tensor], grads: tuple[Tensor, ...]
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` over the outputs that require grad (a layer whose parameters
    are frozen returns a constant log-det)."""
    pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if o.requires_grad]
    if not pairs:
        return (None,) * len(inputs)
    outs, gs = zip(*pairs, strict=True)
    return torch.autograd.grad(outs, inputs, gs, allow_unused=True)


def _layer_backward(
    layer: InvertibleLayer, y: Tensor, gy: Tensor, gld: Tensor, chunk: int | None = None
) -> tuple[Tensor, Tensor, tuple[Tensor | None, ...]]:
    """(x, dL/dx, dL/dparams) of ``layer`` from its output ``y``, dL/dy and dL/dlogdet; a
    coupling in pieces of at most ``chunk`` samples (``None``: the whole batch at once)."""
    if not isinstance(layer, _COUPLINGS) or chunk is None or y.shape[0] <= chunk:
        return _layer_backward_once(layer, y, gy, gld)
    xs, gxs, total = [], [], None
    for start in range(0, y.shape[0], chunk):
        piece = slice(start, start + chunk)
        x, gx, gp = _layer_backward_once(layer, y[piece], gy[piece], gld[piece])
        xs.append(x)
        gxs.append(gx)
        # Parameter gradients are sums over the samples: add the pieces' (fresh tensors).
        total = (
            gp
            if total is None
            else tuple(b if a is None else a if b is None else a.add_(b) for a, b in zip(total, gp))
        )
    assert total is not None
    return torch.cat(xs), torch.cat(gxs), total


def _layer_backward_once(
    layer: InvertibleLayer, y: Tensor, gy: Tensor, gld: Tensor
) -> tuple[Tensor, Tensor, tuple[Tensor | None, ...]]:
    params = _trainable(layer)
    if isinstance(layer, _COUPLINGS):
        # y1 = x1: the net's output on y1 serves the inverse and the recomputed forward.
        c1 = layer.c1
        with torch.enable_grad():
            x1 = y[:, :c1].detach().requires_grad_()
            h = layer.net(x1).permute(0, 2, 3, 1)
            coeffs = layer._params(h)
            y2 = y.permute(0, 2, 3, 1)[..., c1:]
            with torch.no_grad():
                x2, _ = layer._uncouple(tuple(t.detach() for t in coeffs), y2)
            x2.requires_grad_()
            y2_again, logdet = layer._couple(coeffs, x2)
            gy_nhwc = gy.permute(0, 2, 3, 1)
            gx1, gx2, *gp = _grad((y2_again, logdet), [x1, x2, *params], (gy_nhwc[..., c1:], gld))
        gx1 = gy[:, :c1] if gx1 is None else gx1 + gy[:, :c1]
        gx2 = torch.zeros_like(x2) if gx2 is None else gx2
        x = torch.cat([x1.detach().permute(0, 2, 3, 1), x2.detach()], dim=-1)
        gx = torch.cat([gx1.permute(0, 2, 3, 1), gx2], dim=-1)
        return x.permute(0, 3, 1, 2), gx.permute(0, 3, 1, 2), tuple(gp)
    with torch.no_grad():
        x, _ = layer.inverse(y)
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        y_again, logdet = layer(x)
        gx, *gp = _grad((y_again, logdet), [x, *params], (gy, gld))
    return x.detach(), torch.zeros_like(x) if gx is None else gx, tuple(gp)


class _InvertibleChain(torch.autograd.Function):
    """Runs ``groups`` (layers, each a leaf or a :class:`Compose` of leaves) on ``x``, adding
    their log-dets to ``logdet`` in the order :class:`Compose` does (so the values are the plain
    path's bit for bit); keeps only the output for backward. Inputs: ``x``, ``logdet``, the
    groups, their leaves, then every leaf's trainable parameters in order."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        logdet: Tensor,
        groups: list[InvertibleLayer],
        leaves: list[InvertibleLayer],
        chunk: int | None,
        *params: Tensor,
    ) -> tuple[Tensor, Tensor]:
        ctx.leaves, ctx.chunk = leaves, chunk
        with torch.no_grad():
            for group in groups:
                x, ld = group(x)
                logdet = logdet + ld
        ctx.save_for_backward(x)
        return x, logdet

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None, gld: Tensor | None) -> tuple[Tensor | None, ...]:
        (y,) = ctx.saved_tensors
        y = y.detach()
        gy = torch.zeros_like(y) if gy is None else gy
        gld = y.new_zeros(y.shape[0]) if gld is None else gld
        per_layer: list[tuple[Tensor | None, ...]] = []
        for layer in reversed(ctx.leaves):
            y, gy, gp = _layer_backward(layer, y, gy, gld, ctx.chunk)
            per_layer.append(gp)
        param_grads = [g for gp in reversed(per_layer) for g in gp]
        return (gy if ctx.needs_input_grad[0] else None, gld, None, None, None, *param_grads)


def _chain(
    groups: list[InvertibleLayer], x: Tensor, logdet: Tensor, chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """The groups through :class:`_InvertibleChain`; without ``chunk``, the last one under
    plain autograd instead (see the module docstring: its activations are the first the
    backward needs, so keeping them costs no more memory than rebuilding the whole batch, and
    saves one recomputation; a rebuild in pieces needs less than that, so then nothing is kept)."""
    kept = groups[-1:] if chunk is None else []
    chained = groups[: len(groups) - len(kept)]
    if chained:
        leaves = [leaf for group in chained for leaf in _leaves(group) or ()]
        params = [p for layer in leaves for p in _trainable(layer)]
        x, logdet = _InvertibleChain.apply(x, logdet, chained, leaves, chunk, *params)
    for group in kept:
        x, ld = group(x)
        logdet = logdet + ld
    return x, logdet


def invertible_forward(
    layer: InvertibleLayer, x: Tensor, chunk: int | None = None
) -> tuple[Tensor, Tensor]:
    """``layer(x)`` (same outputs, same gradients up to round-off) with the invertible backward
    described in the module docstring.

    Walks :class:`Compose` and :class:`Split` (so every level of a multi-scale flow gets its own
    chain); parameter-free layers (squeeze, flatten) run under plain autograd, which keeps
    nothing for them. Falls back to ``layer(x)`` when autograd is off or some data-dependent
    layer is still waiting for its initialisation. ``chunk``: the backward rebuilds and
    back-propagates each coupling in pieces of at most this many samples (the samples are
    independent once data init is done), so its transient activations are a piece's, not the
    batch's; parameter gradients are summed over the pieces (equal up to summation order).

    Example::

        >>> flow = build_flow("tiny", in_shape=(1, 8, 8))
        >>> flow.data_init(torch.randn(32, 1, 8, 8))
        >>> z, logdet = invertible_forward(flow.flow, torch.randn(4, 1, 8, 8))
        >>> (z.square().sum() - logdet.sum()).backward()
    """
    if not torch.is_grad_enabled() or any(
        m._init_pending for m in layer.modules() if isinstance(m, DataInitModule)
    ):
        return layer(x)
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be None or an int >= 1 (samples), got {chunk!r}")
    return _walk(layer, x, lambda g, h, ld: _chain(g, h, ld, chunk))


def _walk(
    layer: InvertibleLayer, x: Tensor, chain: Callable[..., tuple[Tensor, Tensor]] = _chain
) -> tuple[Tensor, Tensor]:
    if isinstance(layer, Split):
        if layer.inner is None:
            return layer(x)
        b = x.shape[0]
        z1, logdet = _walk(layer.inner, x[:, : layer.keep], chain)
        return torch.cat([x[:, layer.keep :].reshape(b, -1), z1], dim=1), logdet
    if not isinstance(layer, Compose):
        if _leaves(layer):
            return chain([layer], x, x.new_zeros(x.shape[0]))
        return layer(x)
    logdet = x.new_zeros(x.shape[0])
    pending: list[InvertibleLayer] = []
    for sub in layer.layers:
        if _leaves(sub):
            pending.append(sub)
            continue
        if pending:
            x, logdet = chain(pending, x, logdet)
            pending = []
        x, ld = _walk(sub, x, chain)
        logdet = logdet + ld
    if pending:
        x, logdet = chain(pending, x, logdet)
    return x, logdet


@torch.no_grad()
def reconstruction_error(layer: InvertibleLayer, x: Tensor) -> dict[str, float]:
    """How far the invertible backward's rebuilt activations are from the true ones.

    Runs ``layer`` forward on ``x`` keeping every chain layer's input, then rebuilds each chain
    from its output the way the backward does (``inverse``, layer by layer, from the chain's
    end) and compares. Returns ``max_abs`` and ``max_rel`` (max |rebuilt - true| over the
    largest |true| of that activation) over every rebuilt activation, ``input_max_abs`` (the
    first layer's rebuilt input of each chain, the error after the chain's full depth) and
    ``layers`` (how many activations were compared).
    """
    chains: list[tuple[list[InvertibleLayer], list[Tensor]]] = []

    def record(groups: list[InvertibleLayer], h: Tensor, logdet: Tensor) -> tuple[Tensor, Tensor]:
        layers = [leaf for group in groups for leaf in _leaves(group) or ()]
        seen = [h]
        for sub in layers:
            h, ld = sub(h)
            seen.append(h)
            logdet = logdet + ld
        chains.append((layers, seen))
        return h, logdet

    _walk(layer, x, record)
    max_abs = max_rel = input_abs = 0.0
    count = 0
    for layers, seen in chains:
        y = seen[-1]
        for i in range(len(layers) - 1, -1, -1):
            y, _ = layers[i].inverse(y)
            err = (y - seen[i]).abs().max().item()
            max_abs = max(max_abs, err)
            max_rel = max(max_rel, err / max(seen[i].abs().max().item(), 1e-30))
            count += 1
        input_abs = max(input_abs, (y - seen[0]).abs().max().item())
    return {"max_abs": max_abs, "max_rel": max_rel, "input_max_abs": input_abs, "layers": count}
