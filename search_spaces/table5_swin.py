"""Table 5 as the paper runs it: a 7 M-parameter Swin trained from scratch on the real training
images, without/with standard augmentations and without/with NF augmentation from the dataset's
Table 1 FPI flow (trained once). Any ImageFolder works (any number of classes):
``--set data.name=imagefolder --set data.root=/abs/path/to/cifar10-jpeg.tar.gz``, or the CIFAR
python archives with ``--set data.root=...``.

The recipe (paper section 5.2; the unstated values are listed in :mod:`nfpi.presets`): timm's
Swin at CIFAR size (img_size 32, patch 2, window 4, embed 96, depths (2, 6, 4), heads (3, 6,
12), MLP ratio 2: 7.1 M parameters), AdamW lr 2e-3, weight decay 5e-2, 10 warm-up epochs then
cosine, batch 256, 1000 epochs; random crop + flip in every row. "Standard augmentations" add
AutoAugment (CIFAR-10 policy), RandAugment (2, 9), random erasing 0.25, mixup 0.8 and cutmix
1.0. The Swin reads the images at their own 32 x 32, the flow's resolution too, so nothing is
resized. Images of another size: ``--set 'cnn.model_kwargs={"img_size": 64, ...}'`` (the whole
dict) with ``--set downstream.image_size=64`` (the real images read at 64; NF-augmented ones
made at the flow's resolution and upsampled).

Options (first value = default): ``dataset=cifar10|cifar100`` (which released flow setting) and
``variant=as_released|paper`` (the flow's FPI update)."""

from ray import tune

from nfpi.presets import TABLE1_SETTING, VARIANTS, released_overrides
from search_spaces import SearchSpace

SWIN = {
    "cnn.model": "swin_tiny_patch4_window7_224",
    "cnn.model_kwargs": {
        "img_size": 32,
        "patch_size": 2,
        "window_size": 4,
        "embed_dim": 96,
        "depths": [2, 6, 4],
        "num_heads": [3, 6, 12],
        "mlp_ratio": 2.0,
    },
    "cnn.optimizer": "adamw",
    "cnn.schedule": "cosine",
    "cnn.max_lr": 2e-3,
    "cnn.weight_decay": 5e-2,
    "cnn.warmup_epochs": 10.0,
    "cnn.batch_size": 256,
    "cnn.epochs": 1000,
}
STANDARD = {
    "cnn.autoaugment": "cifar10",
    "cnn.randaugment": True,
    "cnn.random_erasing": 0.25,
    "cnn.mixup": 0.8,
    "cnn.cutmix": 1.0,
}
PLAIN = {
    "cnn.autoaugment": None,
    "cnn.randaugment": False,
    "cnn.random_erasing": 0.0,
    "cnn.mixup": 0.0,
    "cnn.cutmix": 0.0,
}
NF = {"cnn.nf_augment": {"n_components": 16, "probability": 0.5, "weights": "uniform"}}
NO_NF = {"cnn.nf_augment": None}
OPTIONS = {"dataset": ("cifar10", "cifar100"), "variant": VARIANTS}


def build(dataset: str = "cifar10", variant: str = "as_released") -> SearchSpace:
    return SearchSpace(
        name="table5_swin",
        reproduces=(
            f"Table 5 (Swin from scratch with/without standard and NF augmentations), "
            f"{dataset} flow {variant}"
        ),
        experiment=dataset,
        base={
            **released_overrides(f"{dataset}/{TABLE1_SETTING[dataset]}", variant),
            "downstream.kind": "augment",
            **SWIN,
        },
        params={
            "augmentation": tune.grid_search(
                [{**PLAIN, **NO_NF}, {**PLAIN, **NF}, {**STANDARD, **NO_NF}, {**STANDARD, **NF}]
            )
        },
        metric="aug_acc",
        group_by=("cnn.randaugment", "cnn.nf_augment"),
        kind="downstream",
        options=OPTIONS,
        build=build,
        chosen={"dataset": dataset, "variant": variant},
    )


SPACE = build()
