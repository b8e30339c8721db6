"""Table 3: which gaussian parameters the KLD repulsion moves, CIFAR-10 (``data.name=cifar100``
for the other half): #1 none (lambda = 0, the data-init baseline), #2 means only from identity
variances, #3 variances only, #4 both (variances bounded to the GD range, without which the joint
paper-form update has no finite fixed point at this lambda). Pass ``--set data.root=...``."""

from ray import tune

from search_spaces import SearchSpace

SETTINGS = [
    {"prior.method": "data-init"},
    {"prior.method": "fpi", "prior.fpi.update": "mean", "prior.fpi.variance_init": "identity"},
    {"prior.method": "fpi", "prior.fpi.update": "variance"},
    {"prior.method": "fpi", "prior.fpi.update": "both", "prior.fpi.var_bounds": (0.25, 1.25)},
]

SPACE = SearchSpace(
    name="table3",
    reproduces="Table 3 (KLD on mu only / Sigma only / both / none), CIFAR-10",
    experiment="cifar10",
    base={"prior.objective.lam": 300.0},
    params={"setting": tune.grid_search(SETTINGS)},
    group_by=("prior.method", "prior.fpi.update", "prior.fpi.variance_init"),
)
