"""Figures 1 and 2 of the paper as PNG files (matplotlib's Figure API; no pyplot, no global
state).

**Figure 1** (:func:`figure1`): the golden 2-D case, a t-SNE embedding of the 50,000 CIFAR-10
training images (``cifar10_tsne2d.npz``: ``x`` float [N, 2], ``y`` int [N]; method notes section
4). Four panels: (a) the data, (b) samples of the class gaussians estimated on it (the data-init
baseline, lambda = 0), (c) and (d) samples of the FPI gaussians at a small and a large lambda,
each solved from (b). The solver defaults to the authors' notebook settings (reference form,
isotropic heuristic on, summed-q off, alpha 10, pi pairwise: :class:`Figure1Config`); the paper
names neither lambda, ours are 10 and 1000 (the notebook's value).

**Figure 2** (:func:`figure2`): originals from a trained flow's training set and three
NF-augmented variants of each (:mod:`nfpi.downstream.nf_augment` with probability 1 and a random
same-class training image as partner, so each variant is the original moved along its class's
principal axes towards another image), one row per class.

``python -m nfpi figures --out DIR --checkpoint RUN_DIR`` draws both
(:func:`add_arguments`, :func:`run_from_args`); ``ray_jobs/figures.py`` does the same and logs the
PNGs as MLflow artifacts of the run that made them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

from nfpi.errors import ConfigError, DatasetNotFoundError, ShapeError
from nfpi.plots import image_grid
from nfpi.prior import (
    DEFAULT_BOUND_FACTORS,
    ClassStatistics,
    FPIConfig,
    GaussianPrior,
    Objective,
    PiMode,
    solve_fpi,
)
from nfpi.schema import Config, check

__all__ = [
    "GOLDEN_FILE",
    "Figure1Config",
    "add_arguments",
    "default_golden_path",
    "digits_embedding_path",
    "figure1",
    "figure2",
    "load_points",
    "run_from_args",
    "shared_golden_path",
]

log = logging.getLogger(__name__)
GOLDEN_FILE = "cifar10_tsne2d.npz"


@dataclass(frozen=True)
class Figure1Config(Config):
    """What Figure 1 shows and how its FPI is solved.

    Attributes:
        lam_small, lam_large: lambda of panels (c) and (d).
        alpha, pi: the repulsion's (the release's: 10, pairwise).
        form: ``reference`` (the notebook's update) or ``paper`` (Eqs. 5-7, with automatic
            variance bounds where the joint update has no finite fixed point).
        points: data points drawn in panel (a) (a seeded subset; 0 = all).
        samples_per_class: points drawn from each gaussian in panels (b)-(d).
        seed: subset and sampling seed.
    """

    lam_small: float = 10.0
    lam_large: float = 1000.0
    alpha: float = 10.0
    pi: PiMode = "pairwise"
    form: Literal["reference", "paper"] = "reference"
    points: int = 10_000
    samples_per_class: int = 1000
    seed: int = 0

    def validate(self) -> None:
        check(
            0 <= self.lam_small < self.lam_large,
            "lam_small",
            self.lam_small,
            f"a lambda >= 0 below lam_large = {self.lam_large}",
        )
        check(self.alpha > 0, "alpha", self.alpha, "a number > 0")
        check(self.points >= 0, "points", self.points, "an int >= 0 (0: every point)")
        check(self.samples_per_class >= 1, "samples_per_class", self.samples_per_class, ">= 1")
        check(self.seed >= 0, "seed", self.seed, "an int >= 0")

    def solver(self) -> FPIConfig:
        if self.form == "reference":  # the authors' 2-D notebook (method notes section 4)
            return FPIConfig.reference(summed_q=False, isotropic_mean=True)
        return FPIConfig(auto_bounds=DEFAULT_BOUND_FACTORS, max_iter=2000)


def shared_golden_path() -> Path | None:
    """The authors' 2-D embedding (method notes section 4), where this machine has it:
    ``$NFPI_SHARED_DATA/cifar10_tsne2d.npz``, else ``../shared/data/cifar10_tsne2d.npz`` beside
    the project checkout; None when neither exists (it is not redistributed with the package)."""
    folder = os.environ.get("NFPI_SHARED_DATA")
    candidates = [Path(folder) / GOLDEN_FILE] if folder is not None else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / GOLDEN_FILE)
    return next((p for p in candidates if p.is_file()), None)


def digits_embedding_path(cache_dir: str | Path | None = None) -> Path:
    """A 2-D t-SNE embedding of scikit-learn's bundled digits (1,797 points, 10 classes), made
    once from the data every install has and cached (``$NFPI_DATA_CACHE``, else
    ``~/.cache/nfpi``): Figure 1's data when the authors' CIFAR-10 embedding is not at hand."""
    from sklearn.datasets import load_digits
    from sklearn.manifold import TSNE

    root = Path(cache_dir or os.environ.get("NFPI_DATA_CACHE") or Path.home() / ".cache" / "nfpi")
    path = root / "digits_tsne2d.npz"
    if path.is_file():
        return path
    digits = load_digits()
    log.info("making a 2-D t-SNE embedding of the bundled digits (once): %s", path)
    x = TSNE(n_components=2, init="pca", random_state=0).fit_transform(digits.data)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=x.astype(np.float32), y=digits.target.astype(np.int64))
    os.replace(tmp, path)
    return path


def default_golden_path() -> Path:
    """Figure 1's data: the authors' CIFAR-10 embedding where it exists
    (:func:`shared_golden_path`), else the bundled digits' (:func:`digits_embedding_path`)."""
    return shared_golden_path() or digits_embedding_path()


