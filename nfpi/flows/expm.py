r"""Batched matrix exponential with a Fréchet-derivative backward.

:func:`expm` equals ``torch.linalg.matrix_exp`` to round-off, forward and backward, and is the
exponential every MEF layer uses. Its backward differs: for a loss with gradient ``G`` at
``X = e^M`` the gradient at ``M`` is the adjoint Fréchet derivative

.. math:: \nabla_M = L_{\exp}(M^\top, G), \qquad
          L_{\exp}(A, E) = \lim_{t \to 0} \tfrac{1}{t}\,\big(e^{A + tE} - e^{A}\big),

which PyTorch computes as the top-right block of the exponential of the 2c x 2c block matrix
``[[M^T, G], [0, M^T]]``: a dense exponential at twice the size, 8 times the work per product.
Here the same block-triangular product is carried out at size c (Al-Mohy & Higham 2009, "Computing
the Fréchet derivative of the matrix exponential"): a pair ``(X, L)`` stands for the block matrix
``[[X, L], [0, X]]``, and ``(X1, L1)(X2, L2) = (X1 X2, X1 L2 + L1 X2)`` costs 3 products of size
c. The exponential is a degree-m Taylor polynomial of ``A / 2^s`` evaluated by Paterson-Stockmeyer,
then squared s times; (m, s) come from the largest 1-norm in the batch so that the truncation
error stays below the unit round-off of the dtype.

The forward is the same scaling-and-squaring Taylor evaluation on plain matrices, so forward and
backward each read one norm of the batch back to the host (``torch.linalg.matrix_exp`` does the
same on CUDA; the released MEF code read one norm per Taylor term).

Example::

    >>> m = 0.1 * torch.randn(16, 6, 6, requires_grad=True)
    >>> x = expm(m)                        # == torch.linalg.matrix_exp(m) to round-off
    >>> x.sum().backward()                 # Fréchet-derivative backward
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from nfpi.errors import ShapeError

__all__ = ["expm", "expm_frechet", "taylor_plan"]

_DEGREES = (2, 4, 6, 9, 12, 16, 20, 25)  # Paterson-Stockmeyer-optimal Taylor degrees
_MAX_SQUARINGS = 64


def _ps_block(m: int) -> int:
    """The Paterson-Stockmeyer block size q for degree m (products: q - 1 + ceil(m / q) - 1)."""
    return max(1, math.ceil(math.sqrt(m)))


def _ps_products(m: int) -> int:
    q = _ps_block(m)
    return q - 1 + math.ceil(m / q) - 1


@functools.lru_cache(maxsize=8)
def _theta(m: int, unit: float) -> float:
    """Largest norm bound t for which the Taylor remainder of degree m is below unit * t.

    The remainder of the Taylor series at ||A|| <= t is at most t^(m+1) e^t / (m+1)!, so the
    truncation is a relative perturbation of A of at most t^m e^t / (m+1)!: below the unit
    round-off it is invisible, and squaring preserves a relative backward error of A.
    """
    log_bound = math.log(unit) + math.lgamma(m + 2)
    lo, hi = 0.0, 64.0
    for _ in range(100):  # bisection on m log t + t = log(unit (m+1)!)
        mid = 0.5 * (lo + hi)
        if m * math.log(mid) + mid <= log_bound:
            lo = mid
        else:
            hi = mid
    return lo


def taylor_plan(norm: float, dtype: torch.dtype) -> tuple[int, int]:
    """(degree m, squarings s) of the cheapest plan for a batch of 1-norm at most ``norm``.

    Cost in matrix products: Paterson-Stockmeyer's for degree m plus one per squaring; ties go
    to the higher degree (fewer squarings, less round-off amplification).
    """
    if not math.isfinite(norm):
        return _DEGREES[-1], _MAX_SQUARINGS
    unit = torch.finfo(dtype).eps / 2
    best: tuple[int, int, int] | None = None
    for m in _DEGREES:
        theta = _theta(m, unit)
        s = 0 if norm <= theta else math.ceil(math.log2(norm / theta))
        s = min(s, _MAX_SQUARINGS)
        cost = _ps_products(m) + s
        if best is None or cost <= best[0]:
            best = (cost, m, s)
    assert best is not None
    return best[1], best[2]


def _batch_norm(a: Tensor) -> float:
    """max over the batch of ||a||_1 (one host read)."""
    return float(a.abs().sum(dim=-2).amax()) if a.numel() else 0.0


def _coefficients(m: int) -> list[float]:
    return [1.0 / math.factorial(k) for k in range(m + 1)]


# Below this size (on CPU) products run on the "batch-last" layout [c, c, N]: PyTorch's bmm of
# tiny matrices takes a scalar loop (0.8 GFLOP/s at c = 6 here), while c fused multiply-adds over
# [c, c, N] rows vectorise over the batch (17x faster at c = 6, 1.5x at c = 8, slower at c = 12).
_BATCH_LAST_MAX = 8


class _BatchFirst:
    """Products of [N, c, c] batches with bmm."""

    @staticmethod
    def to(a: Tensor) -> Tensor:
        return a

    @staticmethod
    def back(a: Tensor) -> Tensor:
        return a

    @staticmethod
    def mm(a: Tensor, b: Tensor) -> Tensor:
        return torch.bmm(a, b)

    @staticmethod
    def mm_add(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """c + a b"""
        return torch.baddbmm(c, a, b)

    @staticmethod
    def transpose(a: Tensor) -> Tensor:
        return a.mT

    @staticmethod
    def diagonal(a: Tensor) -> Tensor:
        return a.diagonal(dim1=-2, dim2=-1)


class _BatchLast:
    """Products of [c, c, N] batches as c fused multiply-adds of [c, c, N] rows."""

    @staticmethod
    def to(a: Tensor) -> Tensor:
        return a.permute(1, 2, 0).contiguous()

    @staticmethod
    def back(a: Tensor) -> Tensor:
        return a.permute(2, 0, 1)

    @staticmethod
    def mm(a: Tensor, b: Tensor) -> Tensor:
        out = a[:, :1] * b[:1]
        for j in range(1, a.shape[1]):
            out.addcmul_(a[:, j : j + 1], b[j : j + 1])
        return out

    @staticmethod
    def mm_add(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
        out = torch.addcmul(c, a[:, :1], b[:1])
        for j in range(1, a.shape[1]):
            out.addcmul_(a[:, j : j + 1], b[j : j + 1])
        return out

    @staticmethod
    def transpose(a: Tensor) -> Tensor:
        return a.transpose(0, 1)

    @staticmethod
    def diagonal(a: Tensor) -> Tensor:
        return a.diagonal(dim1=0, dim2=1)


def _layout(a: Tensor) -> type[_BatchFirst | _BatchLast]:
    small = a.shape[-1] <= _BATCH_LAST_MAX and a.device.type == "cpu"
    return _BatchLast if small else _BatchFirst


def _taylor(ops: Any, a: Tensor, m: int) -> Tensor:
    """T_m(a) = sum_{k <= m} a^k / k! by Paterson-Stockmeyer (a in the layout of ``ops``)."""
    c = _coefficients(m)
    q = _ps_block(m)
    powers = [a, a]  # powers[i] = a^i for i >= 1 (the identity is added on the diagonal)
    for _ in range(q - 1):
        powers.append(ops.mm(powers[-1], a))

    def block(j: int) -> Tensor:
        # sum_{i < q, jq + i <= m} c_{jq+i} a^i
        out = powers[1] * c[j * q + 1] if j * q + 1 <= m else torch.zeros_like(a)
        for i in range(2, q):
            if j * q + i <= m:
                out.add_(powers[i], alpha=c[j * q + i])
        ops.diagonal(out).add_(c[j * q])
        return out

    r = m // q
    aq = powers[q]
    if r * q == m:  # the top block is c_m I: its first Horner product is a scaling
        p = block(r - 1).add_(aq, alpha=c[m])
        start = r - 2
    else:
        p = block(r)
        start = r - 1
    for j in range(start, -1, -1):
        p = ops.mm_add(block(j), p, aq)
    return p


def _taylor_pair(ops: Any, a: Tensor, e: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(T_m(a), L_{T_m}(a, e)): Paterson-Stockmeyer in the algebra of pairs (X, L) = the
    block-triangular matrices [[X, L], [0, X]] (a, e in the layout of ``ops``)."""
    c = _coefficients(m)
    q = _ps_block(m)
    px, pl = [a, a], [e, e]  # px[i] = a^i, pl[i] = L_{a^i}(a, e) for i >= 1
    for _ in range(q - 1):
        x, lx = px[-1], pl[-1]
        pl.append(ops.mm_add(ops.mm(x, e), lx, a))
        px.append(ops.mm(x, a))

    def block(j: int) -> tuple[Tensor, Tensor]:
        bx, bl = torch.zeros_like(a), torch.zeros_like(a)
        for i in range(1, q):
            if j * q + i <= m:
                bx.add_(px[i], alpha=c[j * q + i])
                bl.add_(pl[i], alpha=c[j * q + i])
        ops.diagonal(bx).add_(c[j * q])
        return bx, bl

    r = m // q
    ax, al = px[q], pl[q]
    if r * q == m:
        x, lx = block(r - 1)
        x.add_(ax, alpha=c[m])
        lx.add_(al, alpha=c[m])
        start = r - 2
    else:
        x, lx = block(r)
        start = r - 1
    for j in range(start, -1, -1):
        bx, bl = block(j)
        # (x, lx) (ax, al) + (bx, bl)
        lx = ops.mm_add(ops.mm_add(bl, x, al), lx, ax)
        x = ops.mm_add(bx, x, ax)
    return x, lx


