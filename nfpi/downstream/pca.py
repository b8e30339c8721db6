"""Latent PCA: per-class mean and principal axes of a flow's latents, and mixing in them.

The class subspaces behind the NF augmentation (:mod:`nfpi.downstream.nf_augment`, paper
section 5.3: pairs are mixed "in the span of the PCA axes of their classwise gaussians,
estimated on the underlying training data").

**Class subspaces** (:meth:`ClassPCA.fit`). For every class ``y`` we encode (a seeded random
subset of at most ``per_class_fit_samples`` of) its training images with the flow, at the centre
of each pixel's dequantisation bin (no noise, no augmentation), and keep the class mean ``m_y``
[d] and the top ``r`` principal axes ``U_y`` [d, r] (orthonormal columns, float64 SVD of the
centred latents; ``lambda_y`` [r] the variances along them). The gaussians are the data's own
class statistics, not the trained prior: the prior is diagonal (its principal axes would be
the coordinate axes) and FPI moves its means away from the data. Memory: one class's latents at
a time, ``n_fit x d`` float64 (1000 x 3072: 25 MB), plus the stored ``K x d x r`` axes (CIFAR-100,
r = 16: 39 MB in float64). A full covariance per class (``K d^2``: 7.5 GB for CIFAR-100) is
never formed.

**Mixing** (:meth:`ClassPCA.mix`). Write each latent as its class mean, its principal
coordinates and a residual orthogonal to the subspace,

    z_i = m_y + U_y c_i + rho_i,      c_i = U_y^T (z_i - m_y),      rho_i = (I - U_y U_y^T)(z_i - m_y),

mix the coordinates with a weight ``w`` (a scalar per pair, or one per axis: ``W = diag(w)``),
``c = (1 - W) c_1 + W c_2``, and keep the first image's residual:

    z = m_y + U_y c + rho_1 = z_1 + U_y W U_y^T (z_2 - z_1).

So ``w = 0`` returns ``z_1`` exactly, ``w = 1`` gives ``z_2``'s principal coordinates on
``z_1``'s off-subspace detail, and ``z - rho_1`` always lies in the affine subspace
``m_y + span(U_y)``. Keeping ``rho_1`` is deliberate: with ``r << d`` (16 of 3072) the residual
carries most of an image's specific detail, so the augmented image is image 1 moved along its
class's main modes of variation towards image 2, rather than a blend of two images (which is
what plain latent or pixel mixup gives). The mixed latent stays a same-class sample, so the
label is kept as it is (no label mixing).

Example::

    model = load_trained("runs/cifar10")
    train, info = load_dataset("cifar10", "train", root=...)
    pca = ClassPCA.fit(model.flow, train, info.num_classes, 16, levels=info.levels)
    z = pca.mix(z1, z2, y, weights=0.5)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nfpi.data import dequantize
from nfpi.errors import ConfigError, InsufficientSamplesError, LabelRangeError, ShapeError
from nfpi.schema import is_int

__all__ = ["ClassPCA"]

log = logging.getLogger(__name__)


def _principal_axes(zc: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r principal axes of centred latents ``zc`` [n, d] (float64).

    Returns axes [d, r] (orthonormal, sign fixed so that each axis's largest-magnitude entry is
    positive: the fit is then deterministic), variances [r] (descending) and the total
    variance (trace of the sample covariance)."""
    n = zc.shape[0]
    _, s, vh = torch.linalg.svd(zc, full_matrices=False)
    axes = vh[:r].T.contiguous()
    pivot = axes.abs().argmax(dim=0)
    sign = torch.sign(axes[pivot, torch.arange(r)])
    axes = axes * torch.where(sign == 0, torch.ones_like(sign), sign)
    var = s[:r] ** 2 / (n - 1)
    return axes, var, (s**2).sum() / (n - 1)