def load_points(path: str | Path) -> tuple[Tensor, Tensor]:
    """``x`` float64 [N, 2] and ``y`` int64 [N] of a 2-D embedding ``.npz``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"2-D embedding {path} not found: pass --data /path/to/{GOLDEN_FILE} or set "
            "NFPI_SHARED_DATA to its folder"
        )
    with np.load(path) as data:
        missing = {"x", "y"} - set(data.files)
        if missing:
            raise ShapeError(f"{path} lacks the arrays {sorted(missing)} (has {data.files})")
        x = torch.from_numpy(np.asarray(data["x"], dtype=np.float64))
        y = torch.from_numpy(np.asarray(data["y"]).astype(np.int64))
    if x.ndim != 2 or x.shape[1] != 2 or y.shape != (x.shape[0],):
        raise ShapeError(
            f"{path}: expected x [N, 2] and y [N], got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    return x, y


def _scatter(ax: Any, pts: np.ndarray, labels: np.ndarray, k: int, title: str) -> None:
    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    for c in range(k):
        sel = pts[labels == c]
        ax.scatter(sel[:, 0], sel[:, 1], s=1.5, color=cmap(c % cmap.N), alpha=0.5, linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def figure1(
    x: Tensor,
    y: Tensor,
    path: str | Path,
    config: Figure1Config | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Draw Figure 1 from 2-D points ``x`` [N, 2] with labels ``y`` [N] into ``path``.

    Returns the PNG's path and a summary (per panel: lambda, FPI iterations, whether it
    converged, smallest pairwise KL, the automatic bounds used).
    """
    config = config or Figure1Config()
    x, y = x.to(torch.float64), y.to(torch.int64)
    k = int(y.max()) + 1
    stats = ClassStatistics.from_batch(x, y, k)
    gen = torch.Generator().manual_seed(config.seed)
    data_init = GaussianPrior.from_statistics(stats)
    panels: list[tuple[str, GaussianPrior]] = [("(b) class gaussians (data init)", data_init)]
    summary: dict[str, Any] = {"classes": k, "points": int(x.shape[0]), "config": config.to_dict()}
    for tag, lam in (("c", config.lam_small), ("d", config.lam_large)):
        objective = Objective(lam=lam, alpha=config.alpha, pi=config.pi)
        prior, report = solve_fpi(stats, objective, config.solver())
        panels.append((f"({tag}) FPI, lambda = {lam:g} (own scale)", prior))
        summary[f"panel_{tag}"] = {
            "lam": lam,
            "iterations": report.iterations,
            "converged": report.converged,
            "kl_min": report.kl_min_after,
            "bound_factor": report.bound_factor,
            "at_bounds": report.at_lower_bound + report.at_upper_bound,
        }
    n = x.shape[0]
    keep = torch.randperm(n, generator=gen)[: config.points] if 0 < config.points < n else None
    shown_x = x if keep is None else x[keep]
    shown_y = y if keep is None else y[keep]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 4)
    _scatter(axes[0], shown_x.numpy(), shown_y.numpy(), k, "(a) 2-D t-SNE embedding (data)")
    labels = torch.arange(k).repeat_interleave(config.samples_per_class)
    for ax, (title, prior) in zip(axes[1:], panels, strict=True):
        z = prior.sample(labels, 1.0, gen, dtype=torch.float64)
        _scatter(ax, z.numpy(), labels.numpy(), k, title)
    if class_names is not None and len(class_names) == k:
        cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
        handles = [
            Line2D([], [], marker="o", ls="", color=cmap(c % cmap.N), label=name)
            for c, name in enumerate(class_names)
        ]
        fig.legend(handles=handles, loc="lower center", ncol=min(k, 10), fontsize=8)
    form = "reference (release)" if config.form == "reference" else "paper"
    fig.suptitle(
        f"Figure 1: FPI on the 2-D case ({form} update, alpha = {config.alpha:g}, "
        f"pi = {config.pi})",
        fontsize=10,
    )
    return _save(fig, path), summary


