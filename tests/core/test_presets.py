"""The released configs as presets, checked field for field against method notes section 10,
and the paper variant's behaviour on statistics where it has no finite fixed point."""

import pytest

from nfpi.errors import ConfigError
from nfpi.presets import (
    EXPERIMENTS,
    RELEASED,
    experiment_config,
    gd_overrides,
    released_name,
    released_overrides,
)
from nfpi.prior import DEFAULT_BOUND_FACTORS

ROOT = {"data.root": "/data/placeholder"}

# Method notes section 10, transcribed: config -> (Table 3 setting, what moves, start variances,
# isotropic mean heuristic, lambda as released). Every config: reference form, pi pairwise,
# alpha 10, summed-q on, epsilon 0.1, <= 1000 iterations, one FPI solve after epoch 0 then
# frozen (section 10, corrected), started from the gaussians the run holds; EMA every step from
# step 0, from epoch 1; ActNorm init on 1024 images.
SECTION_10 = {
    "cifar10/mean": (2, "mean", "identity", True, 500_000),
    "cifar10/mean_var": (4, "both", "data", True, 300_000),
    "cifar10/var": (3, "variance", "data", True, 100_000),
    "cifar100/mean": (2, "mean", "identity", False, 7_500_000),
    "cifar100/mean_var": (4, "both", "data", True, 3_000_000),
    "cifar100/var": (3, "variance", "data", True, 2_000_000),
}
# Section 10's items_per_class_train: the release's training subsets (None = all images).
SUBSETS = {"cifar10/mean": 500, "cifar10/var": 500, "cifar100/var": 50}
PAPER_LAMBDA = {  # the last column of section 10's table, rounded as printed there
    "cifar10/mean": 5556,
    "cifar10/mean_var": 3333,
    "cifar10/var": 1111,
    "cifar100/mean": 758,
    "cifar100/mean_var": 303,
    "cifar100/var": 202,
}


@pytest.mark.parametrize("key", sorted(SECTION_10))
def test_as_released_presets_match_section_10_field_for_field(key):
    table3, update, start, isotropic, lam_released = SECTION_10[key]
    dataset, setting = key.split("/")
    k = {"cifar10": 10, "cifar100": 100}[dataset]
    assert RELEASED[key].table3 == table3
    cfg = experiment_config(released_name(key, "as_released"), ROOT)
    assert cfg.name == f"{dataset}_{setting}_as_released" and cfg.data.name == dataset
    assert (cfg.flow.preset, cfg.optim.epochs) == ("mef-cifar", 500)
    p, f = cfg.prior, cfg.prior.fpi
    assert p.method == "fpi"
    assert p.objective.lam == lam_released / (k * (k - 1))
    assert round(p.objective.lam) == PAPER_LAMBDA[key]
    assert (p.objective.alpha, p.objective.pi) == (10.0, "pairwise")
    assert (f.form, f.update, f.variance_init) == ("reference", update, start)
    assert (f.isotropic_mean, f.summed_q) == (isotropic, True)
    assert (f.tol, f.max_iter, f.damping, f.round_float32) == (0.1, 1000, "none", True)
    assert f.var_bounds is None and f.auto_bounds == ()
    assert f.start == "current"  # a variances-only solve keeps the untrained flow's means
    assert p.solve_epochs(500) == [0]  # one solve, then frozen
    assert (cfg.ema.update_every, cfg.ema.update_after_step, cfg.ema.start_epoch) == (1, 0, 1)
    assert cfg.optim.init_batch == 1024
    assert cfg.data.items_per_class is None  # full data unless the subset is asked for
    subset = experiment_config(
        cfg.name, {**ROOT, **released_overrides(key, "as_released", train_set="released")}
    )
    assert subset.data.items_per_class == SUBSETS.get(key)


@pytest.mark.parametrize("key", sorted(SECTION_10))
def test_paper_presets_differ_from_the_release_in_the_update_only(key):
    released = experiment_config(released_name(key, "as_released"), ROOT)
    paper = experiment_config(released_name(key, "paper"), ROOT)
    a, b = released.prior, paper.prior
    assert b.objective == a.objective
    assert b.solve_epochs(500) == a.solve_epochs(500) == [0]
    assert (paper.ema, paper.optim, paper.data) == (released.ema, released.optim, released.data)
    f = b.fpi
    assert (f.form, f.update, f.variance_init) == ("paper", a.fpi.update, a.fpi.variance_init)
    assert not (f.isotropic_mean or f.summed_q)  # the release's options are not the paper's
    assert f.var_bounds is None and f.auto_bounds  # unbounded first, bounds only if needed
    assert f.require_convergence
    assert paper.replace(name="x", prior=a) == released.replace(name="x")


def test_table_1_presets_are_the_best_setting_per_dataset():
    c10, c100 = experiment_config("cifar10", ROOT), experiment_config("cifar100", ROOT)
    assert (c10.prior.fpi.update, c10.prior.fpi.variance_init) == ("both", "data")
    assert round(c10.prior.objective.lam) == 3333
    assert (c100.prior.fpi.update, c100.prior.fpi.variance_init) == ("mean", "identity")
    assert round(c100.prior.objective.lam) == 758
    assert experiment_config("imagenet", ROOT).data.name == "imagefolder"


