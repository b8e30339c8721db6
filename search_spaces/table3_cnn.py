"""Table 3 with CNN-Acc: the four settings of the ``table3`` space (KLD on none / mu only from
identity variances / Sigma only / both), each flow generating a CIFAR-10-sized labelled set for a
ResNet-18 (30 epochs). Pass ``--set data.root=/abs/path/to/cifar10``."""

from ray import tune

from search_spaces import SearchSpace
from search_spaces.table3 import SETTINGS

SPACE = SearchSpace(
    name="table3_cnn",
    reproduces="Table 3 (NF-Acc and CNN-Acc per KLD setting), CIFAR-10",
    experiment="cifar10",
    base={
        "prior.objective.lam": 300.0,
        "downstream.kind": "cnn",
        "downstream.temperature": 1.0,
        "cnn.epochs": 30,
    },
    params={"setting": tune.grid_search(SETTINGS)},
    group_by=("prior.method", "prior.fpi.update", "prior.fpi.variance_init"),
    kind="downstream",
)