def dataset_targets(dataset: Any) -> Tensor:
    """The int64 labels of a map-style dataset (its ``targets``, else read item by item)."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return torch.as_tensor(targets, dtype=torch.int64)


def flow_device(flow: nn.Module) -> torch.device:
    """The device of a flow's parameters (else its buffers; CPU for an empty module)."""
    for p in flow.parameters():
        return p.device
    for b in flow.buffers():
        return b.device
    return torch.device("cpu")


def flow_dtype(flow: nn.Module) -> torch.dtype:
    """The float dtype a flow computes in (float32 unless its parameters are float64)."""
    for p in flow.parameters():
        return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.float32


class ClassPCA:
    """Per-class mean and top-r principal axes of the flow's latents (see the module docstring).

    Args:
        means: ``[K, d]`` class means.
        axes: ``[K, d, r]`` orthonormal principal axes per class (columns).
        variances: ``[K, r]`` variance along each axis (descending).
        counts: ``[K]`` latents the fit used per class.
        total_variance: ``[K]`` trace of each class's sample covariance (optional; for the
            explained-variance ratio).

    Stored in float64; :meth:`mix` and :meth:`project` compute in the dtype of the latents.
    """

    def __init__(
        self,
        means: Tensor,
        axes: Tensor,
        variances: Tensor,
        counts: Tensor,
        total_variance: Tensor | None = None,
    ) -> None:
        if means.ndim != 2:
            raise ShapeError(f"means must be [K, d], got {tuple(means.shape)}")
        k, d = means.shape
        if axes.ndim != 3 or tuple(axes.shape[:2]) != (k, d):
            raise ShapeError(f"axes must be [K, d, r] = [{k}, {d}, r], got {tuple(axes.shape)}")
        r = axes.shape[2]
        if not 1 <= r <= d:
            raise ShapeError(f"axes have r = {r} columns, need 1 <= r <= d = {d}")
        if tuple(variances.shape) != (k, r) or tuple(counts.shape) != (k,):
            raise ShapeError(
                f"variances must be [{k}, {r}] and counts [{k}], got "
                f"{tuple(variances.shape)} and {tuple(counts.shape)}"
            )
        f64 = {"dtype": torch.float64, "device": means.device}
        self.means = means.detach().to(**f64)
        self.axes = axes.detach().to(**f64)
        self.variances = variances.detach().to(**f64)
        self.counts = counts.detach().to(torch.int64)
        self.total_variance = None if total_variance is None else total_variance.detach().to(**f64)
        self._cast: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def n_components(self) -> int:
        return int(self.axes.shape[2])

    def explained_variance_ratio(self) -> Tensor:
        """``[K]``: share of each class's latent variance its r axes explain."""
        if self.total_variance is None:
            raise ShapeError("explained_variance_ratio needs total_variance (fit or from_latents)")
        return self.variances.sum(dim=1) / self.total_variance

    # ---------------------------------------------------------------------------- fitting
    @classmethod
    def from_latents(cls, z: Tensor, y: Tensor, num_classes: int, n_components: int) -> ClassPCA:
        """Fit from explicit latents ``z`` [N, d] and labels ``y`` [N] (all of them).

        Raises:
            InsufficientSamplesError: a class has fewer than ``n_components + 1`` latents.
        """
        if z.ndim != 2 or y.shape != (z.shape[0],):
            raise ShapeError(f"z must be [N, d] and y [N], got {tuple(z.shape)}, {tuple(y.shape)}")
        check_labels(y, num_classes)
        latents = (z[y == k].to(torch.float64) for k in range(num_classes))
        return cls._from_class_latents(latents, n_components)

    @classmethod
    def _from_class_latents(cls, latents: Iterable[Tensor], n_components: int) -> ClassPCA:
        """Fit class k = 0, 1, ... from the k-th float64 latents [N_k, d] of ``latents``,
        consumed one class at a time."""
        fits = [(*_fit_class(zk, n_components, k), zk.shape[0]) for k, zk in enumerate(latents)]
        means, axes, variances, totals, counts = zip(*fits, strict=True)
        return cls(
            torch.stack(means),
            torch.stack(axes),
            torch.stack(variances),
            torch.tensor(counts),
            torch.stack(totals),
        )

    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        flow: nn.Module,
        dataset: Any,
        num_classes: int,
        n_components: int,
        *,
        per_class_samples: int = 500,
        batch_size: int = 256,
        seed: int = 0,
        levels: int = 256,
    ) -> ClassPCA:
        """Fit on a training set through the flow, one class at a time.

        Args:
            flow: ``flow(x [B, C, H, W] in [-1, 1)) -> (z [B, d], logdet)``; run in eval mode
                (restored afterwards) on its own device.
            dataset: map-style, items ``(uint8 [C, H, W], label)``, ideally with ``targets``
                (else labels are read item by item). Pass the un-augmented training set.
            num_classes: K.
            n_components: r.
            per_class_samples: at most this many images per class (a seeded random subset).
            batch_size: images per flow call.
            seed: subset seed; the subset of class y depends on ``(seed, y)`` only.
            levels: grey levels of the dataset (the flow's ``info.levels``; 256 for 8-bit).

        Raises:
            InsufficientSamplesError: a class has fewer than ``r + 1`` images.
        """
        for name, value in (
            ("n_components", n_components),
            ("per_class_samples", per_class_samples),
            ("batch_size", batch_size),
        ):
            if not is_int(value) or value < 1:
                raise ConfigError(name, value, "an int >= 1")
        targets = dataset_targets(dataset)
        check_labels(targets, num_classes)
        device, dtype = flow_device(flow), flow_dtype(flow)

        def class_latents() -> Iterator[Tensor]:
            for k in range(num_classes):
                members = torch.nonzero(targets == k, as_tuple=True)[0]
                gen = torch.Generator().manual_seed(
                    int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
                )
                members = members[torch.randperm(members.numel(), generator=gen)]
                members = members[:per_class_samples]
                zs = []
                for start in range(0, members.numel(), batch_size):
                    idx = members[start : start + batch_size].tolist()
                    x = torch.stack([dataset[i][0] for i in idx]).to(device)
                    z, _ = flow(bin_centres(x, dtype, levels))
                    zs.append(z.to(torch.float64).cpu())
                log.debug("ClassPCA: class %d from %d latents", k, sum(len(c) for c in zs))
                yield torch.cat(zs) if zs else torch.empty(0, 0, dtype=torch.float64)

        was_training = flow.training
        flow.eval()
        try:
            pca = cls._from_class_latents(class_latents(), n_components)
        finally:
            flow.train(was_training)
        log.info(
            "ClassPCA: %d classes, r=%d, mean explained variance %.3f",
            num_classes,
            n_components,
            float(pca.explained_variance_ratio().mean()),
        )
        return pca

    # ------------------------------------------------------------------------- the maths
    def _gathered(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Class means [B, d] and axes [B, d, r] of labels y, in z's dtype and device."""
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ShapeError(f"latents must be [B, {self.dim}], got {tuple(z.shape)}")
        if y.shape != (z.shape[0],):
            raise ShapeError(f"labels must be [{z.shape[0]}], got {tuple(y.shape)}")
        check_labels(y, self.num_classes)
        key = (z.dtype, z.device)
        if key not in self._cast:
            self._cast[key] = (
                self.means.to(dtype=z.dtype, device=z.device),
                self.axes.to(dtype=z.dtype, device=z.device),
            )
        means, axes = self._cast[key]
        y = y.to(z.device)
        return means[y], axes[y]

    def project(self, z: Tensor, y: Tensor) -> Tensor:
        """Principal coordinates ``c = U_y^T (z - m_y)``: z [B, d], y [B] -> [B, r]."""
        m, u = self._gathered(z, y)
        return torch.einsum("bdr,bd->br", u, z - m)

    def residual(self, z: Tensor, y: Tensor) -> Tensor:
        """``rho = (I - U_y U_y^T)(z - m_y)``, the part of ``z - m_y`` off the class subspace:
        z [B, d], y [B] -> [B, d]."""
        m, u = self._gathered(z, y)
        zc = z - m
        return zc - torch.einsum("bdr,br->bd", u, torch.einsum("bdr,bd->br", u, zc))

    def mix(self, z1: Tensor, z2: Tensor, y: Tensor, weights: Tensor | float) -> Tensor:
        """Mix same-class latents in the span of their class's principal axes.

        ``z = m_y + U_y ((1 - W) c_1 + W c_2) + rho_1 = z_1 + U_y W U_y^T (z_2 - z_1)``, computed
        in the second form (no cancellation against the mean).

        Args:
            z1: ``[B, d]`` latents whose off-subspace residual is kept.
            z2: ``[B, d]`` partners (same classes).
            y: ``[B]`` the common labels.
            weights: ``w`` scalar, ``[B]`` (one per pair) or ``[B, r]`` (one per axis);
                0 keeps ``z1``, 1 takes ``z2``'s principal coordinates.

        Returns:
            ``[B, d]`` in ``z1``'s dtype.
        """
        if z2.shape != z1.shape:
            raise ShapeError(f"z1 and z2 must match, got {tuple(z1.shape)} and {tuple(z2.shape)}")
        _, u = self._gathered(z1, y)
        b, r = z1.shape[0], self.n_components
        w = torch.as_tensor(weights, dtype=z1.dtype, device=z1.device)
        if w.ndim == 0:
            w = w.expand(b, 1)
        elif w.shape == (b,):
            w = w[:, None]
        elif w.shape != (b, r):
            raise ShapeError(f"weights must be a scalar, [{b}] or [{b}, {r}], got {tuple(w.shape)}")
        dc = torch.einsum("bdr,bd->br", u, z2.to(z1.dtype) - z1)
        return z1 + torch.einsum("bdr,br->bd", u, w * dc)

    # ------------------------------------------------------------------------ persistence
    def to(self, device: str | torch.device) -> ClassPCA:
        """A copy on ``device``."""
        return ClassPCA(
            self.means.to(device),
            self.axes.to(device),
            self.variances.to(device),
            self.counts,
            None if self.total_variance is None else self.total_variance.to(device),
        )

    def state_dict(self) -> dict[str, Tensor]:
        state = {
            "means": self.means,
            "axes": self.axes,
            "variances": self.variances,
            "counts": self.counts,
        }
        if self.total_variance is not None:
            state["total_variance"] = self.total_variance
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> ClassPCA:
        return cls(
            state["means"],
            state["axes"],
            state["variances"],
            state["counts"],
            state.get("total_variance"),
        )


def check_labels(y: Tensor, num_classes: int) -> None:
    """Raise unless ``num_classes`` is an int >= 1 and every label lies in ``[0, K)``."""
    if not is_int(num_classes) or num_classes < 1:
        raise ConfigError("num_classes", num_classes, "an int >= 1")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise LabelRangeError(
            f"labels span [{int(y.min())}, {int(y.max())}], expected [0, {num_classes})"
        )


def _fit_class(zk: Tensor, r: int, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n = zk.shape[0]
    if n < r + 1:
        raise InsufficientSamplesError(
            f"class {k} has {n} latents, {r} principal axes need at least {r + 1}; lower "
            "n_components or give more images of that class"
        )
    if r > zk.shape[1]:
        raise ConfigError("n_components", r, f"<= the latent dimension {zk.shape[1]}")
    mean = zk.mean(dim=0)
    axes, var, total = _principal_axes(zk - mean, r)
    return mean, axes, var, total


def bin_centres(x: Tensor, dtype: torch.dtype, levels: int = 256) -> Tensor:
    """uint8 level indices -> the centre of each pixel's dequantisation bin (deterministic
    encoding) for data of ``levels`` grey levels."""
    u = torch.full(x.shape, 0.5, dtype=dtype, device=x.device)
    return dequantize(x, dtype=dtype, noise=u, levels=levels)
