"""The repulsion's temperature: alpha log-uniform in [0.1, 10] (the paper's range) and pi in
{pairwise (Eq. 9), mean (Eq. 10)}, random search on CIFAR-10 with the FPI prior. Pass
``--set data.root=...``; ``--num-samples`` draws more."""

from ray import tune

from search_spaces import SearchSpace

SPACE = SearchSpace(
    name="alpha_pi",
    reproduces="Section 4.2 (control on pi_KLD) and the alpha range of Eq. 3",
    experiment="cifar10",
    base={"prior.method": "fpi"},
    params={
        "prior.objective.alpha": tune.loguniform(0.1, 10.0),
        "prior.objective.pi": tune.choice(["pairwise", "mean"]),
    },
    num_samples=8,
    group_by=("prior.objective.pi",),
)
