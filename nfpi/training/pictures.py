"""The pictures of a training run: class-conditional sample grids, t-SNE of test latents, and
per prior update the pairwise-KL heatmaps and (FPI) the solver's residual curve."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from nfpi import plots
from nfpi.data import dequantize, display_uint8, to_uint8
from nfpi.prior import FPIReport, GaussianPrior, PriorReport, pairwise_kl

__all__ = [
    "MAX_GRID_CLASSES",
    "grid_classes",
    "prior_update_pictures",
    "residual_title",
    "sample_and_tsne_pictures",
]

# Rows of a sample grid: one per class up to this many; ImageNet's 1000 rows would make a PNG
# 9,000 pixels tall that takes longer to draw than an epoch of a toy run.
MAX_GRID_CLASSES = 100


def grid_classes(num_classes: int, limit: int = MAX_GRID_CLASSES) -> Tensor:
    """The classes a sample grid shows: all of them, or ``limit`` evenly spaced ones (the
    first and the last included), int64 [min(K, limit)]."""
    if num_classes <= limit:
        return torch.arange(num_classes)
    return torch.linspace(0, num_classes - 1, limit, dtype=torch.float64).round().long().unique()


@torch.no_grad()
def sample_and_tsne_pictures(
    flow: nn.Module,
    prior: GaussianPrior,
    test_batches: Iterable[tuple[Tensor, Tensor]],
    class_names: Sequence[str],
    out: Path,
    *,
    temperatures: Sequence[float],
    samples_per_class: int,
    tsne_points: int,
    seed: int,
    tag: str = "",
    levels: int = 256,
) -> list[Path]:
    """Sample grids (one row per class, :func:`grid_classes` of them) at each temperature and
    the t-SNE of up to ``tsne_points`` test latents with the prior means; returns the PNGs
    written."""
    was_training = flow.training
    flow.eval()
    device = prior.means.device
    gen = torch.Generator(device=device).manual_seed(seed)
    classes = grid_classes(prior.num_classes)
    labels = classes.to(device).repeat_interleave(samples_per_class)
    row_names = [class_names[c] for c in classes.tolist()]
    paths = []
    try:
        for t in temperatures:
            z = prior.sample(labels, temperature=t, generator=gen)
            x, _ = flow.inverse(z)
            pixels = display_uint8(to_uint8(x, levels), levels)
            paths.append(plots.sample_grid(pixels, row_names, t, out / f"samples_T{t:g}{tag}.png"))
        if tsne_points > 0:
            zs, ys, seen = [], [], 0
            for x, y in test_batches:
                z, _ = flow(dequantize(x.to(device), levels=levels))
                zs.append(z.cpu())
                ys.append(y)
                seen += len(y)
                if seen >= tsne_points:
                    break
            z, y = torch.cat(zs)[:tsne_points], torch.cat(ys)[:tsne_points]
            paths.append(
                plots.tsne_plot(z, y, prior.means, class_names, out / f"tsne{tag}.png", seed)
            )
    finally:
        flow.train(was_training)
    return paths


def residual_title(report: FPIReport) -> str:
    """The residual curve's title: how the solve stopped and how many iterates the curve shows
    (one point each); map evaluations (``report.iterations``) also count the Anderson candidates
    that were evaluated and rejected, so they can be more."""
    iterates = len(report.residuals)
    title = f"FPI residual ({report.stop_reason}: {iterates} iterates"
    if report.iterations != iterates:
        title += f", {report.iterations} map evaluations"
    return title + ")"


def prior_update_pictures(
    before: GaussianPrior,
    after: GaussianPrior,
    report: PriorReport | None,
    version: int,
    class_names: Sequence[str],
    out: Path,
    *,
    name: str | None = None,
    titles: tuple[str, str] = ("before", "after"),
) -> list[Path]:
    """The pairwise KL of two priors (``kl_heatmap_<name>.png``, default name ``v<version>``)
    and, for an FPI solve, its residual curve (``fpi_residual_v<version>.png``)."""
    kl_before = pairwise_kl(before.means, before.scale_param)
    kl_after = pairwise_kl(after.means, after.scale_param)
    tag = name or f"v{version}"
    paths = [
        plots.kl_heatmaps(
            kl_before, kl_after, class_names, out / f"kl_heatmap_{tag}.png", titles=titles
        )
    ]
    if isinstance(report, FPIReport) and report.residuals:
        paths.append(
            plots.residual_curve(
                report.residuals,
                out / f"fpi_residual_v{version}.png",
                title=residual_title(report),
            )
        )
    return paths
