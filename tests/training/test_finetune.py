"""Pretrain, then fine-tune (flow.init_from; nfpi.training.finetune) at toy scale: an attention
flow pretrained for one epoch on a generated 5-class ImageFolder (a .tar.gz, as ImageNet ships),
fine-tuned on a 3-class one; the flow starts bit for bit from the pretrained weights and the
prior is data-initialised for the new classes."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nfpi.checkpoint import find_checkpoint, load_checkpoint, load_trained
from nfpi.data import dequantize
from nfpi.entry import run_cli
from nfpi.errors import CheckpointError, ConfigError
from nfpi.presets import EXPERIMENTS, experiment_config
from nfpi.training import Trainer

SIZE = 8
TOY = {
    "device": "cpu",
    "data.name": "imagefolder",
    "data.image_size": SIZE,
    "data.items_per_class": None,
    "data.augment": False,
    "flow.preset": "tiny-attn",
    "optim.epochs": 1,
    "optim.batch_size": 10,
    "optim.warmup_steps": 2,
    "eval.plots": False,
    "eval.batch_size": 50,
}


def _image_folder(root: Path, classes: int, train: int, test: int, seed: int) -> Path:
    """root/{train,test}/c<k>/*.png: RGB 8x8, each class its own colour and stripe."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for k in range(classes):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.uniform(40, 215, size=3)
            for i in range(n):
                img = base + rng.normal(0, 20, size=(SIZE, SIZE, 3))
                img[k % SIZE, :, :] += 60
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(
                    folder / f"{i:03d}.png"
                )
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """The run directory of a 1-epoch imagenet32_pretrain run on a 5-class toy archive."""
    base = tmp_path_factory.mktemp("pretrain")
    tree = _image_folder(base / "imagenet-toy", classes=5, train=12, test=4, seed=0)
    archive = base / "imagenet-toy.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tree, arcname="imagenet-toy")
    config = experiment_config("imagenet32_pretrain", {**TOY, "data.root": str(archive)})
    assert (
        config.flow.preset == "tiny-attn"
        and EXPERIMENTS["imagenet32_pretrain"]["flow.preset"] == "mef-cifar-attn"
    )
    run_dir = base / "run"
    Trainer(config, run_dir).fit()
    return run_dir


@pytest.fixture(scope="module")
def new_data(tmp_path_factory) -> Path:
    return _image_folder(tmp_path_factory.mktemp("cifar-toy"), classes=3, train=10, test=4, seed=1)


def _finetune(new_data: Path, init_from: Path | str, **more) -> object:
    return experiment_config(
        "cifar10_finetune",
        {**TOY, "data.root": str(new_data), "flow.init_from": str(init_from), **more},
    )


@pytest.mark.slow
def test_finetune_starts_from_the_pretrained_flow_with_a_prior_for_the_new_classes(
    pretrained: Path, new_data: Path, tmp_path: Path
) -> None:
    saved = load_checkpoint(find_checkpoint(pretrained))
    assert saved["prior"]["means"].shape[0] == 5
    trainer = Trainer(_finetune(new_data, pretrained), tmp_path / "ft")
    at_first_step: dict[str, torch.Tensor] = {}

    def before_each_step(optimizer, args, kwargs) -> None:
        if not at_first_step:
            at_first_step.update({k: v.clone() for k, v in trainer.flow.state_dict().items()})

    trainer.optimizer.register_step_pre_hook(before_each_step)
    history = trainer.fit()
    assert at_first_step, "no optimiser step was taken"
    # Bit for bit the pretrained (online) flow when the first optimiser step is taken.
    assert at_first_step.keys() == saved["flow"].keys()
    assert any(".attention." in k for k in at_first_step)
    for key, value in saved["flow"].items():
        assert torch.equal(at_first_step[key], value), key
    # ... and training moved it afterwards (the spy saw the weights before the step).
    after = trainer.flow.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in saved["flow"].items())
    # The prior: one gaussian per new class, data-initialised from the loaded flow on the new
    # data (class means of its latents; dequantisation noise keeps it approximate).
    initial = trainer.schedule.initial
    assert initial.means.shape == (3, 3 * SIZE * SIZE) and trainer.prior.means.shape[0] == 3
    flow = trainer.flow.__class__(trainer.flow.spec, trainer.flow.in_shape)
    flow.load_state_dict(saved["flow"])
    x = torch.stack([trainer.train_set[i][0] for i in range(len(trainer.train_set))])
    y = torch.as_tensor(trainer.train_set.targets)
    with torch.no_grad():
        z = flow(dequantize(x, levels=trainer.info.levels, generator=torch.Generator()))[0]
    for k in range(3):
        class_mean = z[y == k].double().mean(0)
        gap = (initial.means[k] - class_mean).norm() / class_mean.norm()
        assert gap < 0.05, (k, float(gap))
    assert np.isfinite(history[-1]["nf_acc"]) and history[-1]["prior_version"] >= 1
    # What downstream uses read back: the attention flow and the 3-class prior.
    trained = load_trained(tmp_path / "ft")
    assert trained.flow.spec.attention and trained.prior.means.shape[0] == 3


@pytest.mark.slow  # the pretraining fixture
def test_finetune_refuses_a_flow_of_another_architecture_in_one_line(
    pretrained: Path, new_data: Path, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError) as info:
        Trainer(_finetune(new_data, pretrained, **{"flow.preset": "tiny"}), tmp_path / "a").fit()
    message = str(info.value)
    assert "\n" not in message and "unexpected" in message and ".attention." in message
    assert "flow.init_from=" in message and "'tiny-attn'" in message
    with pytest.raises(CheckpointError, match=r"of another shape \(.*saved"):
        Trainer(_finetune(new_data, pretrained, **{"flow.hidden": 8}), tmp_path / "b").fit()
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        Trainer(_finetune(new_data, tmp_path / "nothing"), tmp_path / "c").fit()


@pytest.mark.parametrize("experiment", ["cifar10_finetune", "cifar100_finetune"])
def test_finetune_experiments_require_init_from(experiment: str) -> None:
    with pytest.raises(ConfigError) as info:
        experiment_config(experiment, {"data.root": "/data"})
    assert info.value.field == "flow.init_from" and "--set flow.init_from=" in str(info.value)
    config = experiment_config(experiment, {"data.root": "/data", "flow.init_from": "/run"})
    assert config.flow.preset == "mef-cifar-attn" and config.flow.overrides() == {}
    assert config.prior.fpi.update == "mean" and config.ema.update_every == 1


def test_cli_says_in_one_line_that_init_from_is_missing_and_config_shows_a_placeholder(capsys):
    import io
    import json

    from nfpi import cli

    err = io.StringIO()
    argv = ["train", "--experiment", "cifar100_finetune", "--set", "data.root=/data"]
    assert run_cli(cli.main, argv, stderr=err) == 2
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1 and "flow.init_from" in lines[0] and "Traceback" not in lines[0]
    assert cli.main(["config", "--experiment", "cifar100_finetune"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["flow"]["init_from"] == cli.INIT_FROM_PLACEHOLDER
    assert shown["data"]["root"] == cli.DATA_ROOT_PLACEHOLDER
