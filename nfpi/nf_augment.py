"""NF augmentation (paper section 5.3, Tables 5 and 6): same-class mixup in the flow's latent
space, restricted to the principal axes of the class.

The paper maps a pair of same-class training images to the latent space, mixes them "in the span
of the PCA axes of their classwise gaussians, estimated on the underlying training data", and
maps the result back. The release has no code for it; this module is our design.

**Class subspaces** (:class:`ClassPCA`). For every class ``y`` we encode (a seeded random subset
of at most ``per_class_fit_samples`` of) its training images with the flow, at the centre of
each pixel's dequantisation bin (no noise, no augmentation), and keep the class mean ``m_y``
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

**On-the-fly augmentation** (:class:`NFAugment`). A batch transform ``(uint8 [B, C, H, W],
labels [B]) -> uint8 [B, C, H, W]``: each image is augmented with probability ``p``; its
partner is a random other image of its class in the same batch when there is one (free: both
are encoded in the same flow call), otherwise a random training image of that class (loaded from
the dataset); ``partner="dataset"`` always draws from the dataset. Both are encoded at bin
centres, mixed with ``w`` drawn from ``U(0, a)``, ``Beta(a, a)`` or a constant, inverted and
quantised with :func:`~nfpi.data.to_uint8`. An image whose inverse is not finite, or that has no
partner, is returned unchanged (counted in :attr:`NFAugment.stats`). It runs first in
:func:`nfpi.classifier.train_classifier`'s pipeline, before crop/flip, RandAugment, random
erasing and mixup/cutmix, so it composes with all of them.

Example::

    model = load_trained("runs/cifar10/checkpoint")
    train, info = load_dataset("cifar10", "train", root=...)
    pca = ClassPCA.fit(model.flow, train, info.num_classes, n_components=16)
    augment = NFAugment(model.flow, pca, NFAugmentConfig(probability=0.5), dataset=train)
    x_aug = augment(x_uint8, y, generator)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from nfpi.data import dequantize, to_uint8
from nfpi.errors import (
    ConfigError,
    InsufficientSamplesError,
    LabelRangeError,
    ShapeError,
)
from nfpi.validation import is_int, is_number

__all__ = [
    "ClassPCA",
    "MixWeights",
    "NFAugment",
    "NFAugmentConfig",
    "PartnerSource",
]

log = logging.getLogger(__name__)

MixWeights = Literal["uniform", "beta", "constant"]
PartnerSource = Literal["batch", "dataset"]


@dataclass(frozen=True)
class NFAugmentConfig:
    """Settings of the NF augmentation.

    Attributes:
        n_components: r, principal axes per class (1 <= r < images used per class).
        weights: distribution of the mixing weight ``w``: ``"uniform"`` U(0, a),
            ``"beta"`` Beta(a, a) (mixup's), ``"constant"`` w = a.
        weight_param: ``a``: in (0, 1] for uniform, > 0 for beta, in [0, 1] for constant.
        per_axis: one weight per principal axis instead of one per pair.
        probability: p, chance that an image is augmented.
        partner: ``"batch"`` (a same-class image of the batch when there is one, else one from
            the dataset) or ``"dataset"`` (always a random training image of the class).
        per_class_fit_samples: at most this many training images per class for the PCA fit.
        fit_batch_size: images per flow call during the fit.
        seed: seed of the fit's per-class subsets (>= 0); the mixing itself draws from the
            generator passed at call time.
        checkpoint: the flow's checkpoint (a run's checkpoint dir or state.pt), for
            :meth:`NFAugment.from_checkpoint` (what :func:`nfpi.classifier.train_classifier`
            uses when it is not handed an :class:`NFAugment`).
        use_ema: use the EMA weights of the checkpoint.
    """

    n_components: int = 16
    weights: MixWeights = "uniform"
    weight_param: float = 1.0
    per_axis: bool = False
    probability: float = 0.5
    partner: PartnerSource = "batch"
    per_class_fit_samples: int = 500
    fit_batch_size: int = 256
    seed: int = 0
    checkpoint: str | None = None
    use_ema: bool = True

    def __post_init__(self) -> None:
        for name in ("n_components", "per_class_fit_samples", "fit_batch_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ConfigError(f"nf_augment.{name}", value, "an int >= 1")
        if not is_int(self.seed) or self.seed < 0:
            raise ConfigError("nf_augment.seed", self.seed, "an int >= 0")
        if self.per_class_fit_samples < self.n_components + 1:
            raise ConfigError(
                "nf_augment.per_class_fit_samples",
                self.per_class_fit_samples,
                f"at least n_components + 1 = {self.n_components + 1} (r principal axes need "
                "r + 1 images)",
            )
        if self.weights not in ("uniform", "beta", "constant"):
            raise ConfigError(
                "nf_augment.weights", self.weights, "one of 'uniform', 'beta', 'constant'"
            )
        a = self.weight_param
        ok = (
            is_number(a)
            and {
                "uniform": lambda: 0 < a <= 1,
                "beta": lambda: a > 0,
                "constant": lambda: 0 <= a <= 1,
            }[self.weights]()
        )
        if not ok:
            allowed = {
                "uniform": "in (0, 1] (w ~ U(0, a))",
                "beta": "> 0 (w ~ Beta(a, a))",
                "constant": "in [0, 1] (w = a)",
            }[self.weights]
            raise ConfigError(
                "nf_augment.weight_param", a, f"for weights={self.weights!r}, a number {allowed}"
            )
        object.__setattr__(self, "weight_param", float(a))
        p = self.probability
        if not is_number(p) or not 0 <= p <= 1:
            raise ConfigError("nf_augment.probability", p, "a number in [0, 1]")
        object.__setattr__(self, "probability", float(p))
        if self.partner not in ("batch", "dataset"):
            raise ConfigError("nf_augment.partner", self.partner, "'batch' or 'dataset'")
        for name in ("per_axis", "use_ema"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"nf_augment.{name}", getattr(self, name), "true or false")
        if self.checkpoint is not None and not isinstance(self.checkpoint, str):
            raise ConfigError("nf_augment.checkpoint", self.checkpoint, "None or a path string")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NFAugmentConfig:
        """Build from a dict (e.g. ``to_dict()``'s output); unknown keys are rejected."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"nf_augment.{unknown[0]}",
                values[unknown[0]],
                f"unknown key; known: {sorted(known)}",
            )
        return cls(**values)

    def sample_weights(self, n: int, r: int, generator: torch.Generator | None = None) -> Tensor:
        """Mixing weights: float64 ``[n]``, or ``[n, r]`` with ``per_axis``, in [0, 1]."""
        shape = (n, r) if self.per_axis else (n,)
        a = self.weight_param
        if self.weights == "constant":
            return torch.full(shape, a, dtype=torch.float64)
        if self.weights == "uniform":
            return a * torch.rand(shape, generator=generator, dtype=torch.float64)
        # torch's Beta sampler takes no generator: draw from numpy, seeded from the generator.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return torch.from_numpy(np.random.default_rng(seed).beta(a, a, size=shape))


