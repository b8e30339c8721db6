"""Table 5: a classifier on real CIFAR-10 without/with standard augmentations (RandAugment,
random erasing, mixup/cutmix) and without/with NF augmentation (latent mixup of same-class pairs
in the class's principal subspace, from the FPI flow of the ``cifar10`` experiment, trained once).
The paper trains a 7 M-parameter Swin; the default here is timm's ResNet-18 with the CIFAR stem
(``--set cnn.model=...`` for any timm model). Pass ``--set data.root=/abs/path/to/cifar10``."""

from ray import tune

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

SPACE = SearchSpace(
    name="table5_augment",
    reproduces="Table 5 (classifier accuracy with/without standard and NF augmentations), CIFAR-10",
    experiment="cifar10",
    base={"prior.method": "fpi", "downstream.kind": "augment", "cnn.epochs": 30},
    params={
        "augmentation": tune.grid_search(
            [{**PLAIN, **NO_NF}, {**PLAIN, **NF}, {**STANDARD, **NO_NF}, {**STANDARD, **NF}]
        )
    },
    metric="aug_acc",
    group_by=("cnn.randaugment", "cnn.nf_augment"),
    kind="downstream",
)
