"""Table 5 with a ResNet-18: a classifier on real CIFAR images without/with standard
augmentations (RandAugment, random erasing, mixup/cutmix) and without/with NF augmentation
(latent mixup of same-class pairs in the class's principal subspace, from the dataset's Table 1
FPI flow, trained once). The paper trains a 7 M-parameter Swin: that is ``table5_swin``; this
space substitutes timm's ResNet-18 with the CIFAR stem and its SGD one-cycle recipe (a faster
check of the same question). Pass ``--set data.root=/abs/path/to/cifar10``.

Options (first value = default): ``dataset=cifar10|cifar100`` (the flow's setting and the
classifier's epochs, 30 / 50) and ``variant=as_released|paper`` (the flow's FPI update)."""

from ray import tune

from nfpi.presets import CNN_EPOCHS, TABLE1_SETTING, VARIANTS, released_overrides
from search_spaces import SearchSpace

STANDARD = {
    "cnn.randaugment": True,
    "cnn.random_erasing": 0.25,
    "cnn.mixup": 0.8,
    "cnn.cutmix": 1.0,
}
PLAIN = {"cnn.randaugment": False, "cnn.random_erasing": 0.0, "cnn.mixup": 0.0, "cnn.cutmix": 0.0}
NF = {"cnn.nf_augment": {"n_components": 16, "probability": 0.5, "weights": "uniform"}}
NO_NF = {"cnn.nf_augment": None}
OPTIONS = {"dataset": ("cifar10", "cifar100"), "variant": VARIANTS}


def build(dataset: str = "cifar10", variant: str = "as_released") -> SearchSpace:
    return SearchSpace(
        name="table5_augment",
        reproduces=(
            f"Table 5 (classifier accuracy with/without standard and NF augmentations) with a "
            f"ResNet-18, {dataset}, flow {variant}"
        ),
        experiment=dataset,
        base={
            **released_overrides(f"{dataset}/{TABLE1_SETTING[dataset]}", variant),
            "downstream.kind": "augment",
            "cnn.epochs": CNN_EPOCHS[dataset],
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
