"""Table 1: NF-Acc of data-init (lambda = 0), GD under the five learning-rate policies, and FPI,
on CIFAR-10 with the paper's MEF flow and budget (500 epochs). Pass the data:
``--set data.root=/abs/path/to/cifar10`` (or ``data.name=cifar100`` for the second column).

GD runs ``prior.gd.steps_per_solve`` Adam steps per epoch; its policies decay over the whole run
(``total_steps`` = epochs x steps per epoch)."""

from ray import tune

from search_spaces import SearchSpace

EPOCHS, GD_STEPS = 500, 100
POLICIES = ("sublinear_v1", "sublinear_v2", "linear", "superlinear_v1", "superlinear_v2")


def _gd(policy: str) -> dict:
    return {
        "prior.method": "gd",
        "prior.gd.steps_per_solve": GD_STEPS,
        "prior.gd.policy": {
            "name": policy,
            "lr0": 0.1,
            "lr_min": 1e-3,
            "total_steps": EPOCHS * GD_STEPS,
        },
    }


SPACE = SearchSpace(
    name="table1",
    reproduces="Table 1 (NF-Acc: data-init, GD x 5 learning-rate policies, FPI), CIFAR-10",
    experiment="cifar10",
    base={"optim.epochs": EPOCHS},
    params={
        "variant": tune.grid_search(
            [{"prior.method": "data-init"}] + [_gd(p) for p in POLICIES] + [{"prior.method": "fpi"}]
        )
    },
    group_by=("prior.method", "prior.gd.policy.name"),
)
