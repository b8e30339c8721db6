"""Table 6: fine-tuning a pretrained EVA02 on an ImageFolder (ImageNet's layout, any number of
classes) without/with standard augmentations (SA) and without/with NF augmentation (NFA) from
the ``imagenet`` experiment's FPI flow (trained once); top-1 and top-5 accuracy (``aug_acc``,
``aug_top5``). Pass the data and the weights (nothing is downloaded):
``--set data.root=/abs/path/to/imagenet --set cnn.pretrained_path=/abs/path/eva02.safetensors``.

The recipe (paper section 5.2; unstated values in :mod:`nfpi.presets`): timm's
``eva02_base_patch14_448`` (87.12 M parameters) from the local weights, the real images read at
448 x 448 (``downstream.image_size``: the classifier's own resolution, not the flow's 32 x 32
upsampled); NF augmentation runs at the flow's 32 x 32 and the images it changes are upsampled
to 448 (:class:`nfpi.downstream.run.ResolutionBridge`), SGD lr 1e-5
with momentum 0.9, constant, global gradient clipping at norm 1, batch 64, 3 epochs, random
crop + flip in every row; SA = RandAugment (2, 9) + random erasing 0.25.

Option (first value = default): ``variant=as_released|paper`` (the flow's FPI update)."""

from ray import tune

from nfpi.presets import VARIANTS, released_overrides
from search_spaces import SearchSpace

EVA02 = {
    "cnn.model": "eva02_base_patch14_448",
    "cnn.input_size": 448,
    "cnn.optimizer": "sgd",
    "cnn.schedule": "constant",
    "cnn.max_lr": 1e-5,
    "cnn.momentum": 0.9,
    "cnn.weight_decay": 0.0,
    "cnn.grad_clip": 1.0,
    "cnn.batch_size": 64,
    "cnn.epochs": 3,
    "downstream.image_size": 448,
}
SA = {"cnn.randaugment": True, "cnn.random_erasing": 0.25}
NO_SA = {"cnn.randaugment": False, "cnn.random_erasing": 0.0}
NFA = {"cnn.nf_augment": {"n_components": 16, "probability": 0.5, "weights": "uniform"}}
NO_NFA = {"cnn.nf_augment": None}
OPTIONS = {"variant": VARIANTS}


def build(variant: str = "as_released") -> SearchSpace:
    return SearchSpace(
        name="table6_eva02",
        reproduces=(
            f"Table 6 (EVA02 fine-tuning: baseline / SA / NFA / NFA + SA), flow {variant}; real "
            "images at 448, NF-augmented ones made at 32 and upsampled to 448"
        ),
        experiment="imagenet",
        base={
            **released_overrides("cifar100/mean", variant),
            "downstream.kind": "augment",
            **EVA02,
        },
        params={
            "augmentation": tune.grid_search(
                [{**NO_SA, **NO_NFA}, {**SA, **NO_NFA}, {**NO_SA, **NFA}, {**SA, **NFA}]
            )
        },
        metric="aug_acc",
        group_by=("cnn.randaugment", "cnn.nf_augment"),
        kind="downstream",
        options=OPTIONS,
        build=build,
        chosen={"variant": variant},
        required=("cnn.pretrained_path",),
    )


SPACE = build()
