"""Table 1: NF-Acc of data-init (lambda = 0), GD under the five learning-rate policies, and FPI,
with the paper's MEF flow and budget (500 epochs), per dataset. Pass the data:
``--set data.root=/abs/path/to/cifar10``; ``--set dataset=cifar100`` for the second column.
``python ray_jobs/sweep.py --space table1 --plan`` prints what every row runs, with its cost.

Options (``--set KEY=VALUE``; first value = default):

- ``dataset=cifar10|cifar100``: the FPI row is that dataset's best released setting (Table 1's
  FPI row: CIFAR-10 ``mean_var``, CIFAR-100 ``mean`` from identity variances).
- ``variant=as_released|paper``: the FPI row's update (:mod:`nfpi.presets`).
- ``gd_weights=equal|as_released``: GD minimises the FPI's objective (same lambda, alpha, pi:
  the fair comparison), or the release's GD weights (lambda 50 -> 25 over 100 GD steps).
- ``train_set=full|released``: all training images, or the release's per-class subsets (only
  the CIFAR-10 data-init row has one: 500 per class).

GD takes ``prior.gd.steps_per_solve`` (100) Adam steps on the whole training set's statistics
at the end of every epoch: 50,000 steps in 500 epochs (why: "When GD updates the gaussians" in
:mod:`nfpi.presets`). Each policy decays from lr0 = 0.1 over exactly the GD steps the run takes
(``total_steps`` is derived from the schedule, never a constant) and ends at lr_min = 1e-3 on
the last one. The data-init and GD rows do not depend on ``variant``, so both variants share
those flows."""

from ray import tune

from nfpi.presets import (
    GD_WEIGHTS,
    TABLE1_SETTING,
    TRAIN_SETS,
    VARIANTS,
    data_init_row,
    gd_overrides,
    released_overrides,
)
from search_spaces import SearchSpace

EPOCHS, GD_STEPS = 500, 100
POLICIES = ("sublinear_v1", "sublinear_v2", "linear", "superlinear_v1", "superlinear_v2")
OPTIONS = {
    "dataset": ("cifar10", "cifar100"),
    "variant": VARIANTS,
    "gd_weights": GD_WEIGHTS,
    "train_set": TRAIN_SETS,
}


def gd_row(policy: str, weights: str = "equal") -> dict:
    """A GD row: ``GD_STEPS`` Adam steps after every epoch under ``policy``, decaying over the
    run's GD steps (``total_steps`` None: derived from the schedule)."""
    return {
        "prior.method": "gd",
        "prior.solve_until": None,
        "prior.gd.steps_per_solve": GD_STEPS,
        "prior.gd.policy": {"name": policy, "lr0": 0.1, "lr_min": 1e-3, "total_steps": None},
        **gd_overrides(weights),
    }


def build(
    dataset: str = "cifar10",
    variant: str = "as_released",
    gd_weights: str = "equal",
    train_set: str = "full",
) -> SearchSpace:
    """The space for one choice of the options (the experiment ``dataset`` is Table 1's FPI
    setting as released, so its objective is the one GD minimises at equal weights)."""
    setting = f"{dataset}/{TABLE1_SETTING[dataset]}"
    rows = (
        [data_init_row(dataset, train_set)]
        + [gd_row(p, gd_weights) for p in POLICIES]
        + [released_overrides(setting, variant, train_set=train_set)]
    )
    return SearchSpace(
        name="table1",
        reproduces=(
            f"Table 1 (NF-Acc: data-init, GD x 5 learning-rate policies, FPI), {dataset}: "
            f"FPI {setting} {variant}, GD weights {gd_weights}, {train_set} training set"
        ),
        experiment=dataset,
        base={"optim.epochs": EPOCHS},
        params={"row": tune.grid_search(rows)},
        group_by=("prior.method", "prior.gd.policy.name"),
        options=OPTIONS,
        build=build,
        chosen={
            "dataset": dataset,
            "variant": variant,
            "gd_weights": gd_weights,
            "train_set": train_set,
        },
    )


SPACE = build()
