"""Table 2 with CNN-Acc: for each lambda of the ``table2`` space, the same FPI flow (trained
once, shared with ``table2`` through its config digest) generates a labelled CIFAR-100-sized set
(500 images per class, T = 1) on which a ResNet-18 is trained (the paper's recipe, 50 epochs for
CIFAR-100) and tested on the real test set. NF-Acc and CNN-Acc side by side. Pass
``--set data.root=/abs/path/to/cifar100``."""

from ray import tune

from search_spaces import SearchSpace
from search_spaces.table2 import LAMBDAS

SPACE = SearchSpace(
    name="table2_cnn",
    reproduces="Table 2 (NF-Acc and CNN-Acc vs lambda), CIFAR-100",
    experiment="cifar100",
    base={
        "prior.method": "fpi",
        "downstream.kind": "cnn",
        "downstream.temperature": 1.0,
        "cnn.epochs": 50,
    },
    params={"prior.objective.lam": tune.grid_search(list(LAMBDAS))},
    group_by=("prior.objective.lam",),
    kind="downstream",
)
