"""The pictures a researcher looks at, written as PNG files.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (no ``pyplot``): nothing
here changes matplotlib's global backend or state for the program that imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from nfpi.errors import ShapeError

__all__ = [
    "comparison_curves",
    "confusion_png",
    "image_grid",
    "kl_heatmaps",
    "residual_curve",
    "sample_grid",
    "tsne_plot",
]


def _figure(
    nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6, 4)
) -> tuple[Figure, Any]:
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def image_grid(images: Tensor, rows: int) -> np.ndarray:
    """uint8 images [N, C, H, W] (N = rows * cols) -> one [rows*H, cols*W, C] array, 1px gaps."""
    n, c, h, w = images.shape
    cols = math.ceil(n / rows)
    grid = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, c), 255, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, k = divmod(i, cols)
        grid[r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = arr[i]
    return grid


def sample_grid(images: Tensor, class_names: Sequence[str], temperature: float, path: Path) -> Path:
    """Class-conditional samples: one row per class (uint8 images [K * n, C, H, W], class-major)."""
    k = len(class_names)
    grid = image_grid(images, rows=k)
    fig, ax = _figure(figsize=(max(3.0, grid.shape[1] / 12), max(3.0, grid.shape[0] / 12)))
    ax.imshow(
        grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", interpolation="nearest"
    )
    h = images.shape[2] + 1
    ax.set_yticks([i * h + h / 2 for i in range(k)], labels=list(class_names), fontsize=7)
    ax.set_xticks([])
    ax.set_title(f"class-conditional samples, T = {temperature:g}")
    return _save(fig, path)


def tsne_plot(
    latents: Tensor,
    labels: Tensor,
    prior_means: Tensor,
    class_names: Sequence[str],
    path: Path,
    seed: int = 0,
) -> Path:
    """2-D t-SNE of test latents coloured by class; the prior means are embedded with them
    (t-SNE cannot place points afterwards) and drawn as labelled stars."""
    from sklearn.manifold import TSNE

    k = prior_means.shape[0]
    pts = torch.cat([latents.double().cpu(), prior_means.double().cpu()]).numpy()
    perplexity = float(min(30, max(5, (len(pts) - 1) // 4)))
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        pts
    )
    fig, ax = _figure(figsize=(6.5, 6))
    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    lab = labels.cpu().numpy()
    if k <= 20:  # one artist per class, for the legend
        for c in range(k):
            sel = emb[:-k][lab == c]
            ax.scatter(
                sel[:, 0], sel[:, 1], s=6, color=cmap(c % cmap.N), alpha=0.6, label=class_names[c]
            )
    else:  # one artist for all points (a thousand per-class artists take minutes to draw)
        ax.scatter(emb[:-k, 0], emb[:-k, 1], s=6, c=[cmap(c % cmap.N) for c in lab], alpha=0.6)
    ax.scatter(
        emb[-k:, 0],
        emb[-k:, 1],
        marker="*",
        s=220,
        c=[cmap(c % cmap.N) for c in range(k)],
        edgecolors="black",
    )
    if k <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_title("t-SNE of test latents (stars: prior means)")
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path)


def residual_curve(residuals: Sequence[float], path: Path, title: str = "FPI residual") -> Path:
    """The solver's residual at each iterate (one point per entry of ``residuals``), log scale."""
    fig, ax = _figure(figsize=(5.5, 3.5))
    ax.semilogy(
        np.arange(1, len(residuals) + 1), np.maximum(np.asarray(residuals, dtype=float), 1e-300)
    )
    ax.set_xlabel("iterate")
    ax.set_ylabel("max class L2 change")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def comparison_curves(
    runs: dict[str, Sequence[dict[str, float]]],
    path: Path,
    keys: Sequence[tuple[str, str]] = (("nf_acc", "NF-Acc"), ("test_bpd", "test bits/dim")),
    title: str = "",
) -> Path:
    """One panel per metric of ``keys`` against the epoch, one line per run: ``runs`` maps a
    run's label to its per-epoch metrics (dicts with ``epoch`` and the keys; missing or
    non-finite values are skipped)."""
    fig, axes = _figure(1, len(keys), figsize=(5.5 * len(keys), 4))
    axes = np.atleast_1d(axes)
    for ax, (key, name) in zip(axes, keys, strict=True):
        for label, history in runs.items():
            points = [
                (float(m["epoch"]) + 1, float(m[key]))
                for m in history
                if "epoch" in m and key in m and math.isfinite(float(m[key]))
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o" if len(xs) == 1 else None, label=label)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def kl_heatmaps(
    before: Tensor,
    after: Tensor,
    class_names: Sequence[str],
    path: Path,
    titles: tuple[str, str] = ("before", "after"),
) -> Path:
    """Pairwise KL(N_y || N_y') of two priors (before and after a solve, or the data-init and
    the final prior: ``titles``), on a shared log colour scale."""
    fig, axes = _figure(1, 2, figsize=(10, 4.5))
    mats = [before.double().cpu().numpy(), after.double().cpu().numpy()]
    off = [m[~np.eye(m.shape[0], dtype=bool)] for m in mats]
    lo = max(min(float(o.min()) for o in off), 1e-6)
    hi = max(float(o.max()) for o in off)
    norm = matplotlib.colors.LogNorm(vmin=lo, vmax=max(hi, lo * 10))
    for i, (ax, mat, title) in enumerate(zip(axes, mats, titles, strict=True)):
        shown = np.where(np.eye(mat.shape[0], dtype=bool), np.nan, np.maximum(mat, lo))
        im = ax.imshow(shown, norm=norm, cmap="viridis")
        ax.set_title(f"pairwise KL, {title} (min {np.min(off[i]):.3g})")
        if len(class_names) <= 20:
            ax.set_xticks(
                range(len(class_names)), labels=list(class_names), rotation=90, fontsize=7
            )
            ax.set_yticks(range(len(class_names)), labels=list(class_names), fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.8)
    return _save(fig, path)


def confusion_png(
    confusion: Tensor,
    class_names: Sequence[str],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """A confusion-matrix PNG: rows true class, columns prediction, colours row-normalised
    (recall), counts printed when K <= 20, class names on the axes when K <= 40.

    Args:
        confusion: int ``[K, K]`` (e.g. a classifier result's ``confusion``).
        class_names: K names.
        path: the PNG to write (parent directories are created).
        title: optional title (default: the overall accuracy).
    """
    cm = torch.as_tensor(confusion).to(torch.float64)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ShapeError(f"confusion must be [{k}, {k}] for {k} class names, got {tuple(cm.shape)}")
    rows = cm.sum(dim=1, keepdim=True)
    recall = torch.where(rows > 0, cm / rows.clamp_min(1), torch.zeros_like(cm)).numpy()
    total = float(cm.sum())
    size = min(max(4.0, 0.45 * k + 2.0), 16.0)
    fig, ax = _figure(figsize=(size + 1.5, size))
    im = ax.imshow(recall, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if k <= 40:
        ax.set_xticks(range(k), [str(c) for c in class_names], rotation=90)
        ax.set_yticks(range(k), [str(c) for c in class_names])
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j] > 0:
                    color = "white" if recall[i, j] > 0.5 else "black"
                    ax.text(
                        j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7, color=color
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = float(cm.trace()) / total if total else float("nan")
    ax.set_title(title if title is not None else f"accuracy {acc:.4f} ({int(total)} images)")
    return _save(fig, path)
