"""ImageNet's shape at toy size (``rehearsals/imagenet.py``): a generated 1000-class
ImageFolder of 32 x 32 JPEGs trained through a Tune trial around a 2-worker Ray Train run, the
FPI solved in the prior actor at K = 1000, d = 3072."""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from nfpi.checkpoint import find_checkpoint, load_checkpoint
from rehearsals.imagenet import MIN_PER_CLASS, NUM_CLASSES, rehearse


@pytest.mark.cluster
def test_thousand_classes_through_tune_and_two_train_workers(ray_session, tmp_path):
    record, errors = rehearse(tmp_path, smoke=True, epochs=1, max_iter=2, per_class=MIN_PER_CLASS)
    assert errors == []
    (epoch,) = record["per_epoch"]
    assert (epoch["world"], epoch["prior_classes"], epoch["prior_dim"]) == (2, 1000, 3072)
    assert epoch["fpi_iterations"] == 2 and epoch["prior_refresh_s"] > 0
    assert epoch["actor_peak_mib"] > 0 and record["idle_actor_peak_mib"] > 0
    # Both splits were decoded once into the uint8 cache, which the ranks memory-mapped.
    assert len(list((tmp_path / "decoded").rglob("images.u8"))) == 2
    (run_dir,) = (tmp_path / "runs").glob("imagenet-toy-*")
    state = load_checkpoint(find_checkpoint(run_dir))
    assert state["prior"]["means"].shape == (NUM_CLASSES, 3072)
    assert state["prior"]["means"].dtype == torch.float64
    # NF-Acc over 1000 classes is in the metrics Tune saw and in the run's file.
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["nf_acc"] == record["final"]["nf_acc"]
    assert 0.0 <= record["final"]["nf_acc"] <= 1.0
    assert {"samples_T0.7.png", "tsne.png", "kl_heatmap_v2.png"} <= set(record["plots"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("nfpi-imagenet-toy").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "nf_acc")] == [0]
