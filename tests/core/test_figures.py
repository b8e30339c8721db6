"""Figures 1 and 2 at toy size: PNG files a person can open, their summaries, the command line,
and the MLflow wrapper that logs them as artifacts of the run that made them."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nfpi.errors import ConfigError, DatasetNotFoundError
from nfpi.figures import Figure1Config, figure1, figure2, load_points, shared_golden_path

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def toy_points(tmp_path_factory):
    """Three overlapping 2-D blobs (a stand-in for the t-SNE embedding) as an .npz."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 3
    centers = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    x = centers[y] + 2.0 * torch.randn(600, 2, generator=g)
    path = tmp_path_factory.mktemp("points") / "toy2d.npz"
    np.savez(path, x=x.numpy().astype(np.float32), y=y.numpy())
    return path


def _opens(path, min_side=100):
    assert path.read_bytes()[:8] == PNG
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert min(img.size) >= min_side
        return img.size


@pytest.mark.parametrize("form", ["reference", "paper"])
def test_figure1_at_toy_size(toy_points, tmp_path, form):
    x, y = load_points(toy_points)
    config = Figure1Config(form=form, points=300, samples_per_class=100, lam_large=300.0)
    png, summary = figure1(x, y, tmp_path / "f1.png", config)
    width, height = _opens(png)
    assert width > 2 * height  # four panels side by side
    assert summary["classes"] == 3 and summary["points"] == 600
    for panel in ("panel_c", "panel_d"):
        assert summary[panel]["converged"]
    # The larger lambda separates the classes more.
    assert summary["panel_d"]["kl_min"] > summary["panel_c"]["kl_min"]


def test_figure1_golden_case_is_the_notebooks_solve(tmp_path):
    path = shared_golden_path()
    if path is None:
        pytest.skip("golden 2-D data not found (set NFPI_SHARED_DATA to its folder)")
    x, y = load_points(path)
    png, summary = figure1(x, y, tmp_path / "golden.png", Figure1Config(points=2000))
    _opens(png)
    # Panel (d) at lambda = 1000 is the authors' stored run: 20 iterations.
    assert summary["panel_d"]["lam"] == 1000.0 and summary["panel_d"]["iterations"] == 20


def test_figure2_from_a_checkpoint(checkpoint, tmp_path):
    png, summary = figure2(checkpoint, tmp_path / "f2.png", classes=[0, 3, 7], variants=3)
    _opens(png)
    assert summary["classes"] == [0, 3, 7] and summary["variants"] == 3
    stats = summary["nf_augment_stats"]
    assert stats["picked"] == 9 and stats["augmented"] + stats["nonfinite"] == 9
    assert stats["augmented"] > 0
    with pytest.raises(ConfigError, match="classes"):
        figure2(checkpoint, tmp_path / "bad.png", classes=[10])


def test_cli_figures(checkpoint, toy_points, tmp_path, capsys):
    from nfpi.cli import main

    out = tmp_path / "figs"
    args = ["figures", "--out", str(out), "--data", str(toy_points), "--checkpoint",
            str(checkpoint), "--classes", "1", "2", "--set", "points=100",
            "--set", "samples_per_class=20"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    for name in ("figure1_tsne2d.png", "figure2_nf_augmentation.png", "figures.json"):
        assert (out / name).exists() and name in printed
    summary = json.loads((out / "figures.json").read_text())
    assert summary["figure2"]["classes"] == [1, 2]
    assert summary["figure1"]["config"]["points"] == 100
    with pytest.raises(ConfigError, match="--checkpoint"):
        main(["figures", "--out", str(out), "--figures", "2"])
    with pytest.raises(DatasetNotFoundError, match="--data"):
        main(["figures", "--out", str(out), "--figures", "1", "--data", str(tmp_path / "x.npz")])
    with pytest.raises(ConfigError, match="lam_small"):
        main(["figures", "--out", str(out), "--figures", "1", "--data", str(toy_points),
              "--set", "lam_small=5000"])  # fmt: skip


@pytest.mark.slow  # trains and logs the figures
def test_mlflow_wrapper_logs_the_figures_as_artifacts(checkpoint, toy_points, tmp_path, tracking):
    from mlflow.tracking import MlflowClient

    from ray_jobs.figures import main

    args = ["--results-dir", str(tmp_path), "--tracking-uri", tracking.uri, "--mlflow-experiment",
            tracking.experiment, "--data", str(toy_points), "--checkpoint", str(checkpoint),
            "--set", "points=100", "--set", "samples_per_class=20"]  # fmt: skip
    assert main(args) == 0
    client = MlflowClient(tracking.uri)
    (run,) = client.search_runs([tracking.experiment_id()])
    assert run.info.status == "FINISHED" and run.data.tags["nfpi.figures"] == "1"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert arts == {
        "figures/figure1_tsne2d.png",
        "figures/figure2_nf_augmentation.png",
        "figures/figures.json",
    }
    assert (tmp_path / "runs" / "figures" / "figure1_tsne2d.png").exists()
    local = client.download_artifacts(run.info.run_id, "figures/figure2_nf_augmentation.png",
                                      str(tmp_path / "dl"))  # fmt: skip
    assert Path(local).read_bytes()[:8] == PNG
