"""Table 2: NF-Acc (and, with the CNN pipeline, CNN-Acc) against lambda, FPI on means and
variances (the released ``mean_var`` setting, Table 3's #4), the paper's MEF flow and budget.
Pass ``--set data.root=/abs/path/to/cifar100``.

Options (first value = default): ``dataset=cifar100|cifar10`` (the paper's table is CIFAR-100;
CIFAR-10's lambdas are our choice, :data:`nfpi.presets.TABLE2_LAMBDAS`) and
``variant=as_released|paper`` (:mod:`nfpi.presets`)."""

from ray import tune

from nfpi.presets import TABLE2_LAMBDAS, VARIANTS, released_overrides
from search_spaces import SearchSpace

LAMBDAS = TABLE2_LAMBDAS["cifar100"]
OPTIONS = {"dataset": ("cifar100", "cifar10"), "variant": VARIANTS}


def flows(dataset: str, variant: str) -> tuple[dict, dict]:
    """The base overrides and the lambda grid of Table 2's flows (shared with ``table2_cnn``)."""
    base = released_overrides(f"{dataset}/mean_var", variant)
    return base, {"prior.objective.lam": tune.grid_search(list(TABLE2_LAMBDAS[dataset]))}


def build(dataset: str = "cifar100", variant: str = "as_released") -> SearchSpace:
    base, params = flows(dataset, variant)
    return SearchSpace(
        name="table2",
        reproduces=f"Table 2 (NF-Acc vs lambda), {dataset}, FPI mean_var {variant}",
        experiment=dataset,
        base=base,
        params=params,
        group_by=("prior.objective.lam",),
        options=OPTIONS,
        build=build,
        chosen={"dataset": dataset, "variant": variant},
    )


SPACE = build()