# ------------------------------------------------------------------------------- class PCA
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


def _targets(dataset: Any) -> Tensor:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return torch.as_tensor(targets, dtype=torch.int64)


def _flow_device(flow: nn.Module) -> torch.device:
    for p in flow.parameters():
        return p.device
    return torch.device("cpu")


def _flow_dtype(flow: nn.Module) -> torch.dtype:
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
        _check_labels(y, num_classes)
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
        targets = _targets(dataset)
        _check_labels(targets, num_classes)
        device, dtype = _flow_device(flow), _flow_dtype(flow)

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
                    z, _ = flow(_bin_centres(x, dtype))
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
        _check_labels(y, self.num_classes)
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


def _check_labels(y: Tensor, num_classes: int) -> None:
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


def _bin_centres(x: Tensor, dtype: torch.dtype) -> Tensor:
    """uint8 -> the centre of each pixel's dequantisation bin (deterministic encoding)."""
    return dequantize(x, dtype=dtype, noise=torch.full(x.shape, 0.5, dtype=dtype, device=x.device))


# ---------------------------------------------------------------------------- augmentation
class NFAugment:
    """Batch transform ``(uint8 [B, C, H, W], labels [B]) -> uint8 [B, C, H, W]``.

    See the module docstring for the algorithm. Images not picked (probability ``1 - p``), without
    a partner, or whose inverse is not finite come back unchanged; ``p = 0`` returns the input
    tensor itself. Runs the flow on its own device under ``no_grad`` in eval mode.

    Args:
        flow: the trained flow (``forward``/``inverse`` as :class:`~nfpi.flows.FlowModel`).
        pca: the class subspaces of that flow (:meth:`ClassPCA.fit`).
        config: mixing settings.
        dataset: the training set, items ``(uint8 [C, H, W], label)``; supplies partners for
            images whose class has no other image in the batch (and all partners with
            ``partner="dataset"``). Without it such images stay unchanged.

    Attributes:
        stats: running counts ``images``, ``picked``, ``augmented``, ``no_partner``,
            ``nonfinite``, ``dataset_partners`` (for logging).
    """

    def __init__(
        self,
        flow: nn.Module,
        pca: ClassPCA,
        config: NFAugmentConfig,
        dataset: Any | None = None,
    ) -> None:
        if config.n_components != pca.n_components:
            raise ConfigError(
                "nf_augment.n_components",
                config.n_components,
                f"the ClassPCA's r = {pca.n_components}",
            )
        self.flow, self.pca, self.config, self.dataset = flow, pca, config, dataset
        self.device, self.dtype = _flow_device(flow), _flow_dtype(flow)
        self.class_index: list[Tensor] | None = None
        if dataset is not None:
            targets = _targets(dataset)
            _check_labels(targets, pca.num_classes)
            self.class_index = [
                torch.nonzero(targets == k, as_tuple=True)[0] for k in range(pca.num_classes)
            ]
        self.stats = dict.fromkeys(
            ("images", "picked", "augmented", "no_partner", "nonfinite", "dataset_partners"), 0
        )

    @classmethod
    def from_checkpoint(
        cls, config: NFAugmentConfig, dataset: Any, *, device: str | torch.device = "cpu"
    ) -> NFAugment:
        """Load ``config.checkpoint``'s flow, fit the class subspaces on ``dataset`` (the
        un-augmented training set) and build the transform."""
        from nfpi.train import load_trained  # the training stack is needed only here

        if config.checkpoint is None:
            raise ConfigError(
                "nf_augment.checkpoint",
                None,
                "the path of a trained flow's checkpoint (or hand train_classifier an NFAugment)",
            )
        model = load_trained(config.checkpoint, device=device, use_ema=config.use_ema)
        shape = getattr(dataset, "shape", None)
        if shape is not None and tuple(shape) != tuple(model.info.shape):
            raise ShapeError(
                f"the flow was trained on images {model.info.shape}, the dataset has {shape}"
            )
        pca = ClassPCA.fit(
            model.flow,
            dataset,
            model.info.num_classes,
            config.n_components,
            per_class_samples=config.per_class_fit_samples,
            batch_size=config.fit_batch_size,
            seed=config.seed,
        )
        return cls(model.flow, pca, config, dataset)

    def _dataset_partner(self, label: int, generator: torch.Generator | None) -> Tensor | None:
        if self.class_index is None or self.dataset is None:
            return None
        pool = self.class_index[label]
        if pool.numel() == 0:
            return None
        j = int(pool[int(torch.randint(pool.numel(), (1,), generator=generator))])
        return self.dataset[j][0]

    @torch.no_grad()
    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment a batch.

        Args:
            x: uint8 ``[B, C, H, W]``.
            y: int ``[B]`` labels in ``[0, K)``.
            generator: CPU generator for the picks, partners and weights (seed it per epoch for
                reproducible training); default torch's global RNG.

        Returns:
            uint8 ``[B, C, H, W]`` on ``x``'s device.
        """
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ShapeError(
                f"NFAugment expects uint8 [B, C, H, W], got {x.dtype} {tuple(x.shape)}"
            )
        y = torch.as_tensor(y).to(device="cpu", dtype=torch.int64)
        b = x.shape[0]
        if y.shape != (b,):
            raise ShapeError(f"labels must be [{b}], got {tuple(y.shape)}")
        _check_labels(y, self.pca.num_classes)
        self.stats["images"] += b
        cfg = self.config
        if cfg.probability == 0.0 or b == 0:
            return x
        picked = torch.nonzero(torch.rand(b, generator=generator) < cfg.probability, as_tuple=True)[
            0
        ]
        if picked.numel() == 0:
            return x
        self.stats["picked"] += picked.numel()

        # Partners: a random other same-class image of the batch (random scores masked to the
        # class, argmax), else one from the dataset.
        same = y[picked][:, None] == y[None, :]
        same[torch.arange(picked.numel()), picked] = False
        in_batch = (
            same.any(dim=1)
            if cfg.partner == "batch"
            else torch.zeros_like(picked, dtype=torch.bool)
        )
        scores = torch.rand(picked.numel(), b, generator=generator).masked_fill(~same, -1.0)
        batch_partner = scores.argmax(dim=1)
        external: list[Tensor] = []
        keep = torch.ones(picked.numel(), dtype=torch.bool)
        ext_slot = torch.full((picked.numel(),), -1, dtype=torch.int64)
        for j in torch.nonzero(~in_batch, as_tuple=True)[0].tolist():
            img = self._dataset_partner(int(y[picked[j]]), generator)
            if img is None:
                keep[j] = False
            else:
                ext_slot[j] = len(external)
                external.append(img)
        self.stats["no_partner"] += int((~keep).sum())
        self.stats["dataset_partners"] += len(external)
        if not bool(keep.any()):
            return x
        picked, in_batch = picked[keep], in_batch[keep]
        batch_partner, ext_slot = batch_partner[keep], ext_slot[keep]

        # One flow call encodes every image involved: the picked ones, their in-batch partners
        # (each batch row once) and the external partners.
        rows = torch.unique(torch.cat([picked, batch_partner[in_batch]]))
        slot = torch.full((b,), -1, dtype=torch.int64)
        slot[rows] = torch.arange(rows.numel())
        images = x[rows.to(x.device)].to(self.device)
        if external:
            images = torch.cat([images, torch.stack(external).to(self.device)])
        was_training = self.flow.training
        self.flow.eval()
        try:
            z, _ = self.flow(_bin_centres(images, self.dtype))
            second = torch.where(in_batch, slot[batch_partner], rows.numel() + ext_slot)
            z1, z2 = z[slot[picked].to(z.device)], z[second.to(z.device)]
            w = cfg.sample_weights(picked.numel(), self.pca.n_components, generator)
            mixed, _ = self.flow.inverse(self.pca.mix(z1, z2, y[picked].to(z.device), w))
        finally:
            self.flow.train(was_training)
        finite = torch.isfinite(mixed).flatten(1).all(dim=1).cpu()
        self.stats["nonfinite"] += int((~finite).sum())
        self.stats["augmented"] += int(finite.sum())
        out = x.clone()
        out[picked[finite].to(x.device)] = to_uint8(mixed[finite.to(mixed.device)]).to(x.device)
        return out
