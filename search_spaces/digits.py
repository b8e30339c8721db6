"""The embedded default sweep: data-init, GD and FPI priors on scikit-learn's digits (bundled,
no download), tiny MEF flow, CPU; a few minutes on a 2-core machine."""

from ray import tune

from search_spaces import SearchSpace

SPACE = SearchSpace(
    name="digits",
    reproduces="Table 1's comparison (data-init vs GD vs FPI) at toy scale on digits",
    experiment="digits",
    base={},
    params={
        "variant": tune.grid_search(
            [
                {"prior.method": "data-init"},
                {"prior.method": "gd"},
                {"prior.method": "fpi"},
            ]
        )
    },
    group_by=("prior.method",),
)
