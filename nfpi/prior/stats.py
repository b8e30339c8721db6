"""Per-class sufficient statistics of latents: count, shifted sum and shifted sum of squares.

The statistics are plain sums, so they merge by addition: across batches of a streaming pass and
across data-parallel workers (``torch.distributed.all_reduce`` of :meth:`ClassStatistics.flat`).
Sums are accumulated in float64 around a per-class ``shift``; with the shift near the class mean
(a previous prior's means, or a batch's own class means) the variance formula
``(S2 - S1**2 / n) / (n - 1)`` has no catastrophic cancellation even for latents whose means are
large compared with their spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nfpi.errors import InsufficientSamplesError, LabelRangeError, NonFiniteError, ShapeError

__all__ = ["ClassStatistics"]


def _check_batch(z: Tensor, y: Tensor, num_classes: int, dim: int | None) -> None:
    if z.ndim != 2:
        raise ShapeError(
            f"latents z must have shape [B, d], got {tuple(z.shape)}; flatten them first"
        )
    if dim is not None and z.shape[1] != dim:
        raise ShapeError(f"latents z have d={z.shape[1]} but the statistics hold d={dim}")
    if y.ndim != 1 or y.shape[0] != z.shape[0]:
        raise ShapeError(f"labels y must have shape [B]={z.shape[0]}, got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ShapeError(f"labels y must be an integer tensor, got {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise LabelRangeError(
            f"labels must lie in [0, {num_classes}) but range over [{int(y.min())}, {int(y.max())}]; "
            "check num_classes or the dataset's label encoding"
        )
    if not torch.isfinite(z).all():
        bad = int((~torch.isfinite(z)).any(dim=1).sum())
        raise NonFiniteError(f"{bad} of {z.shape[0]} latent vectors contain NaN or inf")


@dataclass
class ClassStatistics:
    """Mergeable per-class statistics of latents ``z`` with labels ``y``.

    Attributes (all float64):
        count: [K] number of samples per class.
        sum: [K, d] sum over the class's samples of ``z - shift``.
        sumsq: [K, d] sum of ``(z - shift) ** 2``.
        shift: [K, d] the reference point of the sums.
        outer: [K, d, d] sum of ``(z - shift)(z - shift)^T``, or None (only for full covariances).
        nll_range: [2] the smallest and largest per-sample NLL (nats) of the pass under the prior
            it ran with, or None (only the release's GD form reads it; merged by min / max, and
            not part of :meth:`flat`).

    ``a + b`` equals the statistics of the concatenated data (``b`` is re-expressed around
    ``a.shift`` exactly if the shifts differ). Accumulating many batches onto one fixed shift
    (:meth:`update_`) keeps the tensors all-reducible by plain summation.
    """

    count: Tensor
    sum: Tensor
    sumsq: Tensor
    shift: Tensor
    outer: Tensor | None = None
    nll_range: Tensor | None = None

    def __post_init__(self) -> None:
        k, d = self.sum.shape
        shapes = {"count": (k,), "sumsq": (k, d), "shift": (k, d)}
        if self.nll_range is not None:
            shapes["nll_range"] = (2,)
        if self.outer is not None:
            shapes["outer"] = (k, d, d)
        for name, shape in shapes.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ShapeError(f"ClassStatistics.{name} must have shape {shape}, got {got}")

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def empty(
        cls,
        num_classes: int,
        dim: int,
        *,
        shift: Tensor | None = None,
        full: bool = False,
        device: torch.device | str | None = None,
    ) -> ClassStatistics:
        """Zero statistics around ``shift`` ([K, d], default 0), ready for :meth:`update_`."""
        if num_classes < 1 or dim < 1:
            raise ShapeError(f"need num_classes >= 1 and dim >= 1, got {num_classes}, {dim}")
        f64 = {"dtype": torch.float64, "device": device}
        if shift is None:
            shift = torch.zeros(num_classes, dim, **f64)
        else:
            if tuple(shift.shape) != (num_classes, dim):
                raise ShapeError(
                    f"shift must have shape {(num_classes, dim)}, got {tuple(shift.shape)}"
                )
            shift = shift.detach().to(**f64).clone()
        return cls(
            count=torch.zeros(num_classes, **f64),
            sum=torch.zeros(num_classes, dim, **f64),
            sumsq=torch.zeros(num_classes, dim, **f64),
            shift=shift,
            outer=torch.zeros(num_classes, dim, dim, **f64) if full else None,
        )

    @classmethod
    def from_batch(
        cls,
        z: Tensor,
        y: Tensor,
        num_classes: int,
        *,
        shift: Tensor | None = None,
        full: bool = False,
    ) -> ClassStatistics:
        """Statistics of one batch ``z`` [B, d], ``y`` [B].

        Without ``shift`` the batch's own class means are used (exact and stable); pass a common
        ``shift`` when the result will be all-reduced with other workers' statistics.
        """
        _check_batch(z, y, num_classes, None)
        if shift is None:
            z64, y = z.detach().to(torch.float64), y.to(z.device)
            n = torch.zeros(num_classes, dtype=torch.float64, device=z.device).index_add_(
                0, y, torch.ones_like(y, dtype=torch.float64)
            )
            s = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, device=z.device)
            s.index_add_(0, y, z64)
            shift = s / n.clamp_min(1.0)[:, None]
        stats = cls.empty(num_classes, z.shape[1], shift=shift, full=full, device=z.device)
        return stats.update_(z, y)

    # ------------------------------------------------------------------------------- accumulate
    @property
    def num_classes(self) -> int:
        return self.sum.shape[0]

    @property
    def dim(self) -> int:
        return self.sum.shape[1]

    @property
    def full(self) -> bool:
        return self.outer is not None

    @torch.no_grad()
    def update_(self, z: Tensor, y: Tensor) -> ClassStatistics:
        """Add a batch in place, in one vectorised pass (no loop over classes). Returns self."""
        _check_batch(z, y, self.num_classes, self.dim)
        y = y.to(self.sum.device)
        zc = z.detach().to(device=self.sum.device, dtype=torch.float64) - self.shift[y]
        self.count.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        self.sum.index_add_(0, y, zc)
        self.sumsq.index_add_(0, y, zc * zc)
        if self.outer is not None:
            # One GEMM for all classes: [K*d, B] @ [B, d]; memory O(B K d), never a class loop.
            onehot = torch.nn.functional.one_hot(y, self.num_classes).to(zc.dtype)  # [B, K]
            lhs = (onehot[:, :, None] * zc[:, None, :]).reshape(zc.shape[0], -1)  # [B, K*d]
            self.outer += (lhs.T @ zc).reshape(self.num_classes, self.dim, self.dim)
        return self

    def reshifted(self, shift: Tensor) -> ClassStatistics:
        """The same statistics expressed around another ``shift`` (exact algebra)."""
        shift = shift.to(self.shift)
        delta = self.shift - shift  # z - new = (z - old) + delta
        n = self.count[:, None]
        s1 = self.sum + n * delta
        s2 = self.sumsq + 2.0 * delta * self.sum + n * delta * delta
        outer = None
        if self.outer is not None:
            cross = self.sum[:, :, None] * delta[:, None, :]
            outer = (
                self.outer
                + cross
                + cross.transpose(1, 2)
                + n[:, :, None] * delta[:, :, None] * delta[:, None, :]
            )
        return ClassStatistics(self.count.clone(), s1, s2, shift.clone(), outer, self.nll_range)

    def __add__(self, other: ClassStatistics) -> ClassStatistics:
        if not isinstance(other, ClassStatistics):
            return NotImplemented
        if (other.num_classes, other.dim, other.full) != (self.num_classes, self.dim, self.full):
            raise ShapeError(
                "cannot merge statistics of (K, d, full) = "
                f"{(self.num_classes, self.dim, self.full)} and {(other.num_classes, other.dim, other.full)}"
            )
        if not torch.equal(other.shift, self.shift):
            other = other.reshifted(self.shift)
        ranges = [r for r in (self.nll_range, other.nll_range) if r is not None]
        nll_range = None
        if ranges:
            both = torch.stack(ranges)
            nll_range = torch.stack([both[:, 0].min(), both[:, 1].max()])
        return ClassStatistics(
            self.count + other.count,
            self.sum + other.sum,
            self.sumsq + other.sumsq,
            self.shift.clone(),
            None if self.outer is None else self.outer + other.outer,
            nll_range,
        )

    # -------------------------------------------------------------------- flat view (all-reduce)
    def flat(self) -> Tensor:
        """All summable fields in one contiguous float64 buffer (shift excluded: it must agree)."""
        parts = [self.count, self.sum.flatten(), self.sumsq.flatten()]
        if self.outer is not None:
            parts.append(self.outer.flatten())
        return torch.cat(parts)

    def with_flat(self, buffer: Tensor) -> ClassStatistics:
        """Statistics around the same shift whose sums are read back from :meth:`flat`'s layout."""
        k, d = self.num_classes, self.dim
        expected = k + 2 * k * d + (k * d * d if self.full else 0)
        if buffer.numel() != expected:
            raise ShapeError(
                f"flat statistics buffer must hold {expected} values, got {buffer.numel()}"
            )
        buffer = buffer.to(self.sum)
        count, s1, s2 = buffer[:k], buffer[k : k + k * d], buffer[k + k * d : k + 2 * k * d]
        outer = buffer[k + 2 * k * d :].reshape(k, d, d).clone() if self.full else None
        return ClassStatistics(
            count.clone(),
            s1.reshape(k, d).clone(),
            s2.reshape(k, d).clone(),
            self.shift.clone(),
            outer,
            None if self.nll_range is None else self.nll_range.clone(),
        )

    def to(self, device: torch.device | str) -> ClassStatistics:
        mv = lambda t: None if t is None else t.to(device)
        return ClassStatistics(
            mv(self.count),
            mv(self.sum),
            mv(self.sumsq),
            mv(self.shift),
            mv(self.outer),
            mv(self.nll_range),
        )

    # ------------------------------------------------------------------------------- moments
    def _require(self, minimum: int, what: str) -> None:
        low = (self.count < minimum).nonzero().flatten()
        if low.numel():
            shown = ", ".join(f"{int(c)} (n={int(self.count[c])})" for c in low[:10])
            raise InsufficientSamplesError(
                f"{what} needs >= {minimum} samples per class; classes {shown}"
                f"{' ...' if low.numel() > 10 else ''} have fewer. Use more data per class "
                "(items_per_class) or drop empty classes"
            )

    def mean(self) -> Tensor:
        """Class means m_y [K, d] (float64)."""
        self._require(1, "a class mean")
        return self.shift + self.sum / self.count[:, None]

    def var(self) -> Tensor:
        """Unbiased per-dimension class variances s_y [K, d] (float64)."""
        self._require(2, "an unbiased variance")
        n = self.count[:, None]
        return ((self.sumsq - self.sum * self.sum / n) / (n - 1.0)).clamp_min(0.0)

    def cov(self) -> Tensor:
        """Unbiased class covariance matrices [K, d, d] (needs ``full=True`` statistics)."""
        if self.outer is None:
            raise ShapeError("full covariances need statistics accumulated with full=True")
        self._require(2, "an unbiased covariance")
        n = self.count[:, None, None]
        c = (self.outer - self.sum[:, :, None] * self.sum[:, None, :] / n) / (n - 1.0)
        return 0.5 * (c + c.transpose(1, 2))

    def state_dict(self) -> dict[str, Tensor | None]:
        return {
            "count": self.count,
            "sum": self.sum,
            "sumsq": self.sumsq,
            "shift": self.shift,
            "outer": self.outer,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor | None]) -> ClassStatistics:
        return cls(**state)
