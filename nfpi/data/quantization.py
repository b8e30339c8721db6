"""Uniform dequantisation of 8-bit images and the bits/dim accounting (method notes, section 7).

A pixel value ``k`` in ``0..255`` becomes the continuous value ``t = (k + u) / 256`` with
``u ~ U[0, 1)``, which is then mapped affinely to ``x = 2 t - 1 = (k - 128 + u) / 128`` in
``[-1, 1)``. The flow models the density ``p_x`` of ``x``. In pixel units (bins of width 1) the
density is ``p_x / 128**d``, so the continuous NLL of ``x`` plus ``d * log(128)`` nats is the
usual variational upper bound on the discrete NLL of the 8-bit image:

    NLL_discrete <= E_u[-log p_x(x)] + d log 128,      bits/dim = NLL / (d ln 2).

Sanity check: a uniform density on ``[-1, 1]^d`` has ``-log p_x = d log 2``; adding the offset
gives ``d log 256`` nats, i.e. exactly 8 bits/dim, the cost of storing raw bytes.
"""

from __future__ import annotations

import math

import torch

from nfpi.errors import ConfigError, ShapeError

__all__ = [
    "LEVELS_8BIT",
    "bits_per_dim",
    "dequantization_offset",
    "dequantize",
    "display_uint8",
    "to_uint8",
]

#: Grey levels of 8-bit data; datasets with fewer levels (scikit-learn's digits: 17, values
#: 0..16) store the level index k in 0..levels-1 as uint8 and pass ``levels`` explicitly.
LEVELS_8BIT = 256


def _check_levels(levels: int) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 256:
        raise ConfigError("levels", levels, "an int in [2, 256] (grey levels per channel)")
    return levels


# Half precisions are excluded: bfloat16 cannot represent a point strictly inside a pixel's bin
# near |x| = 1 (its ulp there equals the bin width 2**-7), so the noise would vanish.
_FLOAT_DTYPES = (torch.float32, torch.float64)


def dequantize(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    noise: torch.Tensor | None = None,
    levels: int = LEVELS_8BIT,
) -> torch.Tensor:
    """Uniformly dequantise uint8 images to floats in ``[-1, 1)``.

    With ``levels = L`` other than 256 (level index ``k`` in ``0..L-1``), ``x = 2 (k + u) / L - 1``:
    the ``L`` bins of width ``2 / L`` tile ``[-1, 1)`` (digits: ``L = 17``). ``u`` is kept
    ``1e-5`` away from the bin edges there so that :func:`to_uint8` with the same ``levels``
    inverts it exactly despite rounding (a negligible change of the density).

    ``x = (k - 128 + u) / 128`` with ``u ~ U[0, 1)`` drawn independently per element, i.e. the
    pixel ``k`` maps to the bin ``[k/128 - 1, (k+1)/128 - 1)``; :func:`to_uint8` is the exact
    inverse (``to_uint8(dequantize(x)) == x`` for every value, including 255).

    Args:
        x: uint8 tensor of any shape, e.g. ``[B, C, H, W]``.
        generator: optional ``torch.Generator`` (on ``x.device``) for reproducible noise; the
            un-augmented test evaluation may reuse one seeded generator so that every
            evaluation sees the same noise.
        dtype: ``torch.float32`` (default) or ``torch.float64`` (tests).
        noise: optional ``u`` of ``x.shape`` with values in ``[0, 1)`` to use instead of drawing
            it (then ``generator`` is ignored); e.g. ``torch.full_like(x, 0.5, dtype=...)``
            for bin centres.

    Returns:
        Tensor of ``x.shape`` and ``dtype`` with values in ``[-1, 1)``.

    Example:
        >>> k = torch.arange(256, dtype=torch.uint8)
        >>> bool((to_uint8(dequantize(k)) == k).all())
        True
    """
    if x.dtype != torch.uint8:
        raise ShapeError(
            f"dequantize expects a uint8 tensor of pixel values 0..255, got dtype {x.dtype}; "
            "datasets of nfpi.data yield uint8 images, dequantise them before the flow"
        )
    if dtype not in _FLOAT_DTYPES:
        raise ConfigError("dtype", dtype, f"one of {_FLOAT_DTYPES}")
    k = x.to(dtype)
    if noise is None:
        u = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
    else:
        if noise.shape != x.shape:
            raise ShapeError(
                f"noise has shape {tuple(noise.shape)}, expected x.shape {tuple(x.shape)}"
            )
        u = noise.to(dtype=dtype, device=x.device)
        if not bool(((u >= 0) & (u < 1)).all()):
            raise ConfigError(
                "noise", f"range [{u.min().item()}, {u.max().item()}]", "values in [0, 1)"
            )
    levels = _check_levels(levels)
    if levels != LEVELS_8BIT and x.numel() and int(x.max()) >= levels:
        raise ConfigError("x", f"max {int(x.max())}", f"level indices < levels = {levels}")
    if levels != LEVELS_8BIT:
        u = u.clamp(1e-5, 1.0 - 1e-5)
        return (k + u) * (2.0 / levels) - 1.0
    out = (k - 128.0 + u) / 128.0
    # k - 128 + u can round up to k - 127 when u is within half an ulp of 1 (possible in
    # float32), which would move the value into the next pixel's bin. Clamp to the
    # bin's top minus eps: (k - 127)/128 - eps is exactly representable (a multiple of 2**-7 minus
    # eps, magnitude < 1), so floor(128 x) stays k - 128 and the round trip is exact.
    top = (k - 127.0) / 128.0 - torch.finfo(dtype).eps
    return torch.minimum(out, top)


