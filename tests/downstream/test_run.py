"""Downstream evaluations of a trained flow: CNN-Acc on generated images, NF augmentation."""

import json

import pytest

from nfpi.downstream import DownstreamConfig, run_downstream
from nfpi.errors import ConfigError

FAST = {"cnn.model": "resnet10t", "cnn.epochs": 1, "cnn.flip": False, "cnn.batch_size": 50}


def test_cnn_accuracy_on_generated_images_with_real_reference(checkpoint, tmp_path):
    config = DownstreamConfig.from_overrides(
        {
            **FAST,
            "downstream.per_class": 6,
            "downstream.reference": True,
            "downstream.temperature": 0.7,
        }
    )
    seen = []
    result = run_downstream(
        checkpoint, config, tmp_path, callback=lambda role, e, m: seen.append((role, e))
    )
    assert 0 <= result.metrics["cnn_acc"] <= 1 and 0 <= result.metrics["real_acc"] <= 1
    assert result.metrics["generated_per_class"] == 6
    assert seen == [("generated", 0), ("real", 0)]
    assert all(p.exists() for p in result.artifacts) and len(result.artifacts) == 2
    assert (tmp_path / "generated" / "manifest.json").exists()
    assert len(result.histories["generated"]) == 1


def test_augment_with_nf_augmentation(checkpoint, tmp_path):
    config = DownstreamConfig.from_overrides(
        {
            **FAST,
            "downstream.kind": "augment",
            "cnn.nf_augment": {"n_components": 4, "probability": 0.5, "per_class_fit_samples": 20},
        }
    )
    result = run_downstream(checkpoint, config, tmp_path)
    assert 0 <= result.metrics["aug_acc"] <= 1 and "augmented" in result.histories
    assert result.results["augmented"].nf_augment_stats  # the NF augmentation really ran


def test_augment_trains_the_classifier_on_a_subset_of_the_flows_training_set(checkpoint, tmp_path):
    nf = {"n_components": 4, "probability": 0.5, "per_class_fit_samples": 20}
    overrides = {**FAST, "downstream.kind": "augment", "cnn.nf_augment": nf}
    full = run_downstream(checkpoint, DownstreamConfig.from_overrides(overrides), tmp_path / "a")
    subset = run_downstream(
        checkpoint,
        DownstreamConfig.from_overrides(
            {**overrides, "downstream.items_per_class": 3, "cnn.batch_size": 10}
        ),
        tmp_path / "b",
    )
    k = len(subset.results["augmented"].per_class_accuracy)
    # one epoch: every training image passes the NF augmentation once
    assert subset.results["augmented"].nf_augment_stats["images"] == 3 * k
    assert full.results["augmented"].nf_augment_stats["images"] > 3 * k


def test_bad_downstream_values_name_their_field():
    with pytest.raises(ConfigError, match="downstream.kind"):
        DownstreamConfig.from_overrides({"downstream.kind": "gan"})
    with pytest.raises(ConfigError, match="cnn.epochs"):
        DownstreamConfig.from_overrides({"cnn.epochs": 0})
    with pytest.raises(ConfigError, match="cnn.nf_augment"):
        DownstreamConfig.from_overrides({"cnn.nf_augment": {"probability": 0.5}})
    with pytest.raises(ConfigError, match="downstream.tempo"):
        DownstreamConfig.from_overrides({"downstream.tempo": 1})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"downstream.kind": "gan"}, "downstream.kind"),
        ({"downstream.temperature": -1}, "downstream.temperature"),
        ({"downstream.per_class": 0}, "downstream.per_class"),
        ({"downstream.classifier": {}}, "downstream.classifier"),
        ({"cnn.epochs": 0}, "cnn.epochs"),
        ({"cnn.epoch": 3}, "cnn.epoch"),
        ({"cnn.nf_augment": {"probability": 0.5}}, "cnn.nf_augment"),
        ({"model.name": "x"}, "model.name"),
        # Nested NF-augmentation fields keep their whole path (this once said cnn.probability).
        (
            {"downstream.kind": "augment", "cnn.nf_augment": {"probability": 2.0}},
            "cnn.nf_augment.probability",
        ),
        (
            {"downstream.kind": "augment", "cnn.nf_augment.probability": 2.0},
            "cnn.nf_augment.probability",
        ),
        (
            {"downstream.kind": "augment", "cnn.nf_augment": {"n_components": 0}},
            "cnn.nf_augment.n_components",
        ),
    ],
)
def test_errors_carry_the_dotted_key(overrides, field):
    with pytest.raises(ConfigError) as err:
        DownstreamConfig.from_overrides(overrides)
    assert err.value.field == field


def test_overrides_build_nested_configs():
    config = DownstreamConfig.from_overrides(
        {
            "downstream.kind": "augment",
            "downstream.temperature": 1,
            "cnn.epochs": 2,
            "cnn.nf_augment": {"n_components": 4},
            "cnn.nf_augment.probability": 1,
        }
    )
    assert config.temperature == 1.0 and isinstance(config.temperature, float)
    assert config.classifier.epochs == 2
    assert config.classifier.nf_augment.n_components == 4
    assert config.classifier.nf_augment.probability == 1.0
    assert DownstreamConfig.from_dict(config.to_dict()) == config


def test_cli_downstream(checkpoint, tmp_path, capsys):
    from nfpi.cli import main

    args = ["downstream", str(checkpoint), "--output-dir", str(tmp_path)]
    for key, value in {**FAST, "downstream.per_class": 6}.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 0
    assert "cnn_acc" in capsys.readouterr().out
    assert (tmp_path / "confusion_generated.png").exists()


@pytest.mark.slow  # two downstream runs
def test_a_failed_downstream_run_resumes_its_classifiers_and_reuses_its_generated_set(
    checkpoint, tmp_path
):
    config = DownstreamConfig.from_overrides(
        {**FAST, "cnn.epochs": 2, "downstream.per_class": 6, "downstream.reference": True}
    )
    whole = run_downstream(checkpoint, config, tmp_path / "whole")

    def crash_in_real(role, epoch, metrics):
        if role == "real" and epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_downstream(checkpoint, config, tmp_path / "r", callback=crash_in_real)
    manifest = tmp_path / "r" / "generated" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    seen = []
    again = run_downstream(
        checkpoint, config, tmp_path / "r", callback=lambda role, e, m: seen.append((role, e))
    )
    assert seen == [("real", 1)]  # the generated classifier had finished, real resumes at 1
    assert manifest.stat().st_mtime_ns == stamp  # the generated set was reused, not redrawn
    assert again.results["generated"].resumed_epochs == 2
    assert again.results["real"].resumed_epochs == 1
    for key in ("cnn_acc", "cnn_top5", "real_acc", "real_top5"):
        assert again.metrics[key] == whole.metrics[key]
    # Another temperature draws another set: its classifier starts over.
    hotter = DownstreamConfig.from_overrides({**FAST, "cnn.epochs": 2, "downstream.per_class": 6,
                                              "downstream.temperature": 0.5})  # fmt: skip
    redo = run_downstream(checkpoint, hotter, tmp_path / "r")
    assert redo.results["generated"].resumed_epochs == 0
