"""A 2-trial check that the whole service works (about 2.5 minutes on 2 cores, Ray's start
included): data-init vs FPI on a few digits, 2 epochs of a tiny flow."""

from ray import tune

from search_spaces import SearchSpace

SPACE = SearchSpace(
    name="smoke",
    reproduces="no paper result: the service's end-to-end check (CI)",
    experiment="smoke",
    base={"optim.epochs": 2},
    params={"variant": tune.grid_search([{"prior.method": "data-init"}, {"prior.method": "fpi"}])},
)