def to_uint8(x: torch.Tensor, levels: int = LEVELS_8BIT) -> torch.Tensor:
    """Map floats in ``[-1, 1]`` (e.g. generated samples) back to uint8 pixels.

    ``k = floor((x + 1) / 2 * 256)`` clamped to ``[0, 255]``: the inverse of :func:`dequantize`,
    so ``x = 1`` (top of the range) gives 255, not 256. Computed as ``floor(128 x) + 128``,
    which is the same number but exact in floating point (``128 x`` only shifts the exponent),
    whereas forming ``x + 1`` first can round a value just below a bin edge up onto it.
    NaN maps to 0. With ``levels = L`` other than 256: ``k = floor((x + 1) L / 2)`` clamped to
    ``[0, L - 1]`` (the inverse of ``dequantize(..., levels=L)``).

    Args:
        x: floating tensor of any shape.
        levels: grey levels of the data (the returned uint8 values are level indices).

    Returns:
        uint8 tensor of ``x.shape``.
    """
    if not x.is_floating_point():
        raise ShapeError(
            f"to_uint8 expects a floating tensor in [-1, 1], got dtype {x.dtype}; "
            "integer images are already quantised"
        )
    levels = _check_levels(levels)
    if levels != LEVELS_8BIT:
        k = torch.floor((x + 1.0) * (levels / 2.0))
        return torch.nan_to_num(k, nan=0.0).clamp(0.0, levels - 1.0).to(torch.uint8)
    k = torch.floor(x * 128.0) + 128.0
    k = torch.nan_to_num(k, nan=0.0)
    return k.clamp(0.0, 255.0).to(torch.uint8)


def _check_dim(d: int) -> int:
    if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
        raise ConfigError("d", d, "a positive int, the number of dimensions C * H * W")
    return d


def dequantization_offset(d: int, levels: int = LEVELS_8BIT) -> float:
    """Nats to add to the continuous NLL of ``x in [-1, 1]^d`` so that it bounds the NLL of
    the discrete data: ``d * log(levels / 2)`` (the log-Jacobian of ``x = 2 t / levels - 1``
    from level units ``t in [0, levels)``; ``d * log(128)`` for 8-bit data). A uniform density
    then costs exactly ``log2(levels)`` bits/dim (8 for 8-bit data, 4.09 for 17-level digits).

    Args:
        d: number of dimensions per image, ``C * H * W``.
        levels: grey levels of the data.
    """
    return _check_dim(d) * math.log(_check_levels(levels) / 2.0)


def bits_per_dim(nll_nats: float | torch.Tensor, d: int) -> float | torch.Tensor:
    """Convert a per-image NLL in nats to bits per dimension: ``nll / (d ln 2)``.

    ``nll_nats`` must already include :func:`dequantization_offset` to be comparable with
    published numbers (the conversion itself adds nothing). Works on floats and on tensors
    (e.g. a per-sample NLL of shape ``(B,)``).

    Example:
        >>> d = 3 * 32 * 32
        >>> bits_per_dim(d * math.log(2.0) + dequantization_offset(d), d)  # uniform density
        8.0
    """
    return nll_nats / (_check_dim(d) * math.log(2.0))


def display_uint8(k: torch.Tensor, levels: int = LEVELS_8BIT) -> torch.Tensor:
    """Level indices ``0..levels-1`` (uint8) as 0..255 grey values for pictures (identity for
    8-bit data)."""
    if _check_levels(levels) == LEVELS_8BIT:
        return k
    return (k.float() * (255.0 / (levels - 1))).round().to(torch.uint8)
