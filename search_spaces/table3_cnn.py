"""Table 3 with CNN-Acc: the four settings of the ``table3`` space (KLD on none / mu only from
identity variances / Sigma only / both), each flow generating a labelled set as large as the
real training set for a ResNet-18 trained with its dataset's epochs (30 CIFAR-10, 50
CIFAR-100). Pass ``--set data.root=/abs/path/to/cifar10``. Options as ``table3``:
``dataset=cifar10|cifar100``, ``variant=as_released|paper``, ``train_set=full|released``."""

from ray import tune

from nfpi.presets import CNN_EPOCHS
from search_spaces import SearchSpace
from search_spaces.table3 import OPTIONS, settings


def build(
    dataset: str = "cifar10", variant: str = "as_released", train_set: str = "full"
) -> SearchSpace:
    return SearchSpace(
        name="table3_cnn",
        reproduces=f"Table 3 (NF-Acc and CNN-Acc per KLD setting), {dataset}, {variant}",
        experiment=dataset,
        base={
            "downstream.kind": "cnn",
            "downstream.temperature": 1.0,
            "cnn.epochs": CNN_EPOCHS[dataset],
        },
        params={"setting": tune.grid_search(settings(dataset, variant, train_set))},
        group_by=("name",),
        kind="downstream",
        options=OPTIONS,
        build=build,
        chosen={"dataset": dataset, "variant": variant, "train_set": train_set},
    )


SPACE = build()
