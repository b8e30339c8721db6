"""Table 3: which gaussian parameters the KLD repulsion moves, per dataset, each setting the
release's config with its own lambda (method notes section 10): #1 none (the data-init
baseline), #2 means only from identity variances (``mean``), #3 variances only (``var``), #4
both (``mean_var``). Rows are named after the preset they run (``name``). Pass
``--set data.root=...``.

Options (first value = default): ``dataset=cifar10|cifar100``, ``variant=as_released|paper``
(the paper form adds automatic variance bounds where it has no finite fixed point:
:mod:`nfpi.presets`) and ``train_set=full|released`` (all training images, or the release's
per-class subsets: CIFAR-10 ``mean``, ``var`` and data-init 500 per class, CIFAR-100 ``var`` 50
per class). The data-init row is the same flow for both variants (and ``table1``'s)."""

from ray import tune

from nfpi.presets import (
    TRAIN_SETS,
    VARIANTS,
    data_init_row,
    released_name,
    released_overrides,
)
from search_spaces import SearchSpace

OPTIONS = {"dataset": ("cifar10", "cifar100"), "variant": VARIANTS, "train_set": TRAIN_SETS}


def settings(dataset: str, variant: str, train_set: str = "full") -> list[dict]:
    """Table 3's rows #1-#4 (shared with ``table3_cnn``)."""
    rows = [{**data_init_row(dataset, train_set), "name": f"{dataset}_data_init"}]
    for setting in ("mean", "var", "mean_var"):
        key = f"{dataset}/{setting}"
        rows.append(
            {
                **released_overrides(key, variant, train_set=train_set),
                "name": released_name(key, variant),
            }
        )
    return rows


# Back compatible: the default dataset's rows.
SETTINGS = settings("cifar10", "as_released")


def build(
    dataset: str = "cifar10", variant: str = "as_released", train_set: str = "full"
) -> SearchSpace:
    return SearchSpace(
        name="table3",
        reproduces=(
            f"Table 3 (KLD on mu only / Sigma only / both / none), {dataset}, {variant}, "
            f"{train_set} training set"
        ),
        experiment=dataset,
        base={},
        params={"setting": tune.grid_search(settings(dataset, variant, train_set))},
        group_by=("name",),
        options=OPTIONS,
        build=build,
        chosen={"dataset": dataset, "variant": variant, "train_set": train_set},
    )


SPACE = build()