def test_gd_weights_equal_or_as_released():
    equal = experiment_config("cifar10", {**ROOT, "prior.method": "gd", **gd_overrides("equal")})
    assert equal.prior.objective_for("gd") == equal.prior.objective  # same lambda as the FPI
    assert equal.prior.gd.lam_end is None
    rel = experiment_config(
        "cifar10", {**ROOT, "prior.method": "gd", **gd_overrides("as_released")}
    )
    assert rel.prior.objective_for("gd").lam == 50.0 and rel.prior.objective_for("fpi").lam > 3000
    assert (rel.prior.gd.lam_end, rel.prior.gd.lam_steps) == (25.0, 100)
    assert rel.prior.gd.policy.name == "geometric_knots"  # the release's learning rates
    assert rel.prior.gd.sigmoid == (1.0, 1.0, 0.25) and rel.prior.gd.betas == (0.9, 0.999)
    with pytest.raises(ConfigError, match="gd_weights"):
        gd_overrides("release")


def test_bad_released_names_are_named_errors():
    with pytest.raises(ConfigError, match="variant"):
        released_overrides("cifar10/mean", "faithful")
    with pytest.raises(ConfigError, match="released config"):
        released_overrides("cifar10/both", "paper")
    assert all("/" not in name for name in EXPERIMENTS)


def test_the_choices_the_paper_does_not_state_are_listed_in_one_place():
    import nfpi.presets

    doc = nfpi.presets.__doc__
    section = doc[doc.index("Choices the paper does not state") :]
    for topic in (
        "CNN-Acc sampling temperature",
        "When GD updates the gaussians",
        "GD learning-rate policies",
        "GD lambda",
        "CIFAR-10 Table 2 lambdas",
        "paper variant's bounds",
        "Figure 1's lambdas",
        "Table 5's Swin",
        "Table 6's EVA02",
    ):
        assert topic in section, topic


def _flow_like(k, d=24, n=60, seed=0):
    """Class statistics like an untrained flow's latents: overlapping classes, unit-ish spread."""
    import torch

    from nfpi.prior import ClassStatistics

    g = torch.Generator().manual_seed(seed)
    centers = 0.3 * torch.randn(k, d, generator=g, dtype=torch.float64)
    scales = 0.5 + torch.rand(k, d, generator=g, dtype=torch.float64)
    y = torch.arange(n * k) % k
    z = centers[y] + scales[y] * torch.randn(n * k, d, generator=g, dtype=torch.float64)
    return ClassStatistics.from_batch(z, y, k)


@pytest.mark.parametrize("key", sorted(SECTION_10))
def test_both_variants_solve_on_flow_like_statistics(key):
    """Each preset's solver on statistics shaped like its dataset's (K classes): the release's
    form runs its <= 1000 iterations; the paper form converges: unbounded for means only and
    where kappa = lambda / (K (K-1)) is small (CIFAR-100), else (CIFAR-10's joint and
    variance-only settings) with the first box of the automatic bounds that converges, the
    counts at the bounds reported."""
    from nfpi.prior import solve_fpi

    stats = _flow_like(RELEASED[key].num_classes)
    released = experiment_config(released_name(key, "as_released"), ROOT).prior
    _, report = solve_fpi(stats, released.objective, released.fpi)
    assert report.iterations <= 1000 and report.bound_factor == 0
    paper = experiment_config(released_name(key, "paper"), ROOT).prior
    _, report = solve_fpi(stats, paper.objective, paper.fpi)
    assert report.converged
    if RELEASED[key].update == "mean" or RELEASED[key].dataset == "cifar100":
        assert report.bound_factor == 0 and report.var_bounds is None
    else:
        assert report.bound_factor in paper.fpi.auto_bounds
        assert report.at_lower_bound + report.at_upper_bound > 0


@pytest.mark.slow  # a paper-size flow trains
def test_a_paper_preset_trains_and_logs_its_bounds(tmp_path):
    """The paper variant of cifar10/mean_var on the smoke data: its one scheduled solve runs
    (after epoch 0), and the epoch metrics carry the automatic bounds and the counts at them."""
    from nfpi.training import Trainer

    overrides = {
        **released_overrides("cifar10/mean_var", "paper"),
        "eval.plots": False,
        "optim.epochs": 3,
    }
    history = Trainer(experiment_config("smoke", overrides), tmp_path / "run").fit()
    solved = [h for h in history if "fpi_iterations" in h]
    assert [int(h["epoch"]) for h in solved] == [0]  # then frozen
    assert history[-1]["prior_version"] == 2  # data-init + one solve
    for h in solved:
        assert h["fpi_converged"] == 1.0
        # At lambda 3,333 on ten digit classes the joint paper form needs the bounds.
        assert h["fpi_bound_factor"] in DEFAULT_BOUND_FACTORS
        assert h["fpi_at_lower_bound"] + h["fpi_at_upper_bound"] > 0
