"""Table 1: NF-Acc of data-init (lambda = 0), GD under the five learning-rate policies, and FPI,
with the paper's MEF flow and budget (500 epochs), per dataset. Pass the data:
``--set data.root=/abs/path/to/cifar10``; ``--set dataset=cifar100`` for the second column.

Options (``--set KEY=VALUE``; first value = default):

- ``dataset=cifar10|cifar100``: the FPI row is that dataset's best released setting (Table 1's
  FPI row: CIFAR-10 ``mean_var``, CIFAR-100 ``mean`` from identity variances).
- ``variant=as_released|paper``: the FPI row's update (:mod:`nfpi.presets`).
- ``gd_weights=equal|as_released``: GD minimises the FPI's objective (same lambda, alpha, pi:
  the fair comparison), or the release's GD weights (lambda 50 -> 25 over 100 GD steps).

GD runs ``prior.gd.steps_per_solve`` Adam steps per epoch; its policies decay over the whole run
(``total_steps`` = epochs x steps per epoch). The data-init and GD rows do not depend on
``variant``, so both variants share those flows."""

from ray import tune

from nfpi.presets import GD_WEIGHTS, TABLE1_SETTING, VARIANTS, gd_overrides, released_overrides
from search_spaces import SearchSpace

EPOCHS, GD_STEPS = 500, 100
POLICIES = ("sublinear_v1", "sublinear_v2", "linear", "superlinear_v1", "superlinear_v2")
OPTIONS = {"dataset": ("cifar10", "cifar100"), "variant": VARIANTS, "gd_weights": GD_WEIGHTS}


def _gd(policy: str, weights: str) -> dict:
    return {
        "prior.method": "gd",
        "prior.gd.steps_per_solve": GD_STEPS,
        "prior.gd.policy": {
            "name": policy,
            "lr0": 0.1,
            "lr_min": 1e-3,
            "total_steps": EPOCHS * GD_STEPS,
        },
        **gd_overrides(weights),
    }


def build(
    dataset: str = "cifar10", variant: str = "as_released", gd_weights: str = "equal"
) -> SearchSpace:
    """The space for one choice of the options (the experiment ``dataset`` is Table 1's FPI
    setting as released, so its objective is the one GD minimises at equal weights)."""
    setting = f"{dataset}/{TABLE1_SETTING[dataset]}"
    rows = (
        [{"prior.method": "data-init"}]
        + [_gd(p, gd_weights) for p in POLICIES]
        + [released_overrides(setting, variant)]
    )
    return SearchSpace(
        name="table1",
        reproduces=(
            f"Table 1 (NF-Acc: data-init, GD x 5 learning-rate policies, FPI), {dataset}: "
            f"FPI {setting} {variant}, GD weights {gd_weights}"
        ),
        experiment=dataset,
        base={"optim.epochs": EPOCHS},
        params={"row": tune.grid_search(rows)},
        group_by=("prior.method", "prior.gd.policy.name"),
        options=OPTIONS,
        build=build,
        chosen={"dataset": dataset, "variant": variant, "gd_weights": gd_weights},
    )


SPACE = build()
