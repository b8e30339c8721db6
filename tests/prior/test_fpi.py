"""The fixed-point iteration: exact equations, fixed points, divergence, golden 2-D case."""

import numpy as np
import pytest
import torch

from nfpi.errors import (
    ConfigError,
    DegenerateGaussiansError,
    FPIDivergenceError,
    FPINotConvergedError,
    ShapeError,
)
from nfpi.figures import shared_golden_path
from nfpi.prior import (
    DEFAULT_BOUND_FACTORS,
    ClassStatistics,
    FPIConfig,
    GaussianPrior,
    Objective,
    fpi_step,
    prior_objective,
    solve_fpi,
)
from nfpi.prior.naive import fpi_step_broadcast

# The authors' embedding: $NFPI_SHARED_DATA or ../shared/data (not redistributed).
GOLDEN = shared_golden_path()


def _blobs(k=5, d=3, n=400, spread=1.0, seed=0, full=False):
    """Overlapping anisotropic class blobs: a small real-valued stand-in for latents."""
    g = torch.Generator().manual_seed(seed)
    centers = spread * torch.randn(k, d, generator=g, dtype=torch.float64)
    scales = 0.5 + torch.rand(k, d, generator=g, dtype=torch.float64)
    y = torch.arange(n * k) % k
    z = centers[y] + scales[y] * torch.randn(n * k, d, generator=g, dtype=torch.float64)
    return ClassStatistics.from_batch(z, y, k, full=full)


@pytest.fixture(scope="module")
def golden():
    if GOLDEN is None:
        pytest.skip("golden 2-D data not found (set NFPI_SHARED_DATA to its folder)")
    data = np.load(GOLDEN)
    return ClassStatistics.from_batch(torch.from_numpy(data["x"]), torch.from_numpy(data["y"]), 10)


def _split(kwargs):
    objective = Objective(**{k: kwargs.pop(k) for k in ("lam", "alpha", "pi") if k in kwargs})
    return objective, kwargs


def cfg_(**kwargs):
    """(Objective, FPIConfig) from one keyword list: what the solver and its objective take."""
    objective, rest = _split(kwargs)
    return objective, FPIConfig(**rest)


def ref_(**kwargs):
    objective, rest = _split(kwargs)
    return objective, FPIConfig.reference(**rest)


def _grads(prior, stats, cfg):
    objective, _ = cfg
    means = prior.means.clone().requires_grad_()
    scale = prior.scale_param.clone().requires_grad_()
    data_scale = stats.var() if prior.covariance == "diag" else stats.cov()
    loss = prior_objective(means, scale, stats.mean(), data_scale, **objective.to_dict())
    return torch.autograd.grad(loss, [means, scale])


# ---------------------------------------------------------------------------------- lambda = 0
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_lambda_zero_returns_class_moments_in_one_iteration(covariance):
    stats = _blobs(full=covariance == "full")
    prior, report = solve_fpi(stats, *cfg_(lam=0.0, covariance=covariance, tol=1e-12))
    assert report.iterations == 1 and report.converged
    torch.testing.assert_close(prior.means, stats.mean(), rtol=0, atol=1e-12)
    expected = stats.var() if covariance == "diag" else stats.cov()
    torch.testing.assert_close(prior.scale_param, expected, rtol=1e-12, atol=1e-12)


def test_lambda_zero_from_another_positive_start():
    stats = _blobs()
    start = GaussianPrior(stats.mean() + 3.0, var=torch.full_like(stats.mean(), 7.0))
    mu1, _ = fpi_step(start.means, start.var, stats.mean(), stats.var(), *cfg_(lam=0.0))
    torch.testing.assert_close(mu1, stats.mean(), rtol=0, atol=1e-12)  # Eq. 5 at lambda = 0: m
    prior, report = solve_fpi(stats, *cfg_(lam=0.0, tol=1e-12), init=start)
    # Eq. 6 is the geometric mean v_old # (s + (m - mu)^2): the log-error halves per plain step;
    # the Anderson mixing solves this linear recursion in a handful of iterations.
    assert report.converged and report.iterations <= 8
    torch.testing.assert_close(prior.var, stats.var(), rtol=1e-10, atol=0)
    # The shared objective, reported by the solver: the class moments minimise the NLL.
    assert report.objective_after < report.objective_before


