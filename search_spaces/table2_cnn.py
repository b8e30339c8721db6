"""Table 2 with CNN-Acc: for each lambda of the ``table2`` space, the same FPI flow (trained
once, shared with ``table2`` through its config digest) generates a labelled set as large as the
real training set (T = 1) on which a ResNet-18 is trained (the paper's recipe: 50 epochs for
CIFAR-100, 30 for CIFAR-10) and tested on the real test set. NF-Acc and CNN-Acc side by side.
Pass ``--set data.root=/abs/path/to/cifar100``. Options as ``table2``:
``dataset=cifar100|cifar10``, ``variant=as_released|paper``."""

from nfpi.presets import CNN_EPOCHS
from search_spaces import SearchSpace
from search_spaces.table2 import OPTIONS, flows


def build(dataset: str = "cifar100", variant: str = "as_released") -> SearchSpace:
    base, params = flows(dataset, variant)
    return SearchSpace(
        name="table2_cnn",
        reproduces=f"Table 2 (NF-Acc and CNN-Acc vs lambda), {dataset}, FPI mean_var {variant}",
        experiment=dataset,
        base={
            **base,
            "downstream.kind": "cnn",
            "downstream.temperature": 1.0,
            "cnn.epochs": CNN_EPOCHS[dataset],
        },
        params=params,
        group_by=("prior.objective.lam",),
        kind="downstream",
        options=OPTIONS,
        build=build,
        chosen={"dataset": dataset, "variant": variant},
    )


SPACE = build()
