"""Table 3: which gaussian parameters the KLD repulsion moves, per dataset, each setting the
release's config with its own lambda (method notes section 10): #1 none (the data-init
baseline), #2 means only from identity variances (``mean``), #3 variances only (``var``), #4
both (``mean_var``). Rows are named after the preset they run (``name``). Pass
``--set data.root=...``.

Options (first value = default): ``dataset=cifar10|cifar100`` and ``variant=as_released|paper``
(the paper form adds automatic variance bounds where it has no finite fixed point:
:mod:`nfpi.presets`). The data-init row is the same flow for both variants (and ``table1``'s)."""

from ray import tune

from nfpi.presets import VARIANTS, released_name, released_overrides
from search_spaces import SearchSpace

OPTIONS = {"dataset": ("cifar10", "cifar100"), "variant": VARIANTS}


def settings(dataset: str, variant: str) -> list[dict]:
    """Table 3's rows #1-#4 (shared with ``table3_cnn``)."""
    rows = [{"prior.method": "data-init", "name": f"{dataset}_data_init"}]
    for setting in ("mean", "var", "mean_var"):
        key = f"{dataset}/{setting}"
        rows.append({**released_overrides(key, variant), "name": released_name(key, variant)})
    return rows


# Back compatible: the default dataset's rows.
SETTINGS = settings("cifar10", "as_released")


def build(dataset: str = "cifar10", variant: str = "as_released") -> SearchSpace:
    return SearchSpace(
        name="table3",
        reproduces=f"Table 3 (KLD on mu only / Sigma only / both / none), {dataset}, {variant}",
        experiment=dataset,
        base={},
        params={"setting": tune.grid_search(settings(dataset, variant))},
        group_by=("name",),
        options=OPTIONS,
        build=build,
        chosen={"dataset": dataset, "variant": variant},
    )


SPACE = build()