def figure2(
    checkpoint: str | Path,
    path: str | Path,
    *,
    classes: Sequence[int] | None = None,
    variants: int = 3,
    n_components: int = 16,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[Path, dict[str, Any]]:
    """Draw Figure 2 for a trained flow: per class, a training image and ``variants``
    NF-augmented versions of it.

    Args:
        checkpoint: a run directory or checkpoint (see :func:`nfpi.checkpoint.load_trained`).
        path: the PNG to write.
        classes: class indices to show (default: the first ten).
        variants: augmented versions per original.
        n_components: principal axes per class (capped so that every class can be fitted).
        seed: which originals, partners and mixing weights.
        device: where the flow runs.

    Returns:
        The PNG's path and a summary (classes, NF augmentation counters and config).
    """
    # Imported here: the command line builds its parser from this module without timm.
    from nfpi.checkpoint import load_trained
    from nfpi.data import display_uint8, load_dataset
    from nfpi.downstream.nf_augment import NFAugment, NFAugmentConfig
    from nfpi.downstream.pca import ClassPCA

    if variants < 1:
        raise ConfigError("variants", variants, "an int >= 1")
    model = load_trained(checkpoint, device=device)
    data = model.config.data
    train, info = load_dataset(
        data.name, "train", seed=model.config.seed, **data.split_kwargs("train")
    )
    k = info.num_classes
    classes = list(range(min(k, 10))) if classes is None else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < k]
    if bad or not classes:
        raise ConfigError("classes", classes, f"class indices in [0, {k})")
    targets = torch.as_tensor(train.targets)
    counts = torch.bincount(targets, minlength=k)
    r = max(1, min(n_components, int(counts.min()) - 1))
    cfg = NFAugmentConfig(
        n_components=r,
        probability=1.0,
        partner="dataset",
        per_class_fit_samples=max(r + 1, min(500, int(counts.min()))),
        seed=seed,
    )
    pca = ClassPCA.fit(
        model.flow,
        train,
        k,
        r,
        per_class_samples=cfg.per_class_fit_samples,
        seed=seed,
        levels=info.levels,
    )
    augment = NFAugment(model.flow, pca, cfg, train, levels=info.levels)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for c in classes:
        members = torch.nonzero(targets == c, as_tuple=True)[0]
        original = train[int(members[int(torch.randint(len(members), (1,), generator=gen))])][0]
        batch = original.unsqueeze(0).expand(variants, *original.shape).contiguous()
        out = augment(batch, torch.full((variants,), c, dtype=torch.int64), gen)
        rows.append(torch.cat([original.unsqueeze(0), out.cpu()]))
    grid = image_grid(display_uint8(torch.cat(rows), info.levels), rows=len(classes))
    h, w = info.shape[1], info.shape[2]
    scale = max(1.0, 48 / max(h, w))
    fig = Figure(figsize=(1.4 + 0.02 * scale * grid.shape[1], 0.6 + 0.02 * scale * grid.shape[0]))
    ax = fig.subplots()
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray",
              interpolation="nearest")  # fmt: skip
    ax.set_yticks(
        [i * (h + 1) + h / 2 for i in range(len(classes))],
        labels=[f"{info.class_names[c]} ({c})" for c in classes],
        fontsize=8,
    )
    ax.set_xticks(
        [j * (w + 1) + w / 2 for j in range(variants + 1)],
        labels=["original"] + [f"NF-aug {j + 1}" for j in range(variants)],
        fontsize=8,
    )
    ax.xaxis.tick_top()
    fig.suptitle(
        f"Figure 2: NF augmentation ({model.config.name}, epoch {model.epoch}, r = {r})",
        fontsize=9,
    )
    summary = {
        "checkpoint": str(model.path),
        "classes": classes,
        "variants": variants,
        "nf_augment": cfg.to_dict(),
        "nf_augment_stats": dict(augment.stats),
    }
    return _save(fig, path), summary


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    return path