# ------------------------------------------------------------------------- GEMM == broadcast
CONFIGS = [
    cfg_(lam=50.0),
    cfg_(lam=50.0, pi="mean"),
    cfg_(lam=5.0, update="mean"),
    cfg_(lam=5.0, update="variance"),
    ref_(lam=50.0),
    ref_(lam=50.0, summed_q=False),
    ref_(lam=50.0, isotropic_mean=False, pi="mean"),
]


@pytest.mark.parametrize("k", [2, 13, 130])
@pytest.mark.parametrize(
    "cfg",
    CONFIGS,
    ids=lambda c: f"{c[1].form}-{c[0].pi}-{c[1].update}-q{c[1].summed_q:d}i{c[1].isotropic_mean:d}",
)
def test_gemm_step_equals_broadcast_step(k, cfg):
    g = torch.Generator().manual_seed(k)
    mu, m = (torch.randn(k, 6, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    v, s = (torch.rand(k, 6, generator=g, dtype=torch.float64) + 0.4 for _ in range(2))
    got, ref = fpi_step(mu, v, m, s, *cfg), fpi_step_broadcast(mu, v, m, s, *cfg)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-11, atol=1e-11)


# ----------------------------------------------------------------- fixed point = stationary point
@pytest.mark.parametrize("pi", ["pairwise", "mean"])
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_joint_fixed_point_zeroes_the_gradient(pi, covariance):
    stats = _blobs(full=covariance == "full")
    cfg = cfg_(lam=2.0, pi=pi, covariance=covariance, tol=1e-12, max_iter=2000)
    prior, report = solve_fpi(stats, *cfg)
    assert report.converged
    g_mu, g_scale = _grads(prior, stats, cfg)
    assert g_mu.abs().max() < 1e-8 and g_scale.abs().max() < 1e-8
    assert report.kl_min_after > report.kl_min_before  # the repulsion separated the classes


@pytest.mark.parametrize("pi", ["pairwise", "mean"])
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_mean_only_fixed_point_at_large_lambda(pi, covariance):
    stats = _blobs(full=covariance == "full")
    cfg = cfg_(lam=1e4, pi=pi, update="mean", covariance=covariance, tol=1e-11, max_iter=3000)
    prior, report = solve_fpi(stats, *cfg)
    assert report.converged
    g_mu, _ = _grads(prior, stats, cfg)
    assert g_mu.abs().max() < 1e-8
    expected = stats.var() if covariance == "diag" else stats.cov()
    assert torch.equal(prior.scale_param, expected)  # the variances did not move


def test_variance_only_keeps_means_and_stays_positive():
    stats = _blobs()
    cfg = cfg_(lam=2.0, update="variance", tol=1e-12)
    prior, report = solve_fpi(stats, *cfg)
    assert report.converged and torch.equal(prior.means, stats.mean())
    assert (prior.var > 0).all() and torch.isfinite(prior.var).all()
    _, g_v = _grads(prior, stats, cfg)
    assert g_v.abs().max() < 1e-8


def test_identity_variance_start_keeps_unit_variances_with_mean_update():
    stats = _blobs()
    prior, _ = solve_fpi(
        stats, *cfg_(lam=100.0, update="mean", variance_init="identity", tol=1e-10)
    )
    assert torch.equal(prior.var, torch.ones_like(prior.var))


# --------------------------------------------------------------------------------- golden 2-D
def test_golden_reference_form_reproduces_release(golden):
    cfg = ref_(lam=1000.0, alpha=10.0, pi="pairwise", summed_q=False, isotropic_mean=True)
    _prior, report = solve_fpi(golden, *cfg)
    assert report.iterations == 20 and report.converged
    assert round(report.residuals_mean[-1], 4) == 0.0753
    assert round(report.residuals_var[-1], 4) == 0.0119
    assert report.residuals_mean[-2] > 0.1  # it really stopped at the first step within eps


def test_reference_variance_fixed_point_is_cube_root(golden):
    s = golden.var()
    _mu, v = fpi_step(golden.mean(), s, golden.mean(), s, *ref_(lam=0.0))
    torch.testing.assert_close(v, torch.ones_like(v))  # first iterate from v = s is 1
    prior, _ = solve_fpi(golden, *ref_(lam=0.0, tol=1e-9, round_float32=False))
    torch.testing.assert_close(prior.var, s ** (1 / 3), rtol=1e-8, atol=0)


@pytest.mark.parametrize("lam", [1000.0, 1e5])
def test_golden_paper_mean_only_converges(golden, lam):
    cfg = cfg_(lam=lam, update="mean", tol=1e-9, max_iter=2000)
    prior, report = solve_fpi(golden, *cfg)
    assert report.converged and report.final_residual < 1e-9
    assert report.iterations < 600
    g_mu, _ = _grads(prior, golden, cfg)
    assert g_mu.abs().max() < 1e-8


def test_golden_paper_joint_diverges_with_named_error(golden):
    with pytest.raises(FPIDivergenceError, match="var_bounds") as info:
        solve_fpi(golden, *cfg_(lam=1000.0, update="both", tol=1e-9, max_iter=2000))
    report = info.value.report
    assert report.stop_reason == "diverged" and not report.converged
    assert report.iterations < 2000 and all(np.isfinite(report.residuals))


def test_golden_paper_joint_with_bounds_converges_to_constrained_stationary_point(golden):
    lo, hi = 1.0, 2000.0
    cfg = cfg_(lam=1000.0, update="both", var_bounds=(lo, hi), tol=1e-9, max_iter=2000)
    prior, report = solve_fpi(golden, *cfg)
    assert report.converged
    v = prior.var
    assert (v >= lo).all() and (v <= hi).all()
    g_mu, g_v = _grads(prior, golden, cfg)
    at_lo, at_hi = v <= lo * (1 + 1e-12), v >= hi * (1 - 1e-12)
    assert report.at_upper_bound == int(at_hi.sum()) > 0
    assert report.at_lower_bound == int(at_lo.sum())
    assert g_mu.abs().max() < 1e-8
    free = ~(at_lo | at_hi)
    assert g_v[free].abs().max() < 1e-8
    # At a bound the objective would still decrease by moving outward.
    assert (g_v[at_hi] < 0).all() and (g_v[at_lo] > 0).all()


# ------------------------------------------------------------------------- automatic bounds
def _check_constrained_stationary(prior, stats, cfg, bounds, tol=1e-7):
    """Free coordinates (the means if they move, the variances inside the box): gradient ~ 0;
    at a bound: the gradient points out of the box."""
    lo, hi = bounds
    g_mu, g_v = _grads(prior, stats, cfg)
    at_lo, at_hi = prior.var <= lo * (1 + 1e-12), prior.var >= hi * (1 - 1e-12)
    free = ~(at_lo | at_hi)
    if cfg[1].update == "both":
        assert g_mu.abs().max() < tol
    assert (g_v[free].abs() < tol).all()  # (every variance may sit at a bound)
    assert (g_v[at_hi] < 0).all() and (g_v[at_lo] > 0).all()
    return int(at_lo.sum()), int(at_hi.sum())


def _flow_like(k=10, d=16, n=200, seed=0):
    """Overlapping classes like the latents of an untrained flow: close means, unit-ish spread."""
    g = torch.Generator().manual_seed(seed)
    centers = 0.3 * torch.randn(k, d, generator=g, dtype=torch.float64)
    scales = 0.5 + torch.rand(k, d, generator=g, dtype=torch.float64)
    y = torch.arange(n * k) % k
    z = centers[y] + scales[y] * torch.randn(n * k, d, generator=g, dtype=torch.float64)
    return ClassStatistics.from_batch(z, y, k)


@pytest.mark.parametrize(("lam", "update"), [(3333.0, "both"), (1111.0, "variance")])
def test_auto_bounds_when_the_unbounded_paper_form_has_no_fixed_point(lam, update):
    """The released CIFAR-10 lambdas (mean_var, var) on flow-like statistics: unbounded, the
    paper form diverges; the first box of the ladder that converges is used, and the result is
    the constrained stationary point (the counts at the bounds are reported)."""
    stats = _flow_like()
    with pytest.raises(FPIDivergenceError):
        solve_fpi(stats, *cfg_(lam=lam, update=update))
    cfg = cfg_(lam=lam, update=update, auto_bounds=DEFAULT_BOUND_FACTORS, tol=1e-10)
    prior, report = solve_fpi(stats, *cfg)
    assert report.converged and report.bound_factor == DEFAULT_BOUND_FACTORS[0]
    assert report.bound_attempts == 1  # the unbounded attempt failed, the widest box converged
    s = stats.var()
    f = report.bound_factor
    assert report.var_bounds == (float(s.min()) / f, float(s.max()) * f)
    low, high = _check_constrained_stationary(prior, stats, cfg, report.var_bounds)
    assert (report.at_lower_bound, report.at_upper_bound) == (low, high) and high > 0
    # The same box given by hand gives the very same solve.
    fixed, _ = solve_fpi(
        stats, *cfg_(lam=lam, update=update, var_bounds=report.var_bounds, tol=1e-10)
    )
    assert torch.equal(fixed.means, prior.means) and torch.equal(fixed.var, prior.var)


def test_auto_bounds_stay_off_where_the_unbounded_solve_converges():
    stats = _flow_like()
    plain, plain_report = solve_fpi(stats, *cfg_(lam=5.0))
    auto, report = solve_fpi(stats, *cfg_(lam=5.0, auto_bounds=DEFAULT_BOUND_FACTORS))
    assert report.converged and report.bound_factor == 0 and report.var_bounds is None
    assert torch.equal(plain.var, auto.var) and torch.equal(plain.means, auto.means)
    assert report.iterations == plain_report.iterations
    # Means only: the variances do not move, so no bounds are ever tried.
    _, mean_report = solve_fpi(
        stats, *cfg_(lam=3333.0, update="mean", auto_bounds=DEFAULT_BOUND_FACTORS)
    )
    assert mean_report.converged and mean_report.bound_factor == 0


def test_auto_bounds_walk_the_ladder_on_the_golden_case(golden):
    """Golden 2-D case at the released CIFAR-10 mean_var lambda: the boxes widened 1e4, 1e3 and
    100 times do not converge within max_iter; 10 times is the first that does."""
    cfg = cfg_(lam=3333.0, update="both", auto_bounds=DEFAULT_BOUND_FACTORS, tol=1e-9)
    prior, report = solve_fpi(golden, *cfg)
    assert report.converged and report.bound_factor == 10.0 and report.bound_attempts == 4
    low, high = _check_constrained_stationary(prior, golden, cfg, report.var_bounds, tol=1e-6)
    assert (report.at_lower_bound, report.at_upper_bound) == (low, high)


def test_auto_bounds_that_never_converge_raise_with_the_ladder():
    stats = _flow_like()
    cfg = cfg_(lam=3333.0, update="both", auto_bounds=(1e4, 1e3), max_iter=5)
    with pytest.raises(FPINotConvergedError, match="automatic variance bounds") as info:
        solve_fpi(stats, *cfg)
    assert info.value.report.iterations == 5
    _, report = solve_fpi(stats, cfg[0], cfg[1].replace(require_convergence=False))
    assert not report.converged and report.bound_factor == 1e3 and report.bound_attempts == 2


# ------------------------------------------------------------------------------------- errors
def test_config_validation_names_the_field():
    for cls, kwargs, field in [
        (Objective, {"lam": -1.0}, "lam"),
        (Objective, {"alpha": 0.0}, "alpha"),
        (Objective, {"pi": "max"}, r"pi.*one of \('pairwise', 'mean'\)"),
        (FPIConfig, {"update": "all"}, "update"),
        (FPIConfig, {"tol": 0.0}, "tol"),
        (FPIConfig, {"max_iter": 0}, "max_iter"),
        (FPIConfig, {"max_iter": 2.5}, "max_iter"),
        (FPIConfig, {"var_bounds": (2.0, 1.0)}, "var_bounds"),
        (FPIConfig, {"summed_q": True}, "form"),
        (FPIConfig, {"form": "reference", "covariance": "full"}, "covariance"),
        (FPIConfig, {"anderson_memory": 0}, "anderson_memory"),
        (FPIConfig, {"auto_bounds": (10.0, 100.0)}, "auto_bounds"),
        (FPIConfig, {"auto_bounds": (10.0, 1.0)}, "auto_bounds"),
    ]:
        with pytest.raises(ConfigError, match=field):
            cls(**kwargs)
    with pytest.raises(ConfigError, match="unknown"):
        FPIConfig.from_dict({"tol": 1.0, "lambda": 2.0})
    # A nested config's errors carry its dotted position.
    with pytest.raises(ConfigError, match="prior.fpi.tol"):
        FPIConfig.from_dict({"tol": -1.0}, path="prior.fpi")
    # JSON overrides give ints; float fields hold floats (as configs print and MLflow logs them)
    parsed = Objective.from_dict({"lam": 300, "alpha": 10})
    assert type(parsed.lam) is float and type(parsed.alpha) is float
    assert parsed == Objective(lam=300.0, alpha=10.0)
    solver = FPIConfig.from_dict({"max_iter": 50, "var_bounds": [1, 2]})
    assert type(solver.max_iter) is int and solver.var_bounds == (1.0, 2.0)


def test_unconverged_solve_raises_or_reports():
    stats = _blobs()
    with pytest.raises(FPINotConvergedError) as info:
        solve_fpi(stats, *cfg_(lam=50.0, update="mean", tol=1e-14, max_iter=3))
    assert info.value.report.iterations == 3
    _, report = solve_fpi(
        stats, *cfg_(lam=50.0, update="mean", tol=1e-14, max_iter=3, require_convergence=False)
    )
    assert not report.converged and report.stop_reason == "max_iter"


def test_coinciding_classes_raise_degenerate_error():
    z = torch.randn(400, 3, dtype=torch.float64)
    y = torch.arange(400) % 2
    stats = ClassStatistics.from_batch(torch.cat([z, z]), torch.cat([y * 0, y * 0 + 1]), 2)
    with pytest.raises(DegenerateGaussiansError, match="classes 0 and 1"):
        solve_fpi(stats, *cfg_(lam=10.0))


def test_mismatched_init_is_rejected():
    stats = _blobs()
    with pytest.raises(ShapeError):
        solve_fpi(stats, *cfg_(), init=GaussianPrior.standard(4, 3))


@pytest.mark.parametrize(
    "config",
    [FPIConfig(), FPIConfig(var_bounds=(0.25, 1.25)), FPIConfig(update="mean")],
    ids=["both", "bounded", "means-only"],
)
def test_runaway_means_are_told_to_lower_lambda_only(config):
    """At lambda = 1e30 the means run away whatever the variances do: the advice names lowering
    lambda, not bounds or a means-only update (which were tried here and do not help)."""
    with pytest.raises(FPIDivergenceError) as err:
        solve_fpi(_blobs(), Objective(lam=1e30), config)
    text = str(err.value)
    assert "lower lam" in text and "means run away" in text
    assert "var_bounds" not in text and "means only" not in text
