"""The downstream pipeline's end-to-end check (a few minutes on 2 cores): a tiny digits flow per
prior, a small labelled set drawn from it, a tiny classifier trained on it and tested on real
digits."""

from ray import tune

from search_spaces import SearchSpace

SPACE = SearchSpace(
    name="smoke_cnn",
    reproduces="no paper result: the CNN-Acc pipeline's end-to-end check (CI)",
    experiment="smoke",
    base={
        "optim.epochs": 2,
        "downstream.kind": "cnn",
        "downstream.per_class": 10,
        "downstream.temperature": 0.7,
        "cnn.model": "resnet10t",
        "cnn.epochs": 1,
        "cnn.batch_size": 50,
        "cnn.flip": False,
    },
    params={"variant": tune.grid_search([{"prior.method": "data-init"}, {"prior.method": "fpi"}])},
    kind="downstream",
)
