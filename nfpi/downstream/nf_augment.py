"""NF augmentation (paper section 5.3, Tables 5 and 6): same-class mixup in the flow's latent
space, restricted to the principal axes of the class.

The paper maps a pair of same-class training images to the latent space, mixes them "in the span
of the PCA axes of their classwise gaussians, estimated on the underlying training data", and
maps the result back. The release has no code for it; this module is our design. The class
subspaces and the mixing formula are :class:`~nfpi.downstream.pca.ClassPCA`'s
(:mod:`nfpi.downstream.pca`).

**On-the-fly augmentation** (:class:`NFAugment`). A batch transform ``(uint8 [B, C, H, W],
labels [B]) -> uint8 [B, C, H, W]``: each image is augmented with probability ``p``; its
partner is a random other image of its class in the same batch when there is one (free: both
are encoded in the same flow call), otherwise a random training image of that class (loaded from
the dataset); ``partner="dataset"`` always draws from the dataset. Both are encoded at bin
centres, mixed with ``w`` drawn from ``U(0, a)``, ``Beta(a, a)`` or a constant, inverted and
quantised with :func:`~nfpi.data.to_uint8`. An image whose inverse is not finite, or that has no
partner, is returned unchanged (counted in :attr:`NFAugment.stats`). It runs first in
:func:`~nfpi.downstream.classifier.train_classifier`'s pipeline, before crop/flip, RandAugment,
random erasing and mixup/cutmix, so it composes with all of them.

Example::

    model = load_trained("runs/cifar10")
    train, info = load_dataset("cifar10", "train", root=...)
    pca = ClassPCA.fit(model.flow, train, info.num_classes, 16, levels=info.levels)
    augment = NFAugment(model.flow, pca, NFAugmentConfig(probability=0.5), train, info.levels)
    x_aug = augment(x_uint8, y, generator)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from nfpi.checkpoint import load_trained
from nfpi.data import to_uint8
from nfpi.downstream.pca import (
    ClassPCA,
    bin_centres,
    check_labels,
    dataset_targets,
    flow_device,
    flow_dtype,
)
from nfpi.errors import ConfigError, ShapeError
from nfpi.schema import Config, check

__all__ = ["MixWeights", "NFAugment", "NFAugmentConfig", "PartnerSource"]

MixWeights = Literal["uniform", "beta", "constant"]
PartnerSource = Literal["batch", "dataset"]


@dataclass(frozen=True)
class NFAugmentConfig(Config):
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
        checkpoint: the flow's checkpoint (a run directory, an epoch folder or a state.pt), for
            :meth:`NFAugment.from_checkpoint` (what
            :func:`~nfpi.downstream.classifier.train_classifier` uses when it is not handed an
            :class:`NFAugment`).
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

    def validate(self) -> None:
        for name in ("n_components", "per_class_fit_samples", "fit_batch_size"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        check(self.seed >= 0, "seed", self.seed, "an int >= 0")
        check(
            self.per_class_fit_samples >= self.n_components + 1,
            "per_class_fit_samples",
            self.per_class_fit_samples,
            f"at least n_components + 1 = {self.n_components + 1} (r principal axes need "
            "r + 1 images)",
        )
        a = self.weight_param
        ok, allowed = {
            "uniform": (0 < a <= 1, "in (0, 1] (w ~ U(0, a))"),
            "beta": (0 < a < float("inf"), "> 0 (w ~ Beta(a, a))"),
            "constant": (0 <= a <= 1, "in [0, 1] (w = a)"),
        }[self.weights]
        check(ok, "weight_param", a, f"for weights={self.weights!r}, a number {allowed}")
        p = self.probability
        check(0 <= p <= 1, "probability", p, "a number in [0, 1]")

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


class NFAugment:
    """Batch transform ``(uint8 [B, C, H, W], labels [B]) -> uint8 [B, C, H, W]``.

    See the module docstring (and :mod:`nfpi.downstream.pca`'s) for the algorithm. Images not
    picked (probability ``1 - p``), without a partner, or whose inverse is not finite come back
    unchanged; ``p = 0`` returns the input tensor itself. Runs the flow on its own device under ``no_grad`` in eval mode.

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
        levels: int = 256,
    ) -> None:
        if config.n_components != pca.n_components:
            raise ConfigError(
                "nf_augment.n_components",
                config.n_components,
                f"the ClassPCA's r = {pca.n_components}",
            )
        self.flow, self.pca, self.config, self.dataset = flow, pca, config, dataset
        self.levels = levels  # grey levels of the images (the flow's dataset info)
        self.device, self.dtype = flow_device(flow), flow_dtype(flow)
        self.class_index: list[Tensor] | None = None
        if dataset is not None:
            targets = dataset_targets(dataset)
            check_labels(targets, pca.num_classes)
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
            levels=model.info.levels,
        )
        return cls(model.flow, pca, config, dataset, levels=model.info.levels)

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
        check_labels(y, self.pca.num_classes)
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
            z, _ = self.flow(bin_centres(images, self.dtype, self.levels))
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
        out[picked[finite].to(x.device)] = to_uint8(mixed[finite.to(mixed.device)], self.levels).to(
            x.device
        )
        return out
