"""Table 2: NF-Acc (and, with the CNN pipeline, CNN-Acc) against lambda on CIFAR-100, FPI prior,
the paper's MEF flow and budget. Pass ``--set data.root=/abs/path/to/cifar100``."""

from ray import tune

from search_spaces import SearchSpace

LAMBDAS = (10.0, 50.0, 100.0, 200.0, 300.0, 500.0)

SPACE = SearchSpace(
    name="table2",
    reproduces="Table 2 (NF-Acc vs lambda in {10, 50, 100, 200, 300, 500}), CIFAR-100",
    experiment="cifar100",
    base={"prior.method": "fpi"},
    params={"prior.objective.lam": tune.grid_search(list(LAMBDAS))},
    group_by=("prior.objective.lam",),
)