# ---------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m nfpi figures`` (and of ``ray_jobs/figures.py``)."""
    parser.add_argument("--out", default="results/figures", help="folder for the PNGs")
    parser.add_argument(
        "--figures", nargs="+", type=int, choices=(1, 2), default=(1, 2), help="which figures"
    )
    parser.add_argument(
        "--data",
        help=f"the 2-D embedding of Figure 1 (default: the authors' {GOLDEN_FILE} in "
        "$NFPI_SHARED_DATA or ../shared/data, else a t-SNE of the bundled digits, made once)",
    )
    parser.add_argument("--checkpoint", help="a trained flow's run directory (Figure 2)")
    parser.add_argument("--classes", nargs="+", type=int, help="Figure 2's classes")
    parser.add_argument("--variants", type=int, default=3, help="NF-augmented versions (Fig. 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Figure 1 settings, e.g. lam_large=3333 or form=paper (repeatable)",
    )


def check_args(args: argparse.Namespace) -> None:
    """The figure options' own mistakes, before any work (a missing checkpoint for Figure 2)."""
    if 2 in set(args.figures) and not args.checkpoint:
        raise ConfigError(
            "--checkpoint",
            None,
            "a trained flow's run directory for Figure 2 (its NF augmentations): e.g. "
            "--checkpoint results/digits after `python -m nfpi train`; or draw Figure 1 only "
            "with --figures 1",
        )
    if 2 in set(args.figures):
        from nfpi.checkpoint import find_checkpoint
        from nfpi.errors import CheckpointError

        if find_checkpoint(args.checkpoint) is None:
            raise CheckpointError(
                f"--checkpoint {args.checkpoint}: no checkpoint there; pass a trained flow's run "
                "directory (e.g. results/digits after `python -m nfpi train`, or "
                "<results>/runs/<run name> of a Ray run), its checkpoints/ folder or a state.pt"
            )


def run_from_args(args: argparse.Namespace) -> tuple[list[Path], dict[str, Any]]:
    """Draw the figures ``args`` asks for; returns the files written (PNGs and
    ``figures.json``) and the summary."""
    from nfpi.presets import parse_override

    check_args(args)
    out = Path(args.out).expanduser().resolve()
    figures = sorted(set(args.figures))
    written: list[Path] = []
    summary: dict[str, Any] = {}
    if 1 in figures:
        config = Figure1Config().with_overrides(dict(parse_override(s) for s in args.set))
        data = Path(args.data) if args.data else default_golden_path()
        x, y = load_points(data)
        names = None
        if data.name == GOLDEN_FILE:
            names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                     "ship", "truck"]  # fmt: skip
        png, summary["figure1"] = figure1(x, y, out / "figure1_tsne2d.png", config, names)
        summary["figure1"]["data"] = str(data)
        written.append(png)
    if 2 in figures:
        png, summary["figure2"] = figure2(
            args.checkpoint,
            out / "figure2_nf_augmentation.png",
            classes=args.classes,
            variants=args.variants,
            device=args.device,
        )
        written.append(png)
    report = out / "figures.json"
    report.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    written.append(report)
    for f in written:
        log.info("wrote %s", f)
    return written, summary