def _as_batch(a: Tensor, where: str) -> Tensor:
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ShapeError(f"{where} expects square matrices [..., c, c], got {tuple(a.shape)}")
    return a.reshape(-1, a.shape[-2], a.shape[-1])


def _expm_forward(a: Tensor) -> Tensor:
    flat = _as_batch(a, "expm")
    ops = _layout(flat)
    m, s = taylor_plan(_batch_norm(flat), flat.dtype)
    x = _taylor(ops, ops.to(flat * 2.0**-s if s else flat), m)
    for _ in range(s):
        x = ops.mm(x, x)
    return ops.back(x).reshape(a.shape)


def expm_frechet(a: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
    """``(e^a, L_exp(a, e))``: the exponential and its Fréchet derivative at ``a`` in direction
    ``e`` (both [..., c, c]), at size c (3 products per block-triangular product)."""
    if e.shape != a.shape:
        raise ShapeError(f"expm_frechet expects e of a's shape {tuple(a.shape)}, got {e.shape}")
    fa, fe = _as_batch(a, "expm_frechet"), e.reshape(-1, a.shape[-2], a.shape[-1])
    ops = _layout(fa)
    m, s = taylor_plan(_batch_norm(fa), fa.dtype)
    if s:
        fa, fe = fa * 2.0**-s, fe * 2.0**-s
    x, lx = _taylor_pair(ops, ops.to(fa), ops.to(fe), m)
    for _ in range(s):
        lx = ops.mm_add(ops.mm(x, lx), lx, x)
        x = ops.mm(x, x)
    return ops.back(x).reshape(a.shape), ops.back(lx).reshape(a.shape)


class _Expm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: Tensor) -> Tensor:
        ctx.save_for_backward(a)
        return _expm_forward(a)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        # The exponential is a power series with real coefficients, so its adjoint Fréchet
        # derivative is the Fréchet derivative at the transpose.
        return expm_frechet(a.mT, grad.contiguous())[1]


def expm(a: Tensor) -> Tensor:
    """``e^a`` of a batch of square matrices [..., c, c] (real floating dtype), differentiable
    with a Fréchet-derivative backward (see the module docstring). Matches
    ``torch.linalg.matrix_exp`` to round-off."""
    if not (a.is_floating_point() and not a.is_complex()):
        raise TypeError(f"expm expects a real floating tensor, got {a.dtype}")
    if torch.compiler.is_compiling():
        # The Taylor plan is chosen on the host from the norm of ``a`` (a graph break, and a
        # recompile for every new norm); PyTorch's own exponential stays in the graph.
        return torch.linalg.matrix_exp(a)
    return _Expm.apply(a)
